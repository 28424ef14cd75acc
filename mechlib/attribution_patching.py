"""Attribution patching: the first-order (gradient) approximation of a whole patching grid.

Exact patching needs one forward pass per cell. Attribution patching (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale") estimates every cell at once from two forward
passes and one backward pass: with ``a_base`` the activation in the run being patched and
``a_src`` the one patched in,

    metric(patched) ~ metric(base) + (a_src - a_base) . d metric / d a   (gradient at the base run)

summed over the patched slice (a position, a head, a head at a position, ...). It is good where
the metric is close to linear in the activation (head outputs) and poor where a patch moves the
model far (the residual stream, MLP0). :func:`compare` measures how close it comes to
:func:`mechlib.patching.patch` on the same grid (correlation, scatter plot).

The gradient pass runs on the engine with autograd (:meth:`mechlib.engine.Engine.run_with_grad`),
or on the bridge's hooks for models the engine cannot mirror. Targets and directions are those of
:mod:`mechlib.patching`, and the results are on the same scale (raw metric, or normalised so that
0 is the corrupted run and 1 the clean run), so the two grids compare cell by cell.

Example:
    >>> approx = attribution_patch(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds),
    ...                            "head_out")                                        # doctest: +SKIP
    >>> exact = patch(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds), "head_out")  # doctest: +SKIP
    >>> cmp = compare(approx, exact); cmp.correlation; cmp.plot()                   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib.metrics import Metric, as_metric
from mechlib.patching import (
    PatchResult,
    Runner,
    Target,
    _pos_labels,
    _scale,
    _target,
    _device,
    check_layers,
    check_pair,
)

__all__ = ["attribution_patch", "compare", "AttributionComparison"]


def _grad_run(runner: Runner, tokens: torch.Tensor, hooks: list[str], metric: Metric):
    """Forward with a zero leaf added at every hook, backward of the batch-mean metric.

    Returns ``(logits, activations, gradients)`` with activations and gradients per hook.
    """
    leaves: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def add_leaf(act: torch.Tensor, ctx: Any = None, name: Optional[str] = None) -> torch.Tensor:
        key = name if name is not None else ctx.hook
        acts[key] = act.detach().clone()
        leaf = torch.zeros_like(act, requires_grad=True)
        leaves[key] = leaf
        return act + leaf

    if runner.engine is not None:
        run = runner.engine.run_with_grad(tokens, edits={h: add_leaf for h in hooks}, keep=())
        logits = run.logits
    else:
        with torch.enable_grad():
            logits = runner.model.run_with_hooks(
                tokens, fwd_hooks=[(h, lambda a, hook, h=h: add_leaf(a, name=h)) for h in hooks]
            )
    with torch.enable_grad():
        value = metric.scalar(logits)
        value.backward()
    grads = {h: (leaves[h].grad if leaves[h].grad is not None else torch.zeros_like(leaves[h])) for h in hooks}
    return logits.detach(), acts, grads


def attribution_patch(
    model: Any,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    target: Union[str, Target] = "head_out_by_pos",
    *,
    direction: str = "denoise",
    layers: Optional[Sequence[int]] = None,
    normalise: bool = True,
    pos_labels: Optional[Sequence[str]] = None,
    use_engine: bool = True,
) -> PatchResult:
    """Estimate a :func:`mechlib.patching.patch` grid from two forwards and one backward.

    Args:
        model, clean, corrupted, metric, target, direction, layers, normalise, pos_labels,
            use_engine: As in :func:`mechlib.patching.patch`. The metric is averaged over the
            batch before the backward pass, as the exact sweep averages it.

    Returns:
        A :class:`~mechlib.patching.PatchResult` with the estimated metric after each patch
        (``meta["method"] == "attribution"``).
    """
    check_pair(clean, corrupted)
    t = _target(target, model)
    metric = as_metric(metric)
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    layers_ = check_layers(model, layers)
    runner = Runner(model, use_engine)
    hooks = [t.hook_name(l) for l in layers_]
    runner.check_hooks(hooks)
    dev = _device(model)
    clean, corrupted = clean.to(dev), corrupted.to(dev)
    base_tokens, src_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    src = runner.cache(src_tokens, hooks)
    base_logits, base_acts, grads = _grad_run(runner, base_tokens, hooks, metric)
    base_value = float(metric.scalar(base_logits))
    # Clean and corrupted scores for the scale: the two runs above are one of each.
    from mechlib.patching import Cached

    base_c = Cached(base_tokens, base_logits, {})
    cl, co = (src, base_c) if direction == "denoise" else (base_c, src)
    vc, vk, offset, span = _scale(metric, cl, co, normalise)

    B, T = clean.shape
    n_heads = (int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) if t.kv else model.cfg.n_heads)
    shape = [model.cfg.n_layers] + ([n_heads] if t.has_head else []) + ([T] if t.by_pos else [])
    values = torch.full(shape, float("nan"))
    for l, h in zip(layers_, hooks):
        prod = ((src[h].float() - base_acts[h].float()) * grads[h].float()).detach().cpu()
        if t.kind == "resid":  # [B, T, d] -> [T]
            est = prod.sum(-1).sum(0)
        elif t.kind == "head":  # [B, T, H, dh] -> [H, T] or [H]
            est = prod.sum(-1).sum(0).T
            est = est if t.by_pos else est.sum(-1)
        else:  # pattern [B, H, Tq, Tk] -> [H, Tq] or [H]
            est = prod.sum(-1).sum(0)
            est = est if t.by_pos else est.sum(-1)
        values[l] = (base_value + est - offset) / span

    what = {"denoise": "clean -> corrupted", "noise": "corrupted -> clean"}[direction]
    return PatchResult(
        values,
        t.dims(),
        {"pos": _pos_labels(model, clean, pos_labels)} if t.by_pos else {},
        title=f"attribution patching {t.name} ({what})",
        metric=("normalised " if normalise else "") + metric.name,
        meta={"clean": vc, "corrupted": vk, "direction": direction, "target": t.name, "normalised": normalise,
              "method": "attribution", "n_prompts": B},
    )


@dataclass
class AttributionComparison:
    """How well attribution patching approximates exact patching on one grid.

    Attributes:
        correlation: Pearson correlation over the cells both grids computed.
        n: Number of cells compared.
        max_abs_error: Largest ``|attribution - exact|``.
        slope: Least-squares slope of exact on attribution (1 = right scale).
        attribution, exact: The two grids.
    """

    correlation: float
    n: int
    max_abs_error: float
    slope: float
    attribution: PatchResult
    exact: PatchResult

    def __repr__(self) -> str:
        return (f"AttributionComparison({self.attribution.meta.get('target')}: r={self.correlation:.3f} over "
                f"{self.n} cells, slope {self.slope:.2f}, max |error| {self.max_abs_error:.3g})")

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, e = self.attribution.values.flatten(), self.exact.values.flatten()
        keep = ~(torch.isnan(a) | torch.isnan(e))
        return a[keep], e[keep]

    def plot(self, ax: Optional[Any] = None, *, annotate: int = 5):
        """Scatter of attribution (x) against exact (y), the line y = x, the largest cells named."""
        import matplotlib.pyplot as plt

        a, e = self.pairs()
        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(a.numpy(), e.numpy(), s=8, alpha=0.6)
        lo, hi = float(min(a.min(), e.min())), float(max(a.max(), e.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("attribution patching (estimate)")
        ax.set_ylabel("activation patching (exact)")
        ax.set_title(f"{self.attribution.meta.get('target')}: r = {self.correlation:.3f}")
        for coords, v in self.exact.top(annotate, absolute=True):
            idx = tuple(coords.values())
            ax.annotate(self.exact.label(**coords), (float(self.attribution.values[idx]), v), fontsize=7)
        return ax.figure


def compare(attribution: PatchResult, exact: PatchResult) -> AttributionComparison:
    """Correlation (and scatter plot) of an attribution grid against the exact one.

    Raises:
        ValueError: The grids have different axes or shapes, or fewer than 2 common cells.
    """
    if attribution.dims != exact.dims or attribution.values.shape != exact.values.shape:
        raise ValueError(
            f"grids differ: attribution {attribution.dims} {tuple(attribution.values.shape)} vs exact "
            f"{exact.dims} {tuple(exact.values.shape)}; run both on the same target, layers and prompts"
        )
    a, e = attribution.values.flatten().double(), exact.values.flatten().double()
    keep = ~(torch.isnan(a) | torch.isnan(e))
    a, e = a[keep], e[keep]
    if a.numel() < 2:
        raise ValueError("fewer than two cells in common: nothing to correlate")
    ac, ec = a - a.mean(), e - e.mean()
    denom = float(ac.norm() * ec.norm())
    r = float((ac * ec).sum() / denom) if denom > 0 else float("nan")
    slope = float((ac * ec).sum() / (ac * ac).sum()) if float((ac * ac).sum()) > 0 else float("nan")
    return AttributionComparison(r, int(a.numel()), float((a - e).abs().max()), slope, attribution, exact)
