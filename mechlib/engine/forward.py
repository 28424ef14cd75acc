"""The engine's forward pass: the :class:`Engine` class and its per-model cache, :func:`get_engine`.

The package docstring (:mod:`mechlib.engine`) says what the engine is for. This module holds the
forward math only: the weights in fused layouts, the blocks, the unembedding, and the run /
resume / resume_rows entry points. What each architecture adds lives in
:mod:`mechlib.engine.architecture`; the records of a run in :mod:`mechlib.engine.runs`.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Iterable, Optional, Union

import torch
from jaxtyping import Float, Int

from mechlib.engine.architecture import UnsupportedModelError, act_fn, check_supported, gemma_extras, make_rope
from mechlib.engine.runs import HOOKS_PER_LAYER, BaseRun, EditContext, EditFn
from mechlib.precision import check as check_precision
from mechlib.precision import resolve as resolve_precision
from mechlib.types import Model

__all__ = ["Engine", "get_engine"]


def _affine(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ w + b``; with bfloat16 weights (the ``bfloat16`` precision) the product takes bfloat16
    inputs, accumulates in float32 and comes back in ``x``'s dtype."""
    y = x @ w if w.dtype == x.dtype else (x.to(w.dtype) @ w).to(x.dtype)
    return y if b is None else y + b


# Hooks of the top block that fire after its queries: when only the last position's logits are
# wanted and none of these is edited, the top block computes them for the last position only.
_AFTER_QUERY = HOOKS_PER_LAYER[HOOKS_PER_LAYER.index("attn.hook_pattern") :]


