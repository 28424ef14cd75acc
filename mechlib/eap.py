"""Edge attribution patching: score every edge of the graph, patch edges exactly, measure circuits.

The residual stream is a sum: every node's input is the sum of the outputs of the nodes above it
(the embeddings, each head's ``z @ W_O``, each MLP's output) plus constant biases, read through
the node's own normalisation (folded in compatibility mode). On Gemma 3, whose sublayer outputs
pass through an RMSNorm before they join the residual, an MLP's output is taken after its norm and
a head's output is its share of the normalised layer output (its ``z @ W_O`` times the norm's
elementwise factor in the same run); the embedding scale, query/key norms and sliding windows are
part of the receivers' forward. An *edge* ``sender -> receiver`` is
one term of one receiver's sum (see :mod:`mechlib.graph`). This module runs the model with every
receiver reading its own input, on the engine's processed weights (:mod:`mechlib.engine`), so that

* :func:`eap` scores all edges from one batched pass (Syed et al. 2023): ``score(s -> r) =
  (a_s(other) - a_s(base)) . d metric / d x_r`` at the base run, two forwards and one backward;
* :func:`eap_ig` integrates that gradient along the path from the base to the other input
  (Hanna et al. 2024, EAP-IG; ``steps=5`` in the paper), or with ``variant="activations"`` along
  the path where every node's output is interpolated between its two values;
* :func:`patch_edges` patches edges exactly: rows of one batched forward each carry their own
  set of patched edges (each receiver's input rebuilt from its senders);
* :func:`faithfulness` and :func:`faithfulness_curve` evaluate circuits: edges outside a circuit
  carry the corrupted (or mean) sender activation, edges inside the one of the run, many circuit
  sizes in one batched forward.

Directions are those of :mod:`mechlib.patching`: ``"denoise"`` (base = corrupted run, patch in
clean: scores estimate ``m(patched) - m(corrupted)``) and ``"noise"`` (base = clean run, patch in
corrupted: scores estimate ``m(patched) - m(clean)``). Any :class:`mechlib.metrics.Metric` works.

Example:
    >>> ds = make_ioi_dataset(model, 16)                                            # doctest: +SKIP
    >>> g = eap_ig(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds), steps=5)  # doctest: +SKIP
    >>> g.top(5); circuit = g.top_n(200)                                            # doctest: +SKIP
    >>> curve = faithfulness_curve(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds), g,
    ...                            sizes=[50, 100, 200, 400])                       # doctest: +SKIP
    >>> curve.edges_to_reach(0.8); curve.plot()                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib import validate
from mechlib.engine.forward import get_engine
from mechlib.graph import Graph
from mechlib.metrics import Metric, as_metric
from mechlib.types import Model

__all__ = [
    "eap",
    "eap_ig",
    "patch_edges",
    "faithfulness",
    "faithfulness_curve",
    "Faithfulness",
    "FaithfulnessCurve",
    "GraphModel",
    "graph_model",
]

_DIRECTIONS = ("denoise", "noise")
_ABLATIONS = ("corrupted", "mean")


# ---- the graph forward -----------------------------------------------------------------------


@dataclass
class _Outputs:
    """Every sender's output in one run, compactly, and the residual at every stage."""

    embed: torch.Tensor  # [N, T, d]
    z: list[torch.Tensor]  # per layer [N, T, H, dh]
    mlp: list[torch.Tensor]  # per layer [N, T, d] (empty when attention-only)
    pre: list[torch.Tensor]  # per layer resid_pre [N, T, d]
    mid: list[torch.Tensor]  # per layer resid_mid [N, T, d]
    final: torch.Tensor  # [N, T, d]
    logits: torch.Tensor  # [N, T or 1, vocab]
    #: per layer each head's contribution [N, T, H, d], kept where a post-attention norm makes it
    #: more than ``z @ W_O`` (Gemma 3); ``None`` elsewhere
    ho: Optional[list[torch.Tensor]] = None

    def mean(self) -> "_Outputs":
        f = lambda t: t.mean(0, keepdim=True)  # noqa: E731
        return _Outputs(
            f(self.embed),
            [f(t) for t in self.z],
            [f(t) for t in self.mlp],
            [f(t) for t in self.pre],
            [f(t) for t in self.mid],
            f(self.final),
            f(self.logits),
            None if self.ho is None else [f(t) for t in self.ho],
        )


