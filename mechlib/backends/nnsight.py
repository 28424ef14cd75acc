"""The nnsight backend: intervention lists on any Hugging Face causal LM through ``nnsight``.

For a model the engine does not mirror, or one that does not fit one machine: the same
intervention lists run inside ``nnsight.LanguageModel.trace``, locally, or on NDIF (the National
Deep Inference Fabric) with ``remote=True``. One trace per batch of lists (rows
``i*B..(i+1)*B`` belong to list ``i``); inside it every intervened module is visited in forward
order and each list's interventions are applied to its rows.

Hook points map to the Hugging Face modules of Llama-style models (``model.model.layers``:
SmolLM2, Llama, Mistral, Qwen, Gemma): ``embed`` = ``embed_tokens`` output, ``resid_pre`` = a
layer's input, ``q``/``k``/``v`` = the projections' outputs (before rotary, as TransformerLens's
``hook_q``), ``z`` = ``o_proj``'s input, ``attn_out`` = ``o_proj``'s output, ``resid_mid`` =
``resid_pre + attn_out`` (applied through ``attn_out``, as on the bridge), ``mlp_pre`` =
``gate_proj``'s output, ``mlp_post`` = ``down_proj``'s input, ``mlp_out`` = the MLP's output,
``resid_post`` = the layer's output. Attention patterns (``pattern``) have no module in
Hugging Face's fused attention and are refused with an explanation.

The numbers are those of the Hugging Face model, not of the bridge in compatibility mode (which
folds norms and centres weights): activations differ by that folding, but the patched runs' logit
differences, probabilities and metric values agree with the engine to float rounding.

Example (locally; remotely on NDIF with an API key, ``nnsight.CONFIG.set_default_api_key(...)``):
    >>> from nnsight import LanguageModel                                      # doctest: +SKIP
    >>> lm = LanguageModel("meta-llama/Llama-3.1-70B", device_map="auto")      # doctest: +SKIP
    >>> backend = NNsightBackend(lm, remote=True)                              # doctest: +SKIP
    >>> patch(lm, clean, corrupted, metric, "head_out", backend=backend)       # doctest: +SKIP
    >>> # a mechlib model by name, locally:
    >>> patch(model, clean, corrupted, metric, "head_out", backend="nnsight")   # doctest: +SKIP
"""

from __future__ import annotations

import socket
import warnings
from types import SimpleNamespace
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from mechlib.backends import Backend, BackendUnavailableError, Runs, RunSpec
from mechlib.interventions import POINTS, Intervention, Plan, Record, Site, Sources, point_of_hook

__all__ = ["NNsightBackend", "NNsightModel", "is_nnsight_model", "language_model"]

_LOADED: dict[str, Any] = {}


def is_nnsight_model(model: Any) -> bool:
    """Whether ``model`` is an :class:`NNsightModel` or an nnsight model (checked without importing nnsight)."""
    return isinstance(model, NNsightModel) or any(c.__module__.startswith("nnsight") for c in type(model).__mro__)


def language_model(folder_or_id: str) -> Any:
    """``nnsight.LanguageModel`` for a Hugging Face folder or hub id on the CPU, loaded once per process."""
    if folder_or_id not in _LOADED:
        try:
            from nnsight import LanguageModel
        except ImportError as e:  # pragma: no cover - nnsight is a pinned dependency
            raise BackendUnavailableError("the nnsight backend needs the nnsight package (pip install nnsight)") from e
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _LOADED[folder_or_id] = LanguageModel(folder_or_id, device_map="cpu", dispatch=True)
    return _LOADED[folder_or_id]


def _hf_source(model: Any) -> str:
    """The Hugging Face folder or hub id a mechlib bridge was loaded from."""
    from mechlib import models

    name = getattr(getattr(model, "cfg", None), "model_name", None)
    spec = getattr(models, "_REGISTRY", {}).get(name)
    if spec is None:
        raise BackendUnavailableError(
            f"model {name!r} has no Hugging Face form mechlib knows; pass an "
            "nnsight LanguageModel instead (NNsightBackend(LanguageModel(...)))"
        )
    if spec.family == "random":
        raise BackendUnavailableError(
            f"{name!r} is a random TransformerLens model with no Hugging Face form; "
            "the nnsight backend runs Hugging Face models (use 'engine' or 'bridge')"
        )
    if spec.family == "gguf":
        return str(models.prepare_model(name, verbose=False))
    return spec.source