class Engine:
    """Mirror of a ``TransformerBridge`` for batched, prefix-reusing interventions.

    Args:
        model: A bridge loaded by :func:`mechlib.models.load_model` (compatibility mode on).
        precision: ``"float32"`` (the default: the bridge's own arithmetic) or ``"bfloat16"``
            (the blocks' and the unembedding's matrix multiplies take bfloat16 inputs and
            weights; see :mod:`mechlib.precision`).

    Raises:
        UnsupportedModelError: The architecture uses something the mirror does not
            reproduce (soft caps, embedding scaling, parallel attention, ...).
        ValueError: An unknown ``precision``, or ``"bfloat16"`` for a model that is not float32.
    """

    def __init__(self, model: Model, precision: str = "float32") -> None:
        cfg = model.cfg
        self.precision = check_precision(precision)
        self._model_ref = weakref.ref(model)
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head = cfg.d_head
        self.d_model = cfg.d_model
        check_supported(model)
        self.dtype = model.W_E.dtype
        self.device = model.W_E.device
        self.eps = float(cfg.eps)
        self.rms = bool(getattr(cfg, "uses_rms_norm", False)) or str(cfg.normalization_type).startswith("RMS")
        self.final_rms = bool(getattr(cfg, "final_rms", False)) or self.rms
        self.attn_only = bool(cfg.attn_only)
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        self.act = None if self.attn_only else act_fn(cfg.act_fn)
        self.scale = 1.0 / math.sqrt(self.d_head) if cfg.use_attn_scale else 1.0
        if cfg.use_attn_scale and getattr(cfg, "attn_scale", -1.0) not in (-1.0, None):
            self.scale = 1.0 / float(cfg.attn_scale)
        # Gemma 3's extras (embed_scale, qk_norm, q_norm_w, ..., layer_scale) become attributes.
        self.__dict__.update(vars(gemma_extras(model, scale=self.scale, dtype=self.dtype)))

        with torch.no_grad():
            self.W_E = model.W_E.detach()
            self.W_pos = model.W_pos.detach() if cfg.positional_embedding_type == "standard" else None
            self.W_U = model.W_U.detach()
            self.b_U = self._opt(lambda: model.b_U, (self.W_U.shape[1],))
            H, K, dh, d = self.n_heads, self.n_kv, self.d_head, self.d_model
            WQ, WK, WV, WO = model.W_Q.detach(), model.W_K.detach(), model.W_V.detach(), model.W_O.detach()
            bQ = self._opt(lambda: model.b_Q, (self.n_layers, H, dh))
            bK = self._opt(lambda: model.b_K, (self.n_layers, K, dh))
            bV = self._opt(lambda: model.b_V, (self.n_layers, K, dh))
            bO = self._opt(lambda: model.b_O, (self.n_layers, d))
            self.W_qkv, self.b_qkv, self.W_o, self.b_o = [], [], [], []
            for l in range(self.n_layers):
                w = torch.cat(
                    [
                        WQ[l].permute(1, 0, 2).reshape(d, H * dh),
                        WK[l].permute(1, 0, 2).reshape(d, K * dh),
                        WV[l].permute(1, 0, 2).reshape(d, K * dh),
                    ],
                    dim=1,
                )
                self.W_qkv.append(w.contiguous())
                self.b_qkv.append(torch.cat([bQ[l].reshape(-1), bK[l].reshape(-1), bV[l].reshape(-1)]))
                self.W_o.append(WO[l].reshape(H * dh, d).contiguous())
                self.b_o.append(bO[l])
            self.W_mlp_in, self.b_mlp_in, self.W_mlp_out, self.b_mlp_out = [], [], [], []
            if not self.attn_only:
                W_in, W_out = model.W_in.detach(), model.W_out.detach()
                m = W_in.shape[-1]
                b_in = self._opt(lambda: model.b_in, (self.n_layers, m))
                b_out = self._opt(lambda: model.b_out, (self.n_layers, d))
                W_gate = model.W_gate.detach() if self.gated else None
                for l in range(self.n_layers):
                    if self.gated:
                        # [gate | in] in one matmul; TL: post = act(x @ W_gate) * (x @ W_in + b_in)
                        self.W_mlp_in.append(torch.cat([W_gate[l], W_in[l]], dim=1).contiguous())
                        self.b_mlp_in.append(torch.cat([torch.zeros_like(b_in[l]), b_in[l]]))
                    else:
                        self.W_mlp_in.append(W_in[l].contiguous())
                        self.b_mlp_in.append(b_in[l])
                    self.W_mlp_out.append(W_out[l].contiguous())
                    self.b_mlp_out.append(b_out[l])
            # zero biases (e.g. Llama-style models) are dropped: adding them costs time, not values
            nz = lambda b: None if b is None or not bool(b.any()) else b  # noqa: E731
            self.b_U = nz(self.b_U)
            self.b_qkv = [nz(b) for b in self.b_qkv]
            self.b_o = [nz(b) for b in self.b_o]
            self.b_mlp_in = [nz(b) for b in self.b_mlp_in]
            self.b_mlp_out = [nz(b) for b in self.b_mlp_out]
            if self.precision != "float32":
                if self.dtype != torch.float32:
                    raise ValueError(
                        f"precision={self.precision!r} needs a float32 model, this one is {self.dtype}; "
                        "load it in float32 or use precision='float32'"
                    )
                low = lambda ws: [w.to(torch.bfloat16) for w in ws]  # noqa: E731
                self.W_qkv, self.W_o = low(self.W_qkv), low(self.W_o)
                self.W_mlp_in, self.W_mlp_out = low(self.W_mlp_in), low(self.W_mlp_out)
                self.W_U = self.W_U.to(torch.bfloat16)
        #: ``rope(q, k, positions, layer=0)`` or ``None`` (:func:`mechlib.engine.architecture.make_rope`).
        self.rope = make_rope(
            model, d_head=self.d_head, dtype=self.dtype, device=self.device, layer_types=self.layer_types
        )

    @property
    def extras(self) -> tuple[str, ...]:
        """The Gemma-3-style parts this model uses beyond a Llama/GPT-2 block, e.g.
        ``("embed_scale", "qk_norm", "post_norms", "sliding_window", "attn_scale")``; ``()`` for
        Llama- and GPT-2-style models. Code that re-derives the forward pass from the engine's
        weights must handle these or refuse the model."""
        parts = []
        if self.embed_scale is not None:
            parts.append("embed_scale")
        if self.qk_norm:
            parts.append("qk_norm")
        if self.post_norms:
            parts.append("post_norms")
        if any(w is not None for w in self.layer_window):
            parts.append("sliding_window")
        if any(sc != self.scale for sc in self.layer_scale):
            parts.append("attn_scale")
        return tuple(parts)

    @property
    def model(self):
        """The bridge this engine mirrors (held weakly, so engines never keep models alive)."""
        return self._model_ref()

    # ---- set-up ------------------------------------------------------------------------

    def _opt(self, getter: Callable[[], Optional[torch.Tensor]], shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = getter()
        except AttributeError:
            t = None
        if t is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        return t.detach()

    # ---- core --------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, rms: bool) -> torch.Tensor:
        if rms:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def embed(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
        x = self._token_embed(tokens)
        if self.W_pos is not None:
            x = x + self.W_pos[: tokens.shape[1]]
        return x

    def _token_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``hook_embed``: the token embeddings (times Gemma's ``sqrt(d_model)`` factor)."""
        x = self.W_E[tokens]
        return x if self.embed_scale is None else x * self.embed_scale

    def position_qk(
        self, l: int, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``l``'s queries and keys ``[N, head, S, d_head]`` made ready for the scores: Gemma 3's
        per-head RMSNorm, then rotary at ``positions`` (each a no-op where the model has none)."""
        if self.qk_norm:  # Gemma 3: RMSNorm over each head's query and key, before rotary
            q = (self._norm(q, True).float() * self.q_norm_w[l]).to(q.dtype)
            k = (self._norm(k, True).float() * self.k_norm_w[l]).to(k.dtype)
        if self.rope is not None:
            q, k = self.rope(q, k, positions, l)
        return q, k

    def window_mask(self, l: int, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The causal ``mask [S, T]`` (queries at ``positions``, keys ``0..T-1``) restricted to layer
        ``l``'s sliding window, if it has one."""
        w, T = self.layer_window[l], mask.shape[-1]
        if w is None or T <= w:
            return mask
        return mask & (positions[:, None] - torch.arange(T, device=mask.device)[None] < w)

    def _post_norm(self, x: torch.Tensor, weights: list[torch.Tensor], l: int) -> torch.Tensor:
        """Gemma's RMSNorm after a sublayer (before it joins the residual); identity elsewhere."""
        if not weights:
            return x
        return (self._norm(x, True).float() * weights[l]).to(x.dtype)

    def unembed(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
        """Final norm and unembedding of a residual-stream tensor."""
        return _affine(self._norm(resid, self.final_rms), self.W_U, self.b_U)

    def mlp(self, layer: int, resid_mid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """Block ``layer``'s MLP output (``hook_mlp_out``) for a ``hook_resid_mid`` tensor."""
        if self.attn_only:
            raise ValueError("this model is attention-only: it has no MLPs")
        return self._mlp(layer, resid_mid)

    def _mlp(
        self, l: int, resid_mid: torch.Tensor, fire: Optional[Callable[[str, torch.Tensor, int], torch.Tensor]] = None
    ) -> torch.Tensor:
        """Block ``l``'s MLP; ``fire(name, act, layer)`` runs its hook points (none by default)."""
        p = f"blocks.{l}."
        x = self._norm(resid_mid, self.rms)
        h = _affine(x, self.W_mlp_in[l], self.b_mlp_in[l])
        if self.gated:
            m = h.shape[-1] // 2
            gate, lin = h[..., :m], h[..., m:]
            if fire is not None:
                gate = fire(p + "mlp.hook_pre", gate, l)
            post = self.act(gate) * lin
        else:
            if fire is not None:
                h = fire(p + "mlp.hook_pre", h, l)
            post = self.act(h)
        if fire is not None:
            post = fire(p + "mlp.hook_post", post, l)
        return self._post_norm(_affine(post, self.W_mlp_out[l], self.b_mlp_out[l]), self.post_mlp_w, l)

    def _forward(
        self,
        resid: torch.Tensor,
        start_layer: int,
        start_pos: int,
        prefix_keys: Optional[list[torch.Tensor]],
        prefix_values: Optional[list[torch.Tensor]],
        base_index: torch.Tensor,
        edits: dict[str, EditFn],
        keep: Optional[set[str]],
        stop_layer: Optional[int] = None,
        rows: Optional[torch.Tensor] = None,
        last_at_top: bool = False,
    ):
        """Run blocks ``start_layer..`` on positions ``start_pos..`` of ``resid``.

        With ``last_at_top`` the top block computes keys and values for every position but its
        queries and everything after them for the last position only (the caller wants only
        the last position's logits and edits none of the top block's hooks after its queries);
        the returned residual then has that one position.

        Returns the final residual, the kept activations, and the new keys/values per layer.
        """
        N, S, d = resid.shape
        H, K, dh = self.n_heads, self.n_kv, self.d_head
        T = start_pos + S
        positions = torch.arange(start_pos, T, device=resid.device)
        mask = torch.ones(S, T, dtype=torch.bool, device=resid.device).tril(diagonal=start_pos)
        kept: dict[str, torch.Tensor] = {}
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        want_all = keep is not None and "*" in keep

        def fire(name: str, act: torch.Tensor, layer: int) -> torch.Tensor:
            fn = edits.get(name)
            if fn is not None:
                out = fn(act, EditContext(name, layer, start_pos, base_index, rows))
                if out is not None:
                    if out.shape != act.shape:
                        raise ValueError(
                            f"edit at {name} returned shape {tuple(out.shape)}, expected {tuple(act.shape)}"
                        )
                    act = out
            if keep is not None and (want_all or name in keep):
                kept[name] = act
            return act

        needs = set(edits) | (keep or set())
        stop = self.n_layers if stop_layer is None else stop_layer
        # Prefix keys/values belong to the base run's rows: gather them unless the rows are
        # exactly the base's rows in order (a same-sized but permuted base_index must gather).
        gather = start_pos > 0 and not (
            prefix_keys[start_layer if start_layer < stop else 0].shape[0] == N
            and torch.equal(base_index.cpu(), torch.arange(N))
        )
        for l in range(start_layer, stop):
            p = f"blocks.{l}."
            resid = fire(p + "hook_resid_pre", resid, l)
            x = self._norm(resid, self.rms)
            qkv = _affine(x, self.W_qkv[l], self.b_qkv[l])
            q = qkv[..., : H * dh].view(N, S, H, dh)
            k = qkv[..., H * dh : (H + K) * dh].view(N, S, K, dh)
            v = qkv[..., (H + K) * dh :].view(N, S, K, dh)
            if want_all or needs & {p + "attn.hook_q", p + "attn.hook_k", p + "attn.hook_v"}:
                q = fire(p + "attn.hook_q", q, l)
                k = fire(p + "attn.hook_k", k, l)
                v = fire(p + "attn.hook_v", v, l)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, head, S, dh]
            q, k = self.position_qk(l, q, k, positions)
            if start_pos > 0:
                pk, pv = prefix_keys[l], prefix_values[l]
                if gather:
                    pk, pv = pk[base_index], pv[base_index]
                k = torch.cat([pk[:, :, :start_pos], k], dim=2)
                v = torch.cat([pv[:, :, :start_pos], v], dim=2)
            new_k.append(k)
            new_v.append(v)
            m_l = self.window_mask(l, mask, positions)
            if last_at_top and l == self.n_layers - 1 and resid.shape[1] > 1:
                q, resid, m_l = q[:, :, -1:], resid[:, -1:], m_l[-1:]
            if K != H:
                k = k.repeat_interleave(H // K, dim=1)
                v = v.repeat_interleave(H // K, dim=1)
            scores = (q @ k.transpose(-1, -2)) * self.layer_scale[l]
            scores = scores.masked_fill(~m_l, float("-inf"))
            pattern = scores.softmax(-1)
            pattern = fire(p + "attn.hook_pattern", pattern, l)
            z = (pattern @ v).transpose(1, 2)  # [N, S, head, dh]
            z = fire(p + "attn.hook_z", z, l)
            attn_out = _affine(z.reshape(N, z.shape[1], H * dh), self.W_o[l], self.b_o[l])
            attn_out = self._post_norm(attn_out, self.post_attn_w, l)
            attn_out = fire(p + "hook_attn_out", attn_out, l)
            resid = resid + attn_out
            if not self.attn_only:
                resid = fire(p + "hook_resid_mid", resid, l)
                mlp_out = fire(p + "hook_mlp_out", self._mlp(l, resid, fire), l)
                resid = resid + mlp_out
            resid = fire(p + "hook_resid_post", resid, l)
        return resid, kept, new_k, new_v

    # ---- public API ---------------------------------------------------------------------

    def check_hook_names(self, names: Iterable[str]) -> None:
        """Raise ``KeyError`` naming any hook the mirror cannot fire, with examples."""
        valid = {f"blocks.{l}.{h}" for l in range(self.n_layers) for h in HOOKS_PER_LAYER}
        if self.attn_only:
            valid -= {
                f"blocks.{l}.{h}"
                for l in range(self.n_layers)
                for h in ("hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out")
            }
        valid.add("hook_embed")
        bad = [n for n in names if n not in valid]
        if bad:
            raise KeyError(
                f"hook name(s) {bad} do not exist on this model ({self.n_layers} layers"
                f"{', attention only' if self.attn_only else ''}); valid names look like "
                "'blocks.3.attn.hook_z', 'blocks.3.hook_resid_pre', 'blocks.3.hook_mlp_out'"
            )

    @torch.inference_mode()
    def run(
        self,
        tokens: Optional[Int[torch.Tensor, "batch pos"]] = None,
        *,
        embed: Optional[Float[torch.Tensor, "batch pos d_model"]] = None,
        edits: Optional[dict[str, EditFn]] = None,
        keep: Optional[Iterable[str]] = ("*",),
    ) -> BaseRun:
        """A full forward pass, caching activations (all by default) and keys/values.

        Args:
            tokens: Input tokens; or pass ``embed`` (the residual entering block 0) instead,
                e.g. noised embeddings for causal tracing.
            embed: ``[batch, pos, d_model]`` residual entering block 0, instead of ``tokens``.
            edits: ``{hook_name: fn(act, ctx) -> act}`` interventions.
            keep: Hook names to cache (``"*"`` for all, ``None`` or ``()`` for none).

        Returns:
            A :class:`BaseRun` to resume from.
        """
        return self._run(tokens, embed=embed, edits=edits, keep=keep)

    def run_with_grad(self, tokens: Optional[Int[torch.Tensor, "batch pos"]] = None, **kwargs) -> BaseRun:
        """:meth:`run` outside inference mode, so autograd can flow (attribution patching).

        The weights never require grad; to get gradients with respect to an activation, let an
        edit add a zero leaf tensor that requires grad (``act + leaf``) and backpropagate to it.
        Takes the same arguments as :meth:`run`.
        """
        with torch.enable_grad():
            return self._run(tokens, **kwargs)

    def _run(
        self,
        tokens: Optional[Int[torch.Tensor, "batch pos"]] = None,
        *,
        embed: Optional[Float[torch.Tensor, "batch pos d_model"]] = None,
        edits: Optional[dict[str, EditFn]] = None,
        keep: Optional[Iterable[str]] = ("*",),
    ) -> BaseRun:
        if (tokens is None) == (embed is None):
            raise ValueError("pass exactly one of tokens or embed")
        edits = dict(edits or {})
        self.check_hook_names(edits)
        keep_set = set(keep) if keep else set()
        tok_embed = None
        if tokens is not None:
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
            if tokens.shape[1] > self.cfg.n_ctx:
                raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of {self.cfg.n_ctx}")
            tokens = tokens.to(self.device)
            tok_embed = self._token_embed(tokens)
            if "hook_embed" in edits:
                tok_embed = edits.pop("hook_embed")(
                    tok_embed, EditContext("hook_embed", -1, 0, torch.arange(tokens.shape[0]))
                )
            embed = tok_embed + self.W_pos[: tokens.shape[1]] if self.W_pos is not None else tok_embed
        elif "hook_embed" in edits:
            raise ValueError("a hook_embed edit needs tokens; edit the embed you pass instead")
        N = embed.shape[0]
        resid, kept, ks, vs = self._forward(embed, 0, 0, None, None, torch.arange(N), edits, keep_set)
        if keep_set and tok_embed is not None:
            kept["hook_embed"] = tok_embed
            kept["ln_final.hook_normalized"] = self._norm(resid, self.final_rms)
        return BaseRun(tokens, resid, self.unembed, kept, ks, vs)

    @torch.inference_mode()
    def resume(
        self,
        base: BaseRun,
        start_layer: int,
        start_pos: int = 0,
        *,
        edits: Optional[dict[str, EditFn]] = None,
        base_index: Optional[Int[torch.Tensor, " batch"]] = None,
        last_only: bool = False,
        resid: Optional[Float[torch.Tensor, "batch suffix d_model"]] = None,
        stop_layer: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Re-run from ``(start_layer, start_pos)`` of a base run with edits; exact.

        Layers below ``start_layer`` and positions before ``start_pos`` are taken from ``base``:
        exact when every edit acts at layer ``>= start_layer`` and position ``>= start_pos``.

        Args:
            base: The cached run to continue.
            start_layer: First block to recompute.
            start_pos: First position to recompute.
            edits: ``{hook_name: fn(act, ctx) -> act}``; ``act`` covers positions
                ``start_pos..`` only, with the batch of ``base_index``.
            base_index: ``[batch]`` which base prompt each row continues (repeat prompts to
                batch many interventions in one call). Default: ``arange(base.n_batch)``.
            last_only: Return only the last position's logits ``[batch, vocab]`` (cheaper).
            resid: The residual entering ``start_layer`` on the suffix, if not the base's.
            stop_layer: Run blocks ``start_layer .. stop_layer - 1`` only and return ``None``
                (for edits that record activations, e.g. path patching's second run).

        Returns:
            Logits ``[batch, pos, vocab]`` (prefix positions copied from the base) or
            ``[batch, vocab]`` with ``last_only``.
        """
        if not 0 <= start_layer <= self.n_layers:
            raise ValueError(f"start_layer must be in [0, {self.n_layers}], got {start_layer}")
        if not 0 <= start_pos < base.n_pos:
            raise ValueError(f"start_pos must be in [0, {base.n_pos}), got {start_pos}")
        edits = dict(edits or {})
        self.check_hook_names(edits)
        if base_index is None:
            base_index = torch.arange(base.n_batch)
        if resid is None:
            name = (
                f"blocks.{start_layer}.hook_resid_pre"
                if start_layer < self.n_layers
                else f"blocks.{self.n_layers - 1}.hook_resid_post"
            )
            resid = base[name][base_index, start_pos:]
        out, _, _, _ = self._forward(
            resid,
            start_layer,
            start_pos,
            base.keys,
            base.values,
            base_index,
            edits,
            None,
            stop_layer=stop_layer,
            last_at_top=last_only and self._top_free(edits),
        )
        if stop_layer is not None:
            return None
        if last_only:
            return self.unembed(out[:, -1])
        logits = self.unembed(out)
        if start_pos == 0:
            return logits
        return torch.cat([base.logits[base_index, :start_pos], logits], dim=1)

    @torch.inference_mode()
    def resume_rows(
        self,
        base: BaseRun,
        start_layers: Union[Int[torch.Tensor, " batch"], list[int]],
        start_pos: int,
        *,
        resid: Float[torch.Tensor, "batch suffix d_model"],
        edits: Optional[dict[str, EditFn]] = None,
        base_index: Optional[Int[torch.Tensor, " batch"]] = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Like :meth:`resume`, but every row starts at its own layer; one call, exact.

        Row ``i`` enters block ``start_layers[i]`` with ``resid[i]`` (its residual stream on
        positions ``start_pos..``) and runs to the top; a row whose start layer is
        ``n_layers`` is only unembedded. Rows are sorted by start layer, so at layer ``l`` the
        rows computed are those with ``start_layers <= l``: each row costs only the layers it
        needs, and all rows share one batched pass per layer. Edit functions receive only the
        rows computed at that layer, with ``ctx.rows`` giving their indices in this call.

        Args:
            base: The cached run supplying the prefix keys/values (positions ``< start_pos``).
            start_layers: ``[batch]`` first block each row recomputes, in ``[0, n_layers]``.
            start_pos: First position recomputed (shared by all rows).
            resid: ``[batch, n_pos - start_pos, d_model]`` the residual entering each row's
                start layer on the suffix.
            edits: ``{hook_name: fn(act, ctx)}``; see ``ctx.rows``.
            base_index: ``[batch]`` which base prompt each row continues (default: row ``i``
                continues base prompt ``i``).
            last_only: Return the last position's logits ``[batch, vocab]`` (default), else the
                suffix logits ``[batch, suffix, vocab]``.

        Example:
            >>> base = engine.run(tokens)                                   # doctest: +SKIP
            >>> starts = torch.tensor([0, 1, 2])                            # doctest: +SKIP
            >>> x = torch.stack([base[f"blocks.{l}.hook_resid_pre"][0, 2:] for l in (0, 1)]
            ...                 + [base["blocks.1.hook_resid_post"][0, 2:]])  # doctest: +SKIP
            >>> engine.resume_rows(base, starts, 2, resid=x,
            ...                    base_index=torch.zeros(3, dtype=torch.long))  # doctest: +SKIP
        """
        starts = torch.as_tensor(start_layers, dtype=torch.long).cpu()
        N = resid.shape[0]
        if starts.shape != (N,):
            raise ValueError(
                f"start_layers must have one entry per row of resid ({N}), got shape {tuple(starts.shape)}"
            )
        if N and (int(starts.min()) < 0 or int(starts.max()) > self.n_layers):
            raise ValueError(
                f"start_layers must lie in [0, {self.n_layers}], got {starts.min().item()}..{starts.max().item()}"
            )
        if not 0 <= start_pos < base.n_pos:
            raise ValueError(f"start_pos must be in [0, {base.n_pos}), got {start_pos}")
        if resid.ndim != 3 or resid.shape[1] != base.n_pos - start_pos:
            raise ValueError(
                f"resid must be [batch, {base.n_pos - start_pos}, d_model] (positions {start_pos}.. of the base), "
                f"got {tuple(resid.shape)}"
            )
        edits = dict(edits or {})
        self.check_hook_names(edits)
        if base_index is None:
            base_index = torch.arange(N)
        base_index = torch.as_tensor(base_index, dtype=torch.long).cpu()
        order = torch.argsort(starts, stable=True)
        sorted_starts = starts[order]
        x = resid[order.to(resid.device)].clone()
        bi = base_index[order]
        first = int(sorted_starts[0]) if N else self.n_layers
        trim = last_only and self._top_free(edits)
        for l in range(first, self.n_layers):
            n = int((sorted_starts <= l).sum())
            rows = order[:n]
            out, _, _, _ = self._forward(
                x[:n],
                l,
                start_pos,
                base.keys,
                base.values,
                bi[:n],
                edits,
                None,
                stop_layer=l + 1,
                rows=rows,
                last_at_top=trim,
            )
            x[:n, x.shape[1] - out.shape[1] :] = out
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(N)
        final = x[:, -1] if last_only else x
        return self.unembed(final[inverse.to(final.device)])

    def _top_free(self, edits: dict) -> bool:
        """Whether no edit touches the top block after its queries (see ``last_at_top``)."""
        top = f"blocks.{self.n_layers - 1}."
        return {top + h for h in _AFTER_QUERY}.isdisjoint(edits)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_version(model: Model) -> tuple[int, ...]:
    # In-place updates (training, load_state_dict) bump a parameter's version counter.
    return tuple(p._version for p in model.parameters())


def get_engine(model: Model, precision: Optional[str] = None) -> Optional[Engine]:
    """The model's engine, or ``None`` if its architecture cannot be mirrored.

    Built once per model and precision, and rebuilt when the model's weights change (training
    steps, ``load_state_dict``), so a cached engine never computes with stale weights.

    Args:
        model: The bridge.
        precision: ``"float32"`` or ``"bfloat16"``; default the one in force
            (:func:`mechlib.precision.current`: ``$MECHLIB_PRECISION``, else float32).
    """
    precision = resolve_precision(precision)
    version = _weights_version(model)
    per_model = _ENGINES.setdefault(model, {})
    hit = per_model.get(precision)
    if hit is not None and hit[0] == version:
        return hit[1]
    try:
        eng = Engine(model, precision)
    except UnsupportedModelError:
        return None
    per_model[precision] = (version, eng)
    return eng