class GraphModel:
    """A model's forward pass with one input per receiver (query head, KV head, MLP, logits).

    Built on the engine's processed weights; exact against the bridge (tests check the logits).

    Raises:
        ValueError: The engine cannot mirror the model (its architecture is not supported).
    """

    def __init__(self, model: Model) -> None:
        eng = get_engine(model, "float32")  # gradients and edge scores stay float32 (mechlib.precision)
        if eng is None:
            raise ValueError(
                f"{model.cfg.model_name}: mechlib.engine cannot mirror this architecture, so edge "
                "attribution is unavailable for it"
            )
        cfg = model.cfg
        if eng.post_norms and any(b is not None for b in eng.b_o):
            raise ValueError(
                f"{cfg.model_name}: an attention output bias under a post-attention norm has no per-head "
                "share; edge attribution does not handle it"
            )
        self.eng = eng
        self.graph = Graph.for_model(model)
        self.L, self.H, self.K, self.dh, self.d = eng.n_layers, eng.n_heads, eng.n_kv, eng.d_head, eng.d_model
        self.attn_only = eng.attn_only
        nt = cfg.normalization_type
        self.norm_kind = None if nt is None else ("rms" if str(nt).startswith("RMS") else "ln")
        self.eps = float(cfg.eps)
        H, K, dh, d = self.H, self.K, self.dh, self.d
        self.WQ, self.WK, self.WV, self.bQ, self.bK, self.bV, self.WO = [], [], [], [], [], [], []
        for l in range(self.L):
            w = eng.W_qkv[l]
            self.WQ.append(w[:, : H * dh].reshape(d, H, dh))
            self.WK.append(w[:, H * dh : (H + K) * dh].reshape(d, K, dh))
            self.WV.append(w[:, (H + K) * dh :].reshape(d, K, dh))
            b = eng.b_qkv[l]
            self.bQ.append(None if b is None else b[: H * dh].reshape(H, dh))
            self.bK.append(None if b is None else b[H * dh : (H + K) * dh].reshape(K, dh))
            self.bV.append(None if b is None else b[(H + K) * dh :].reshape(K, dh))
            self.WO.append(eng.W_o[l].reshape(H, dh, d))
        # receivers per stage, in the graph's order: [H q, K k, K v] then MLP, then logits
        g = self.graph
        self.S = len(g.senders)
        self.R = len(g.receivers)
        self.att_r = [
            list(range(g.receiver_index(f"L{l}H0.q"), g.receiver_index(f"L{l}H0.q") + H + 2 * K)) for l in range(self.L)
        ]
        self.mlp_r = [] if self.attn_only else [g.receiver_index(f"MLP{l}") for l in range(self.L)]
        self.head_s = [g.sender_index(f"L{l}H0") for l in range(self.L)]
        self.mlp_s = [] if self.attn_only else [g.sender_index(f"MLP{l}") for l in range(self.L)]
        self._check_against(model)

    def _check_against(self, model: Model) -> None:
        """One short probe through the bridge: never compute edges on a forward that is not the model's."""
        n = min(6, int(model.cfg.n_ctx))
        tokens = (torch.arange(n) * 7919 % int(model.cfg.d_vocab))[None].to(self.eng.device)
        with torch.no_grad():
            ref = model(tokens)
            ours = self.run(self.embed(tokens), last_only=False).logits
        err = float((ours - ref).abs().max())
        if not err <= 1e-3 * max(1.0, float(ref.abs().max())):
            raise ValueError(
                f"{model.cfg.model_name}: the per-receiver forward differs from the model's by {err:.3g} "
                "in the logits; this architecture is not supported by mechlib.eap"
            )

    # -- pieces --

    def norm(self, x: torch.Tensor, final: bool = False) -> torch.Tensor:
        kind = "rms" if final and self.norm_kind is not None and self.eng.final_rms else self.norm_kind
        if kind is None:
            return x
        if kind == "rms":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.eng.embed(tokens.to(self.eng.device))

    def unembed(self, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        if last_only:
            x = x[:, -1:]
        out = self.norm(x, final=True) @ self.eng.W_U
        return out if self.eng.b_U is None else out + self.eng.b_U

    def mlp(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """MLP ``l``'s output as it joins the residual (after Gemma's post-MLP norm): one sender."""
        return self.eng._mlp(l, x)

    def attend(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``l``'s heads from their inputs ``x [N, T, H + 2K, d]`` (queries, keys, values): ``z``."""
        H, K = self.H, self.K
        xn = self.norm(x)
        q = torch.einsum("nthd,dhe->nhte", xn[:, :, :H], self.WQ[l])
        k = torch.einsum("nthd,dhe->nhte", xn[:, :, H : H + K], self.WK[l])
        v = torch.einsum("nthd,dhe->nhte", xn[:, :, H + K :], self.WV[l])
        if self.bQ[l] is not None:
            q = q + self.bQ[l][None, :, None]
            k = k + self.bK[l][None, :, None]
            v = v + self.bV[l][None, :, None]
        e = self.eng
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        q, k = e.position_qk(l, q, k, positions)
        if K != H:
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        scores = (q @ k.transpose(-1, -2)) * e.layer_scale[l]
        mask = e.window_mask(l, torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), positions)
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (pattern @ v).transpose(1, 2)  # [N, T, H, dh]

    def head_out(self, l: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's residual contribution ``[N, T, H, d]`` (without the shared output bias).

        Under Gemma's post-attention RMSNorm the layer adds ``norm(sum_h z_h W_O^h) * w``: each head's
        share is its ``z_h W_O^h`` times that norm's scale and weight, read from the same run, so
        the shares add up to the layer's output exactly (as direct logit attribution splits it)."""
        ho = torch.einsum("nthe,hed->nthd", z, self.WO[l])
        if not self.eng.post_norms:
            return ho
        total = ho.sum(2, keepdim=True).float()
        inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + self.eps)
        return (ho.float() * inv * self.eng.post_attn_w[l]).to(ho.dtype)

    def src_head_out(self, l: int, src: _Outputs, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The heads' contributions in a recorded run (rows ``index``); a mean run's are the mean of
        its prompts' contributions, not the contributions of its mean ``z``."""
        if src.ho is not None:
            return src.ho[l] if index is None else src.ho[l][index]
        return self.head_out(l, src.z[l] if index is None else src.z[l][index])

    def _bias_o(self, l: int) -> Optional[torch.Tensor]:
        return self.eng.b_o[l]

    # -- runs --

    def run(self, embed: torch.Tensor, last_only: bool) -> _Outputs:
        """A plain forward from the input node's output, recording every sender and stage."""
        resid = embed
        zs, mlps, pre, mid, hos = [], [], [], [], []
        R_att = self.H + 2 * self.K
        for l in range(self.L):
            pre.append(resid)
            z = self.attend(l, resid[:, :, None].expand(-1, -1, R_att, -1))
            zs.append(z)
            ho = self.head_out(l, z)
            if self.eng.post_norms:
                hos.append(ho)
            resid = resid + ho.sum(2)
            if self._bias_o(l) is not None:
                resid = resid + self._bias_o(l)
            mid.append(resid)
            if not self.attn_only:
                m = self.mlp(l, resid)
                mlps.append(m)
                resid = resid + m
        return _Outputs(embed, zs, mlps, pre, mid, resid, self.unembed(resid, last_only), hos or None)

    def grad_run(
        self,
        embed: torch.Tensor,
        metric: Metric,
        pin: Optional[tuple[_Outputs, _Outputs, float]] = None,
        rows: Optional[tuple[torch.Tensor, int]] = None,
    ):
        """Forward with every receiver reading its own copy of the residual, and the backward.

        Args:
            embed: The input node's output ``[N, T, d]``.
            metric: Differentiated summed over prompts (per-prompt gradients for per-prompt metrics).
            pin: ``(base, other, alpha)``: every sender's output takes the value
                ``base + alpha * (other - base)`` while gradients flow through its local Jacobian
                (EAP-IG over activations).

            rows: ``(index [N], batch)``: these rows are prompts ``index`` of a batch of ``batch``
                prompts (metrics bound to per-prompt answers are evaluated on the whole batch).

        Returns:
            ``(grads [N, R, T, d], metric values)``.
        """
        with torch.enable_grad():
            if pin is not None:
                base, other, a = pin
                embed = base.embed + a * (other.embed - base.embed)
            embed = embed.detach().requires_grad_(True)  # the weights need no grad: give autograd a root
            resid = embed
            inputs = []
            R_att = self.H + 2 * self.K
            for l in range(self.L):
                x = resid[:, :, None].expand(-1, -1, R_att, -1) * 1.0
                inputs.append(x)
                z = self.attend(l, x)
                if pin is not None and not self.eng.post_norms:
                    target = base.z[l] + a * (other.z[l] - base.z[l])
                    z = z + (target - z).detach()
                ho = self.head_out(l, z)
                if pin is not None and self.eng.post_norms:  # pin the heads' shares, not their z
                    b_ho = self.src_head_out(l, base)
                    target = b_ho + a * (self.src_head_out(l, other) - b_ho)
                    ho = ho + (target - ho).detach()
                resid = resid + ho.sum(2)
                if self._bias_o(l) is not None:
                    resid = resid + self._bias_o(l)
                if not self.attn_only:
                    xm = resid * 1.0
                    inputs.append(xm)
                    m = self.mlp(l, xm)
                    if pin is not None:
                        target = base.mlp[l] + a * (other.mlp[l] - base.mlp[l])
                        m = m + (target - m).detach()
                    resid = resid + m
            xl = resid * 1.0
            inputs.append(xl)
            logits = self.unembed(xl, metric.last_only)
            values = _evaluate_rows(metric, logits, rows)
            total = values.sum() if values.ndim else values
            grads = torch.autograd.grad(total, inputs, allow_unused=True)
        N, T = embed.shape[:2]
        G = torch.zeros(N, self.R, T, self.d, dtype=embed.dtype, device=embed.device)
        i = 0
        for l in range(self.L):
            g = grads[i]
            i += 1
            if g is not None:
                G[:, self.att_r[l]] = g.permute(0, 2, 1, 3)
            if not self.attn_only:
                if grads[i] is not None:
                    G[:, self.mlp_r[l]] = grads[i]
                i += 1
        if grads[i] is not None:
            G[:, -1] = grads[i]
        return G, values.detach()

    def sender_outputs(self, out: _Outputs) -> torch.Tensor:
        """Every sender's output ``[N, S, T, d]`` in graph order."""
        N, T, d = out.embed.shape
        A = torch.zeros(N, self.S, T, d, dtype=out.embed.dtype, device=out.embed.device)
        A[:, 0] = out.embed
        for l in range(self.L):
            s = self.head_s[l]
            A[:, s : s + self.H] = self.src_head_out(l, out).permute(0, 2, 1, 3)
            if not self.attn_only:
                A[:, self.mlp_s[l]] = out.mlp[l]
        return A

    @torch.no_grad()
    def patched_run(
        self, embed: torch.Tensor, src: _Outputs, src_index: torch.Tensor, keep: torch.Tensor, last_only: bool
    ) -> torch.Tensor:
        """Rows whose edges outside ``keep`` carry the source run's sender output; exact.

        Args:
            embed: ``[N, T, d]`` the input node's output of each row's own run.
            src: The source run (corrupted, clean, or a mean with batch 1).
            src_index: ``[N]`` which source prompt each row takes its patched values from.
            keep: ``[N, S, R]`` bool: the edges carrying the row's own run's sender output.

        Returns:
            Logits ``[N, T or 1, vocab]``.
        """
        N, T, d = embed.shape
        dev = embed.device
        valid = self.graph.valid.to(dev)
        keep = keep.to(dev) & valid
        # Per row the cheaper of two exact forms: x_r = src_r + sum_{s in keep} D_s (few kept edges)
        # or x_r = run_r - sum_{s not in keep} D_s (few patched edges); D_s = a_s(run) - a_s(src).
        n_keep = keep.flatten(1).sum(1)
        form_a = n_keep < (self.graph.n_edges - n_keep)  # [N]
        W = torch.where(form_a[:, None, None], keep, valid & ~keep).float()
        W = torch.where(form_a[:, None, None], W, -W)
        fa = form_a[:, None, None].float()
        D = torch.zeros(N, self.S, T * d, dtype=embed.dtype, device=dev)
        si = src_index.to(dev)
        D[:, 0] = (embed - src.embed[si]).reshape(N, -1)
        resid = embed

        def inputs(rs: list[int], n_senders: int, run_resid: torch.Tensor, src_resid: torch.Tensor) -> torch.Tensor:
            base = fa * src_resid[si] + (1 - fa) * run_resid  # [N, T, d]
            w = W[:, :n_senders, rs]  # [N, s, r]
            active = (w != 0).any(0).any(1).nonzero().flatten()
            x = base[:, None].expand(-1, len(rs), -1, -1)
            if active.numel() > n_senders // 2:  # dense: multiply in place rather than gather
                corr = torch.bmm(w.transpose(1, 2), D[:, :n_senders])  # [N, r, T*d]
                x = x + corr.view(N, len(rs), T, d)
            elif active.numel():
                corr = torch.bmm(w[:, active].transpose(1, 2), D[:, active])
                x = x + corr.view(N, len(rs), T, d)
            return x

        for l in range(self.L):
            s0 = self.head_s[l]
            x = inputs(self.att_r[l], s0, resid, src.pre[l])
            z = self.attend(l, x.permute(0, 2, 1, 3))
            ho = self.head_out(l, z)  # [N, T, H, d]
            D[:, s0 : s0 + self.H] = (ho - self.src_head_out(l, src, si)).permute(0, 2, 1, 3).reshape(N, self.H, -1)
            resid = resid + ho.sum(2)
            if self._bias_o(l) is not None:
                resid = resid + self._bias_o(l)
            if not self.attn_only:
                xm = inputs([self.mlp_r[l]], s0 + self.H, resid, src.mid[l])[:, 0]
                m = self.mlp(l, xm)
                D[:, self.mlp_s[l]] = (m - src.mlp[l][si]).reshape(N, -1)
                resid = resid + m
        xl = inputs([self.R - 1], self.S, resid, src.final)[:, 0]
        return self.unembed(xl, last_only)


def _evaluate_rows(metric: Metric, logits: torch.Tensor, rows: Optional[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The metric of some prompts of a batch: the rows are placed into a full-batch tensor (zeros
    elsewhere, no gradient there), evaluated, and read back, so metrics that hold one answer per
    prompt work on chunks. A metric returning one value for the batch needs the whole batch."""
    if rows is None:
        return metric.evaluate(logits)
    index, batch = rows
    if index.numel() == batch and torch.equal(index.cpu(), torch.arange(batch)):
        return metric.evaluate(logits)
    full = torch.zeros((batch,) + tuple(logits.shape[1:]), dtype=logits.dtype, device=logits.device)
    full = full.index_copy(0, index.to(logits.device), logits)
    values = metric.evaluate(full)
    if values.ndim == 0:
        raise ValueError(
            f"metric {metric.name!r} returns one value for the whole batch; it cannot be split into "
            "prompts (pass batch_size=None, or a metric returning [batch])"
        )
    return values[index.to(values.device)]


_GRAPH_MODELS: dict[int, tuple[Any, GraphModel, tuple]] = {}


def graph_model(model: Model) -> GraphModel:
    """The model's :class:`GraphModel` (rebuilt when the engine is)."""
    eng = get_engine(model, "float32")
    hit = _GRAPH_MODELS.get(id(model))
    if hit is not None and hit[0] is eng:
        return hit[1]
    gm = GraphModel(model)
    _GRAPH_MODELS.clear()
    _GRAPH_MODELS[id(model)] = (eng, gm, ())
    return gm


# ---- checks --------------------------------------------------------------------------------


def _check_common(model: Model, clean: Any, corrupted: Any, metric: Any, direction: str):
    clean, corrupted = validate.token_pair(clean, corrupted, model)
    validate.choice(direction, "direction", _DIRECTIONS)
    if not isinstance(metric, Metric) and not callable(metric):
        raise TypeError(f"metric must be a mechlib.metrics.Metric or a callable on logits, got {type(metric).__name__}")
    return clean, corrupted, as_metric(metric)


def _batch_size(value: Any, n: int) -> int:
    if value is None:
        return n
    return validate.whole(value, "batch_size", minimum=1)


# ---- scoring -------------------------------------------------------------------------------


def eap(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    *,
    direction: str = "denoise",
    batch_size: Optional[int] = 16,
) -> Graph:
    """Edge attribution patching (Syed et al. 2023): every edge's first-order patching effect.

    ``score(s -> r) = (a_s(other) - a_s(base)) . d metric / d x_r`` at the base run (the
    corrupted run for ``"denoise"``, the clean run for ``"noise"``), summed over positions,
    averaged over prompts. Equals :func:`eap_ig` with ``steps=1``.

    Args:
        model: A bridge from :func:`mechlib.load_model` (any architecture the engine mirrors).
        clean, corrupted: ``[batch, pos]`` token tensors of one shape.
        metric: A :class:`~mechlib.metrics.Metric` (or callable) returning a scalar or ``[batch]``.
        direction: ``"denoise"`` (default) or ``"noise"``.
        batch_size: Prompts per pass (memory); a metric that returns a scalar runs all at once.

    Returns:
        A :class:`~mechlib.graph.Graph` with ``scores`` (raw metric units; ``meta["clean"]`` and
        ``meta["corrupted"]`` hold the two runs' metric) and ``per_prompt`` (for per-prompt metrics).
    """
    return eap_ig(model, clean, corrupted, metric, steps=1, direction=direction, batch_size=batch_size)


def eap_ig(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    *,
    steps: int = 5,
    variant: str = "inputs",
    direction: str = "denoise",
    batch_size: Optional[int] = 16,
) -> Graph:
    """EAP with integrated gradients (Hanna et al. 2024): the gradient averaged along a path.

    ``variant="inputs"`` (the paper's EAP-IG): the input embeddings move from the base run's to
    the other run's, ``e(k) = e_base + k/steps (e_other - e_base)`` for ``k = 0 .. steps-1``, and
    each receiver's gradient is averaged over those points. ``variant="activations"``: every
    node's output takes the value ``a_base + k/steps (a_other - a_base)`` (gradients through each
    node's local Jacobian at that point). ``steps=1`` is plain EAP.

    Args:
        model, clean, corrupted, metric, direction, batch_size: As in :func:`eap`.
        steps: Points on the path (``>= 1``; the paper uses 5).
        variant: ``"inputs"`` or ``"activations"``.

    Returns:
        A :class:`~mechlib.graph.Graph` with per-edge (and per-prompt) scores.

    Raises:
        ValueError: Mismatched token shapes, ``steps < 1``, an unknown direction or variant, a
            metric of the wrong shape.
    """
    clean, corrupted, metric = _check_common(model, clean, corrupted, metric, direction)
    steps = validate.whole(steps, "steps", minimum=1)
    validate.choice(variant, "variant", ("inputs", "activations"))
    gm = graph_model(model)
    B = clean.shape[0]
    dev = gm.eng.device
    base_tokens, other_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        base_all = gm.run(gm.embed(base_tokens.to(dev)), metric.last_only)
        other_all = gm.run(gm.embed(other_tokens.to(dev)), metric.last_only)
        v_base, v_other = metric.evaluate(base_all.logits), metric.evaluate(other_all.logits)
    per_prompt_ok = v_base.ndim == 1
    bs = _batch_size(batch_size, B) if per_prompt_ok else B
    chunks = []
    for i in range(0, B, bs):
        idx = torch.arange(i, min(B, i + bs))
        base, other = _slice_outputs(base_all, idx), _slice_outputs(other_all, idx)
        with torch.no_grad():
            delta = gm.sender_outputs(other) - gm.sender_outputs(base)  # [n, S, T, d]
        G = None
        for k in range(steps):
            a = k / steps
            if variant == "inputs":
                g, _ = gm.grad_run(base.embed + a * (other.embed - base.embed), metric, rows=(idx, B))
            else:
                g, _ = gm.grad_run(base.embed, metric, pin=(base, other, a), rows=(idx, B))
            G = g if G is None else G + g
        G = G / steps
        n = idx.numel()
        scores = torch.bmm(delta.reshape(n, gm.S, -1), G.reshape(n, gm.R, -1).transpose(1, 2))
        chunks.append(scores.masked_fill(~gm.graph.valid.to(scores.device), 0.0).cpu())
        del delta, G
    per = torch.cat(chunks) if per_prompt_ok else None
    # per-prompt metric: each row's scores are that prompt's; a batch-level (scalar) metric already
    # divides its gradient among the rows, so their sum is the batch score
    total = per.mean(0) if per_prompt_ok else chunks[0].sum(0)
    vb, vo = float(v_base.float().mean()), float(v_other.float().mean())
    vc, vk = (vo, vb) if direction == "denoise" else (vb, vo)
    method = (
        "EAP"
        if steps == 1
        else (f"EAP-IG ({steps} steps)" if variant == "inputs" else f"EAP-IG-activations ({steps} steps)")
    )
    return Graph(
        gm.graph.shape,
        total,
        per,
        title=method,
        metric=metric.name,
        meta={
            "method": method,
            "steps": steps,
            "variant": variant,
            "direction": direction,
            "clean": vc,
            "corrupted": vk,
            "n_prompts": B,
        },
    )


# ---- exact edge patching -------------------------------------------------------------------


def _slice_outputs(o: _Outputs, idx: torch.Tensor) -> _Outputs:
    i = idx.to(o.embed.device)
    return _Outputs(
        o.embed[i],
        [t[i] for t in o.z],
        [t[i] for t in o.mlp],
        [t[i] for t in o.pre],
        [t[i] for t in o.mid],
        o.final[i],
        o.logits[i],
        None if o.ho is None else [t[i] for t in o.ho],
    )


def _rows_budget(gm: GraphModel, T: int, max_bytes: float = 6e8) -> int:
    return max(1, int(max_bytes // (gm.S * T * gm.d * 4 * 2)))


def _masked_runs(
    gm: GraphModel, run_tokens: torch.Tensor, src: _Outputs, keeps: torch.Tensor, metric: Metric, src_is_mean: bool
) -> torch.Tensor:
    """Metric ``[n_masks, batch]`` for each keep-mask (``[n_masks, S, R]``) on every prompt."""
    dev = gm.eng.device
    B, T = run_tokens.shape
    M = keeps.shape[0]
    with torch.no_grad():
        embed = gm.embed(run_tokens.to(dev))
    per_call = max(1, _rows_budget(gm, T) // B)  # masks per forward: every prompt of a mask in one call
    out = torch.empty(M, B)
    for i in range(0, M, per_call):
        mi = torch.arange(i, min(M, i + per_call))
        n = mi.numel()
        pi = torch.arange(B).repeat(n)
        si = torch.zeros_like(pi) if src_is_mean else pi
        logits = gm.patched_run(embed[pi.to(dev)], src, si, keeps[mi].repeat_interleave(B, 0), metric.last_only)
        for j in range(n):
            v = metric.evaluate(logits[j * B : (j + 1) * B])
            if v.ndim == 0:
                raise ValueError(
                    f"metric {metric.name!r} returns one value for the batch; patching edges needs one "
                    "value per prompt (a [batch] metric)"
                )
            out[i + j] = v.float().cpu()
    return out.view(M, B)


def _metric_rows(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    v = metric.evaluate(logits)
    return v.float().reshape(-1)


def patch_edges(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    edges: Sequence[Union[tuple[str, str], str]],
    *,
    direction: str = "denoise",
) -> torch.Tensor:
    """Exact effect of patching each edge alone: ``m(patched) - m(base)``, batch mean, per edge.

    For ``"denoise"`` the base is the corrupted run and the edge carries the sender's clean output
    into its receiver; for ``"noise"`` the base is the clean run and the edge carries the
    corrupted output. One forward row per edge and prompt, batched.

    Returns:
        ``[n_edges]`` effects in raw metric units (comparable with :func:`eap` scores).
    """
    clean, corrupted, metric = _check_common(model, clean, corrupted, metric, direction)
    gm = graph_model(model)
    masks = _single_edge_masks(gm, edges)
    run_t, src_t = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        src = gm.run(gm.embed(src_t.to(gm.eng.device)), metric.last_only)
        base = gm.run(gm.embed(run_t.to(gm.eng.device)), metric.last_only)
    base_v = _metric_rows(metric, base.logits).cpu()
    keeps = gm.graph.valid[None] & ~masks  # every edge keeps its run's value except the patched one
    vals = _masked_runs(gm, run_t, src, keeps, metric, False)
    return (vals - base_v[None]).mean(1)


def _single_edge_masks(gm: GraphModel, edges: Sequence[Any]) -> torch.Tensor:
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Sequence):
        raise TypeError("edges must be a list of (sender, receiver) pairs or 'sender -> receiver' strings")
    if len(edges) == 0:
        raise ValueError("edges is empty: nothing to patch")
    return torch.stack([gm.graph.mask_of([e]) for e in edges])


# ---- faithfulness --------------------------------------------------------------------------


@dataclass
class Faithfulness:
    """A circuit's normalised metric with every edge outside it ablated.

    Attributes:
        value: ``(m(circuit) - m(corrupted)) / (m(clean) - m(corrupted))`` (batch means).
        per_prompt: ``[batch]`` per-prompt terms whose mean is ``value`` (for intervals).
        n_edges: Edges in the circuit.
        metric: The raw metric of the circuit run (batch mean).
        clean, corrupted: The two runs' metric.
    """

    value: float
    per_prompt: torch.Tensor
    n_edges: int
    metric: float
    clean: float
    corrupted: float

    def __repr__(self) -> str:
        return f"Faithfulness({self.value:.3f} with {self.n_edges} edges; metric {self.metric:.3f}, clean {self.clean:.3f}, corrupted {self.corrupted:.3f})"


@dataclass
class FaithfulnessCurve:
    """Faithfulness against circuit size, for one scoring.

    Attributes:
        requested: Edges asked for at each point (before pruning).
        n_edges: ``[points]`` edges kept after pruning.
        values: ``[points]`` normalised faithfulness.
        per_prompt: ``[points, batch]`` per-prompt terms (means are ``values``).
        label: The scoring method, for legends.
        meta: clean/corrupted metric, ablation, selection.
    """

    requested: list[int]
    n_edges: list[int]
    values: torch.Tensor
    per_prompt: torch.Tensor
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def edges_to_reach(self, level: float = 0.8) -> Optional[int]:
        """Fewest edges among the points at or above ``level`` (``None`` if none reaches it)."""
        hits = [n for n, v in zip(self.n_edges, self.values.tolist()) if v >= level]
        return min(hits) if hits else None

    def area(self) -> float:
        """Mean faithfulness over the points (the curve's area on the sampled sizes)."""
        return float(self.values.mean())

    def plot(self, ax: Optional[Any] = None, **kw: Any):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.n_edges, self.values.numpy(), marker="o", ms=3, label=self.label, **kw)
        ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit")
        ax.set_ylabel("faithfulness (normalised metric)")
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.legend()
        return ax.figure

    def __repr__(self) -> str:
        pts = ", ".join(f"{n}:{v:.2f}" for n, v in zip(self.n_edges, self.values.tolist()))
        return f"FaithfulnessCurve({self.label}: {pts})"


def _circuit_masks(gm: GraphModel, circuits: Sequence[Any]) -> torch.Tensor:
    masks = []
    for c in circuits:
        if isinstance(c, Graph):
            if c.circuit is None:
                raise ValueError("a Graph passed as a circuit must hold one: use graph.top_n(n) or graph.greedy(n)")
            if c.shape != gm.graph.shape:
                raise ValueError(f"the circuit's graph ({c.shape}) is not this model's ({gm.graph.shape})")
            m = c.circuit
        elif isinstance(c, torch.Tensor):
            m = gm.graph._as_mask(c, "circuit")
        else:
            m = gm.graph.mask_of(c)
        masks.append(m)
    return torch.stack(masks)


def _ablation_source(gm: GraphModel, corrupted: torch.Tensor, metric: Metric, ablation: str) -> tuple[_Outputs, bool]:
    with torch.no_grad():
        src = gm.run(gm.embed(corrupted.to(gm.eng.device)), metric.last_only)
    return (src.mean(), True) if ablation == "mean" else (src, False)


def faithfulness(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    circuits: Union[Graph, Sequence[Any]],
    *,
    ablation: str = "corrupted",
    require_connected: bool = True,
) -> Union[Faithfulness, list[Faithfulness]]:
    """Run the clean prompts with every edge outside the circuit ablated; exact, batched.

    Edges in the circuit carry the sender's output in this run; edges outside carry the
    sender's output on the corrupted prompts (``ablation="corrupted"``, paired row by row) or its
    mean over them (``"mean"``, per position). Several circuits share one batched forward.

    Args:
        circuits: A :class:`~mechlib.graph.Graph` holding a circuit, or a list of them (or of bool
            masks, or of ``(sender, receiver)`` lists).
        ablation: ``"corrupted"`` or ``"mean"``.
        require_connected: Refuse a circuit with no path from the input to the logits.

    Returns:
        One :class:`Faithfulness` for a single circuit, else a list.

    Raises:
        ValueError: Bad shapes, an unknown edge, a circuit that does not connect the input to
            the logits, clean and corrupted runs the metric cannot tell apart.
    """
    clean, corrupted, metric = _check_common(model, clean, corrupted, metric, "noise")
    validate.choice(ablation, "ablation", _ABLATIONS)
    single = isinstance(circuits, (Graph, torch.Tensor))
    gm = graph_model(model)
    masks = _circuit_masks(gm, [circuits] if single else list(circuits))
    if require_connected:
        for i, m in enumerate(masks):
            if not bool(gm.graph.prune(m).any()):
                raise ValueError(
                    f"circuit {i} ({int(m.sum())} edges) does not connect the input to the logits: no "
                    "path of its edges leads from 'input' to 'logits'; select circuits with "
                    "Graph.top_n / Graph.greedy (which prune), or add the missing edges"
                )
    out = _faithfulness_masks(gm, clean, corrupted, metric, masks, ablation)
    return out[0] if single else out


def _faithfulness_masks(
    gm: GraphModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, masks: torch.Tensor, ablation: str
) -> list[Faithfulness]:
    src, is_mean = _ablation_source(gm, corrupted, metric, ablation)
    with torch.no_grad():
        full = gm.run(gm.embed(clean.to(gm.eng.device)), metric.last_only)
        corr = gm.run(gm.embed(corrupted.to(gm.eng.device)), metric.last_only)
    vc_rows = _metric_rows(metric, full.logits).cpu()
    vk_rows = _metric_rows(metric, corr.logits).cpu()
    vc, vk = float(vc_rows.mean()), float(vk_rows.mean())
    span = vc - vk
    if abs(span) < 1e-8:
        raise ValueError(
            f"the clean ({vc:.4g}) and corrupted ({vk:.4g}) runs score the same on {metric.name!r}: "
            "faithfulness is undefined; use prompts the metric tells apart"
        )
    vals = _masked_runs(gm, clean, src, masks, metric, is_mean)  # [M, B]
    per = (vals - vk) / span
    return [
        Faithfulness(float(p.mean()), p, int(m.sum()), float(v.mean()), vc, vk) for p, m, v in zip(per, masks, vals)
    ]


def faithfulness_curve(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    graph: Graph,
    sizes: Optional[Sequence[int]] = None,
    *,
    points: int = 20,
    selection: str = "top_n",
    ablation: str = "corrupted",
    label: Optional[str] = None,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits a scoring selects at many sizes, in a few batched passes.

    Args:
        graph: Scores from :func:`eap` / :func:`eap_ig`.
        sizes: Edge counts to select (default: ``points`` sizes spaced logarithmically from 10 to
            every edge).
        selection: ``"top_n"`` or ``"greedy"`` (:meth:`Graph.top_n`, :meth:`Graph.greedy`; both prune).
        ablation: ``"corrupted"`` or ``"mean"``.

    Returns:
        A :class:`FaithfulnessCurve` (a circuit that prunes to nothing scores the fully ablated run).
    """
    clean, corrupted, metric = _check_common(model, clean, corrupted, metric, "noise")
    validate.choice(selection, "selection", ("top_n", "greedy"))
    validate.choice(ablation, "ablation", _ABLATIONS)
    if not isinstance(graph, Graph) or graph.scores is None:
        raise TypeError("graph must be a mechlib.graph.Graph with scores (from eap or eap_ig)")
    gm = graph_model(model)
    if graph.shape != gm.graph.shape:
        raise ValueError(f"the graph ({graph.shape}) is not this model's ({gm.graph.shape})")
    if sizes is None:
        points = validate.whole(points, "points", minimum=2)
        top = gm.graph.n_edges
        sizes = sorted({int(round(math.exp(x))) for x in torch.linspace(math.log(10), math.log(top), points).tolist()})
    sizes = [validate.whole(n, "sizes", minimum=0) for n in sizes]
    select = graph.top_n if selection == "top_n" else graph.greedy
    circuits = [select(n).circuit for n in sizes]
    res = _faithfulness_masks(gm, clean, corrupted, metric, torch.stack(circuits), ablation)
    return FaithfulnessCurve(
        list(sizes),
        [r.n_edges for r in res],
        torch.tensor([r.value for r in res]),
        torch.stack([r.per_prompt for r in res]),
        label or graph.title,
        {"clean": res[0].clean, "corrupted": res[0].corrupted, "ablation": ablation, "selection": selection},
    )