class NNsightModel:
    """A Hugging Face model under nnsight, shaped like a mechlib model for the techniques' checks:
    ``cfg`` (``n_layers``, ``n_heads``, ``n_key_value_heads``, ``d_head``, ``d_vocab``, ``n_ctx``),
    ``tokenizer``, ``to_tokens``, ``to_str_tokens``; techniques run it on its :attr:`backend`.

    Example:
        >>> big = NNsightModel("meta-llama/Llama-3.1-70B", remote=True)           # doctest: +SKIP
        >>> patch(big, clean, corrupted, metric, "head_out")                      # doctest: +SKIP
    """

    def __init__(self, lm: Any, remote: bool = False) -> None:
        if remote:
            _check_ndif()  # before anything else: offline, fail at once with what to do
        if isinstance(lm, str):
            lm = language_model(lm) if not remote else _remote_language_model(lm)
        self.lm = lm
        self.backend = NNsightBackend(lm, remote=remote)
        c = lm.config
        self.cfg = SimpleNamespace(
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            d_model=c.hidden_size,
            n_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            d_head=self.backend.d_head,
            d_vocab=c.vocab_size,
            n_ctx=getattr(c, "max_position_embeddings", 10**9),
            attn_only=False,
            model_name=getattr(c, "_name_or_path", "hf-model"),
        )
        self.tokenizer = getattr(lm, "tokenizer", None)

    def to_tokens(self, text: Any) -> torch.Tensor:
        ids = self.tokenizer(text, return_tensors="pt", padding=True)["input_ids"]
        return ids if ids.ndim == 2 else ids[None]

    def to_str_tokens(self, tokens: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in torch.as_tensor(tokens).reshape(-1)]

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:
        return f"NNsightModel({self.cfg.model_name}, remote={self.backend.remote})"


def _remote_language_model(repo_id: str) -> Any:
    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(repo_id)  # meta weights only: the model runs on NDIF


