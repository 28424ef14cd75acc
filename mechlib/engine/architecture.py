"""Which architectures the engine mirrors, and the per-architecture parts it reads from the bridge.

* :func:`check_supported`: refuse (:class:`UnsupportedModelError`) anything the mirror does not
  reproduce exactly: soft caps, parallel blocks, local attention, attention sinks, ...;
* :func:`act_fn`: the MLP activation by name;
* :func:`gemma_extras`: Gemma 3's additions to a Llama-style block (embedding scale, query/key
  norms, post-sublayer norms, sliding-window layers, per-layer attention scales);
* :func:`make_rope`: the rotary embedding, from the model's own rotary module.

Adding an architecture: make :func:`check_supported` accept it, read its extra weights here, and
apply them in :meth:`mechlib.engine.forward.Engine._forward`; ``tests/test_engine.py`` compares
every hook with the bridge's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mechlib.types import Model

__all__ = [
    "UnsupportedModelError",
    "check_supported",
    "unmirrored_parts",
    "act_fn",
    "GemmaExtras",
    "gemma_extras",
    "make_rope",
    "rotate_half_split",
]


class UnsupportedModelError(NotImplementedError):
    """The engine cannot mirror this model's architecture exactly."""


def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function ``cfg.act_fn`` names, as the bridge computes it."""
    name = (name or "").lower()
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise UnsupportedModelError(f"activation {name!r} is not mirrored")


def rotate_half_split(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last axis: ``[-x2, x1]`` (Hugging Face's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_supported(model: Model) -> None:
    """Raise :class:`UnsupportedModelError` naming every part of ``model`` the mirror does not reproduce."""
    cfg = model.cfg
    if not getattr(model, "compatibility_mode", False):
        raise UnsupportedModelError(
            "the engine mirrors compatibility-mode numerics; load the model with "
            "mechlib.load_model (or call model.enable_compatibility_mode())"
        )
    problems = []
    if getattr(cfg, "output_logits_soft_cap", -1.0) not in (-1.0, 0.0, None):
        problems.append("output logit soft cap")
    if getattr(cfg, "attn_scores_soft_cap", -1.0) not in (-1.0, 0.0, None):
        problems.append("attention score soft cap")
    if getattr(cfg, "parallel_attn_mlp", False):
        problems.append("parallel attention and MLP")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaled by inverse layer index")
    if getattr(cfg, "use_local_attn", False) or getattr(cfg, "window_size", None):
        problems.append("local attention")
    if getattr(cfg, "use_normalization_before_and_after", False) or getattr(cfg, "post_embedding_ln", False):
        problems.append("extra normalisation layers")
    if getattr(cfg, "scale_embedding", None):
        problems.append("scaled embeddings")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append("bidirectional attention")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional embedding {cfg.positional_embedding_type!r}")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture of experts")
    problems += unmirrored_parts(model)
    if problems:
        raise UnsupportedModelError(
            f"{cfg.model_name}: the engine does not mirror {', '.join(problems)}; "
            "use the bridge's hooks (mechlib falls back to them automatically)"
        )


def unmirrored_parts(model: Model) -> list[str]:
    """Parts of the bridge's modules the mirror does not reproduce (Gemma-era additions)."""
    problems = []
    blocks = list(model.blocks)
    block0, attn0 = blocks[0], blocks[0].attn
    hf_attn = getattr(attn0, "original_component", None)
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    if getattr(model.cfg, "use_qk_norm", False) and not hasattr(attn0, "q_norm"):
        problems.append("query/key normalisation")
    if hasattr(attn0, "q_norm") != hasattr(attn0, "k_norm"):
        problems.append("a query norm without a key norm")
    if hasattr(attn0, "q_norm"):
        w = attn0.q_norm.original_component.weight
        if (
            w.ndim != 1
            or getattr(attn0, "_qk_norm_phase", "post_reshape") != "post_reshape"
            or getattr(model.cfg, "qk_norm_after_rope", False)
        ):
            problems.append("query/key norms other than per-head RMSNorm before rotary")
    if hasattr(block0, "ln1_post") != hasattr(block0, "ln2_post") and not model.cfg.attn_only:
        problems.append("a post-attention norm without a post-MLP norm")
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, attr, None) not in (None, 0, 0.0):
            problems.append(attr.replace("_", " "))
    if hf_attn is not None and getattr(hf_attn, "sinks", None) is not None:
        problems.append("attention sinks")
    if getattr(hf_config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if getattr(hf_config, "sliding_window", None) and not getattr(hf_config, "layer_types", None):
        problems.append("sliding windows without per-layer types")
    types = set(getattr(hf_config, "layer_types", None) or ())
    if types - {"sliding_attention", "full_attention"}:
        problems.append(f"layer types {sorted(types)}")
    if getattr(model.cfg, "rmsnorm_uses_offset", False):
        # The pre-norms are folded into the next weights in compatibility mode: (1 + w) == 1.
        norms = [b.ln1 for b in blocks] + ([b.ln2 for b in blocks] if not model.cfg.attn_only else [])
        norms.append(model.ln_final)
        if any(bool(n.original_component.weight.detach().any()) for n in norms):
            problems.append("unfolded offset RMSNorm weights")
    return problems


@dataclass
class GemmaExtras:
    """Gemma 3's additions to a Llama-style block, as the bridge applies them (see :func:`gemma_extras`).

    Attributes:
        embed_scale: The embedding's ``sqrt(d_model)`` factor, or ``None``.
        qk_norm: Whether queries and keys get a per-head RMSNorm before rotary.
        q_norm_w, k_norm_w: Their per-layer weights (``1 + w`` for offset norms; empty when absent).
        post_norms: Whether attention and MLP outputs get an RMSNorm before joining the residual.
        post_attn_w, post_mlp_w: Their per-layer weights (empty when absent).
        layer_types: Per-layer rotary variant (``"sliding_attention"``/``"full_attention"``) or ``None``.
        layer_window: Per-layer sliding window, or ``None`` for global layers.
        layer_scale: Per-layer attention score scale.
    """

    embed_scale: Optional[torch.Tensor]
    qk_norm: bool
    q_norm_w: list[torch.Tensor]
    k_norm_w: list[torch.Tensor]
    post_norms: bool
    post_attn_w: list[torch.Tensor]
    post_mlp_w: list[torch.Tensor]
    layer_types: Optional[list[str]]
    layer_window: list[Optional[int]]
    layer_scale: list[float]


def gemma_extras(model: Model, *, scale: float, dtype: torch.dtype) -> GemmaExtras:
    """Read Gemma 3's additions from the bridge's modules (all absent, one ``scale`` for every
    layer, on Llama- and GPT-2-style models)."""
    cfg = model.cfg
    n_layers, attn_only = int(cfg.n_layers), bool(cfg.attn_only)
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    hf_config = getattr(getattr(model, "original_model", None), "config", None)

    def norm_weight(bridge) -> torch.Tensor:
        w = bridge.original_component.weight.detach()
        return 1.0 + w if offset else w

    embed_scale = None
    embed = getattr(getattr(model, "embed", None), "original_component", None)
    if getattr(embed, "embed_scale", None) is not None:
        embed_scale = embed.embed_scale.to(dtype)
    blocks = list(model.blocks)
    qk_norm = hasattr(blocks[0].attn, "q_norm")
    post_norms = hasattr(blocks[0], "ln1_post")
    layer_types = getattr(hf_config, "layer_types", None)
    layer_types = list(layer_types) if layer_types else None
    window = getattr(hf_config, "sliding_window", None)
    layer_scale = [scale] * n_layers
    if qk_norm or post_norms or embed_scale is not None:  # Gemma: HF's own scale
        hf_scales = [getattr(getattr(b.attn, "original_component", None), "scaling", None) for b in blocks]
        layer_scale = [scale if sc is None else float(sc) for sc in hf_scales]
    return GemmaExtras(
        embed_scale=embed_scale,
        qk_norm=qk_norm,
        q_norm_w=[norm_weight(b.attn.q_norm) for b in blocks] if qk_norm else [],
        k_norm_w=[norm_weight(b.attn.k_norm) for b in blocks] if qk_norm else [],
        post_norms=post_norms,
        post_attn_w=[norm_weight(b.ln1_post) for b in blocks] if post_norms else [],
        post_mlp_w=[norm_weight(b.ln2_post) for b in blocks] if post_norms and not attn_only else [],
        layer_types=layer_types,
        layer_window=[
            window if layer_types and layer_types[l] == "sliding_attention" else None for l in range(n_layers)
        ],
        layer_scale=layer_scale,
    )


def make_rope(
    model: Model, *, d_head: int, dtype: torch.dtype, device: torch.device, layer_types: Optional[list[str]] = None
) -> Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]]:
    """``rope(q, k, positions, layer=0) -> (q, k)`` rotating queries and keys ``[N, head, S, d_head]``
    as the model does, or ``None`` for a model without rotary positions. Uses the model's own
    ``apply_rope`` or its Hugging Face ``rotary_emb`` module (per layer type on Gemma 3)."""
    if model.cfg.positional_embedding_type != "rotary":
        return None
    orig = model.original_model
    native = getattr(orig, "rotary", None)
    if native is not None and hasattr(native, "apply_rope"):

        def rope_native(q, k, positions, layer=0):
            return native.apply_rope(q, k, position_ids=positions[None])

        return rope_native
    rot = None
    for name, mod in orig.named_modules():
        if name.endswith("rotary_emb"):
            rot = mod
            break
    if rot is None:
        raise UnsupportedModelError("rotary model without a recognised rotary embedding module")
    rot = getattr(rot, "_original_component", rot)
    cache: dict[tuple[int, Optional[str]], tuple[torch.Tensor, torch.Tensor]] = {}
    per_type = layer_types is not None and "layer_type" in inspect.signature(rot.forward).parameters

    def rope_hf(q, k, positions, layer=0):
        n = int(positions[-1]) + 1
        kind = layer_types[layer] if per_type else None  # Gemma 3: a rotary base per layer type
        if (n, kind) not in cache:
            dummy = torch.zeros(1, n, d_head, dtype=dtype, device=device)
            args = (dummy, torch.arange(n, device=device)[None]) + ((kind,) if per_type else ())
            cos, sin = rot(*args)
            if not any(key[0] == n for key in cache):
                cache.clear()
            cache[(n, kind)] = (cos[0].to(dtype), sin[0].to(dtype))
        cos, sin = cache[(n, kind)]
        cos, sin = cos[positions], sin[positions]  # [S, rd]
        rd = cos.shape[-1]

        def apply(x):
            xr, xp = x[..., :rd], x[..., rd:]
            xr = xr * cos + rotate_half_split(xr) * sin
            return torch.cat([xr, xp], dim=-1) if xp.shape[-1] else xr

        return apply(q), apply(k)

    return rope_hf