class NNsightBackend(Backend):
    """Runs intervention lists in ``nnsight`` traces (see the module docstring).

    Args:
        lm: An ``nnsight.LanguageModel`` of a Llama-style model.
        remote: Execute on NDIF instead of locally (needs network access and an NDIF API key).
    """

    name = "nnsight"
    unsupported_points = ("pattern",)

    def __init__(self, lm: Any, remote: bool = False) -> None:
        if not isinstance(remote, bool):
            raise TypeError(f"remote must be True or False, got {remote!r}")
        cfg = lm.config
        shim = SimpleNamespace(
            cfg=SimpleNamespace(
                n_layers=cfg.num_hidden_layers,
                n_heads=cfg.num_attention_heads,
                n_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                attn_only=False,
                d_vocab=cfg.vocab_size,
                n_ctx=getattr(cfg, "max_position_embeddings", 10**9),
            )
        )
        super().__init__(shim)
        self.lm = lm
        self.remote = remote
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        try:
            layers = lm.model.layers
            _ = layers[0].self_attn.o_proj, layers[0].mlp
        except Exception as e:
            raise BackendUnavailableError(
                f"the nnsight backend maps hook points onto Llama-style modules (model.layers[i].self_attn.o_proj, "
                f".mlp); {type(lm).__name__} of {cfg.model_type!r} has another layout"
            ) from e
        if remote:
            _check_ndif()
            import nnsight

            import mechlib.backends.nnsight as this
            import mechlib.interventions as language

            for module in (language, this):  # NDIF has no mechlib: ship the intervention code by value
                nnsight.register(module)

    @classmethod
    def for_bridge(cls, model: Any, remote: bool = False) -> "NNsightBackend":
        """The nnsight backend on the Hugging Face form of a mechlib bridge (e.g. SmolLM2's cached folder)."""
        return cls(language_model(_hf_source(model)), remote=remote)

    def why_unsupported(self, point: str) -> str:
        return (
            "Hugging Face's fused attention computes attention probabilities inside one kernel, with no module "
            "to read or set them; use backend='engine' or 'bridge' for pattern interventions"
        )

    # ---- running -------------------------------------------------------------------------

    def _cache(self, runs: dict[str, RunSpec], hooks: list[str]) -> Runs:
        for h in hooks:
            point = point_of_hook(h)[0]
            if point.name in self.unsupported_points:
                raise BackendUnavailableError(
                    f"the nnsight backend cannot read {h!r}: {self.why_unsupported(point.name)}"
                )
        sites = []
        for h in hooks:
            point, layer = point_of_hook(h)
            sites.append(Intervention(Site(point.name, layer), Record(h)))
        out = Runs({}, {}, {})
        for name, spec in runs.items():
            tokens = spec.tokens
            B, T = tokens.shape
            recs: dict = {}
            plan = Plan([list(spec.interventions) + sites], B)  # edits first: records read the edited run
            logits = self._trace(tokens, plan, T, Sources(out.acts), recs, last_only=False)
            out.tokens[name], out.logits[name] = tokens, logits
            out.acts[name] = {h: recs[(0, h)] for h in hooks}
        return out

    def _call(
        self,
        runs: Runs,
        base: str,
        lists,
        plan: Plan,
        sources: Sources,
        records: dict,
        last_only: bool,
        want_logits: bool,
    ) -> Optional[torch.Tensor]:
        tokens = runs.row_tokens(base, len(lists))
        return self._trace(tokens, plan, runs.n_pos, sources, records, last_only)

    def _trace(
        self, tokens: torch.Tensor, plan: Plan, T: int, sources: Sources, records: dict, last_only: bool
    ) -> torch.Tensor:
        lm = self.lm
        by_layer: dict[Optional[int], set[str]] = {}
        for h in plan.hooks:
            point, layer = point_of_hook(h)
            by_layer.setdefault(layer, set()).add(point.name)
        H, K, dh = self.n_heads, self.n_kv, self.d_head

        def edit(hook, x, heads=None):
            if heads is None:
                return plan.apply(hook, x, 0, T, sources, records)
            N, S, _ = x.shape
            return plan.apply(hook, x.reshape(N, S, heads, dh), 0, T, sources, records).reshape(N, S, heads * dh)

        with torch.no_grad(), lm.trace(tokens, remote=self.remote):
            if None in by_layer:
                lm.model.embed_tokens.output = edit("hook_embed", lm.model.embed_tokens.output)
            for layer in sorted(k for k in by_layer if k is not None):
                pts = by_layer[layer]
                p = f"blocks.{layer}."
                blk = lm.model.layers[layer]
                attn, mlp = blk.self_attn, blk.mlp
                r = None
                if "resid_pre" in pts or "resid_mid" in pts:
                    r = blk.input
                    if "resid_pre" in pts:
                        r = edit(p + "hook_resid_pre", r)
                        blk.input = r
                for name, mod, heads in (("q", attn.q_proj, H), ("k", attn.k_proj, K), ("v", attn.v_proj, K)):
                    if name in pts:
                        mod.output = edit(p + POINTS[name].hook, mod.output, heads)
                if "z" in pts:
                    attn.o_proj.input = edit(p + "attn.hook_z", attn.o_proj.input, H)
                if "attn_out" in pts or "resid_mid" in pts:
                    a = attn.o_proj.output
                    if "attn_out" in pts:
                        a = edit(p + "hook_attn_out", a)
                    if "resid_mid" in pts:
                        a = edit(p + "hook_resid_mid", r + a) - r
                    attn.o_proj.output = a
                if "mlp_pre" in pts:
                    mlp.gate_proj.output = edit(p + "mlp.hook_pre", mlp.gate_proj.output)
                if "mlp_post" in pts:
                    mlp.down_proj.input = edit(p + "mlp.hook_post", mlp.down_proj.input)
                if "mlp_out" in pts:
                    mlp.output = edit(p + "hook_mlp_out", mlp.output)
                if "resid_post" in pts:
                    o = blk.output
                    if isinstance(o, tuple):
                        blk.output = (edit(p + "hook_resid_post", o[0]),) + tuple(o[1:])
                    else:
                        blk.output = edit(p + "hook_resid_post", o)
            logits = lm.lm_head.output
            logits = (logits[:, -1:] if last_only else logits).save()
        return logits.detach() if isinstance(logits, torch.Tensor) else logits.value.detach()

    def gradients(self, tokens, hooks, scalar):
        raise NotImplementedError(
            "the nnsight backend does not compute attribution gradients yet; "
            "use backend='engine' or 'bridge' for attribution patching"
        )


def _check_ndif(timeout: float = 3.0) -> None:
    """Fail at once, with what to do, when NDIF cannot be reached (no network, no API key)."""
    from nnsight import CONFIG

    host = urlparse(CONFIG.API.HOST).hostname or CONFIG.API.HOST
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise BackendUnavailableError(
            f"remote=True runs on NDIF ({CONFIG.API.HOST}), which cannot be reached from here ({e}); remote "
            "execution needs network access and an NDIF API key (nnsight.CONFIG.set_default_api_key(...)). "
            "Run locally with remote=False, or on a machine with access."
        ) from e
    if not CONFIG.API.APIKEY:
        raise BackendUnavailableError(
            "remote=True needs an NDIF API key: nnsight.CONFIG.set_default_api_key('...') "
            "(get one at https://login.ndif.us)"
        )
