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

The gradient pass runs on a backend (:meth:`mechlib.backends.Backend.gradients`: the engine with
autograd, or the bridge's hooks, where ``resid_mid`` is a true intervention point as in patching;
``backend=`` as in :func:`mechlib.patching.patch`). Per-prompt estimates give error bars. Targets and directions are those of
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

from mechlib import validate
from mechlib.backends import Backend, Runs, backend_arg, get_backend
from mechlib.interventions import Intervention, Record, Site
from mechlib.metrics import Metric, as_metric
from mechlib.patching import PatchResult, Target, metric_scale, position_labels, resolve_target
from mechlib.stats import Estimate
from mechlib.types import Model

__all__ = ["attribution_patch", "compare", "AttributionComparison"]


def _differentiable(metric: Metric):
    """``logits -> batch-mean metric``, refusing metrics with no gradient in the logits."""

    def scalar(logits: torch.Tensor) -> torch.Tensor:
        value = metric.scalar(logits)
        if not value.requires_grad:
            raise ValueError(
                f"metric {metric.name!r} is not differentiable in the logits (its value has no gradient: a "
                "comparison, argmax, .detach() or a rounding cut it off); attribution patching needs a smooth metric "
                "such as a logit difference or a probability. Use mechlib.patching.patch for hard metrics"
            )
        return value

    return scalar


def attribution_patch(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    target: Union[str, Target] = "head_out_by_pos",
    *,
    direction: str = "denoise",
    layers: Optional[Sequence[int]] = None,
    normalise: bool = True,
    pos_labels: Optional[Sequence[str]] = None,
    backend: Union[str, Backend] = "auto",
    use_engine: Optional[bool] = None,
) -> PatchResult:
    """Estimate a :func:`mechlib.patching.patch` grid from two forwards and one backward.

    Args:
        model, clean, corrupted, metric, target, direction, layers, normalise, pos_labels,
            backend, use_engine: As in :func:`mechlib.patching.patch` (the forward and backward run
            on the backend; ``"engine"`` and ``"bridge"`` compute gradients). The metric is
            averaged over the batch before the backward pass, as the exact sweep averages it.

    Returns:
        A :class:`~mechlib.patching.PatchResult` with the estimated metric after each patch
        (``meta["method"] == "attribution"``), and per prompt (``per_prompt``; prompts are
        independent, so prompt ``i``'s estimate is its own metric plus ``B`` times its share of
        the batch-mean gradient product).
    """
    clean, corrupted = validate.token_pair(clean, corrupted, model)
    t = resolve_target(target, model)
    metric = as_metric(metric)
    validate.choice(direction, "direction", ("denoise", "noise"))
    layers_ = validate.layer_list(model, layers)
    for flag, value in (("normalise", normalise),):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    be = get_backend(model, backend_arg(backend, use_engine, "attribution_patch"))
    hooks = [t.hook_name(l) for l in layers_]
    be.check([[Intervention(Site(t.point, l), Record("a")) for l in layers_]])
    base_name, src_name = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    base_tokens, src_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    src = be.cache({src_name: src_tokens}, hooks)
    base_logits, base_acts, grads = be.gradients(base_tokens, hooks, _differentiable(metric))
    # Clean and corrupted scores for the scale: the two runs above are one of each.
    both = Runs(dict(src.tokens, **{base_name: base_tokens}), dict(src.logits, **{base_name: base_logits}), {})
    vc, vk, offset, span = metric_scale(metric, both, normalise)
    base_per = metric.evaluate(base_logits[:, -1:] if metric.last_only else base_logits).detach().float().cpu()

    B, T = clean.shape
    n_heads = int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) if t.kv else model.cfg.n_heads
    shape = [model.cfg.n_layers] + ([n_heads] if t.has_head else []) + ([T] if t.by_pos else [])
    values = torch.full(shape, float("nan"))
    per_prompt = torch.full([B] + shape, float("nan")) if base_per.ndim == 1 else None
    for l, h in zip(layers_, hooks):
        prod = ((src[src_name][h].float() - base_acts[h].float()) * grads[h].float()).detach().cpu()
        if t.kind == "resid":  # [B, T, d] -> [B, T]
            est = prod.sum(-1)
        elif t.kind == "head":  # [B, T, H, dh] -> [B, H, T] or [B, H]
            est = prod.sum(-1).transpose(1, 2)
            est = est if t.by_pos else est.sum(-1)
        else:  # pattern [B, H, Tq, Tk] -> [B, H, Tq] or [B, H]
            est = prod.sum(-1)
            est = est if t.by_pos else est.sum(-1)
        values[l] = (float(base_per.mean()) + est.sum(0) - offset) / span
        if per_prompt is not None:
            extra = (1,) * (est.ndim - 1)
            per_prompt[:, l] = (base_per.reshape(B, *extra) + B * est - offset) / span

    what = {"denoise": "clean -> corrupted", "noise": "corrupted -> clean"}[direction]
    return PatchResult(
        values,
        t.dims(),
        {"pos": position_labels(model, clean, pos_labels)} if t.by_pos else {},
        title=f"attribution patching {t.name} ({what})",
        metric=("normalised " if normalise else "") + metric.name,
        meta={
            "clean": vc,
            "corrupted": vk,
            "direction": direction,
            "target": t.name,
            "normalised": normalise,
            "method": "attribution",
            "n_prompts": B,
            "backend": be.name,
        },
        per_prompt=per_prompt,
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
        return (
            f"AttributionComparison({self.attribution.meta.get('target')}: r={self.correlation:.3f} over "
            f"{self.n} cells, slope {self.slope:.2f}, max |error| {self.max_abs_error:.3g})"
        )

    def correlation_ci(self, confidence: float = 0.95, *, n_resamples: int = 2000, seed: int = 0) -> Estimate:
        """:attr:`correlation` with a percentile-bootstrap interval over *prompts*: each resample
        draws prompts with replacement, averages both grids' ``per_prompt`` values over them and
        correlates the two mean grids (cells NaN in either grid are left out).

        Raises:
            ValueError: A grid without per-prompt values, or the two from different numbers of prompts.
        """
        from transformer_lens.utilities.statistics import derive_generator

        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        pa, pe = self.attribution._need_prompts(), self.exact._need_prompts()
        if pa.shape != pe.shape:
            raise ValueError(f"per-prompt grids differ: {tuple(pa.shape)} vs {tuple(pe.shape)}")
        n = pa.shape[0]
        a, e = pa.reshape(n, -1).double(), pe.reshape(n, -1).double()
        keep = ~(torch.isnan(a).any(0) | torch.isnan(e).any(0))
        a, e = a[:, keep], e[:, keep]
        if n == 1:
            return Estimate(self.correlation, self.correlation, self.correlation, 1, confidence, "single")
        idx = torch.randint(0, n, (n_resamples, n), generator=derive_generator(seed, "correlation_ci"))
        am, em = a[idx].mean(1), e[idx].mean(1)  # [resample, cell]
        am, em = am - am.mean(1, keepdim=True), em - em.mean(1, keepdim=True)
        r = (am * em).sum(1) / (am.norm(dim=1) * em.norm(dim=1))
        r = r[torch.isfinite(r)]
        alpha = (1 - confidence) / 2
        lo, hi = torch.quantile(r, alpha), torch.quantile(r, 1 - alpha)
        return Estimate(self.correlation, float(lo), float(hi), n, confidence, "bootstrap", float(r.std()))

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
    for name, g in (("attribution", attribution), ("exact", exact)):
        if not isinstance(g, PatchResult):
            raise TypeError(f"{name} must be a PatchResult (from attribution_patch / patch), got {type(g).__name__}")
    if attribution.dims != exact.dims or attribution.values.shape != exact.values.shape:
        raise ValueError(
            f"grids differ: attribution {attribution.dims} {tuple(attribution.values.shape)} vs exact "
            f"{exact.dims} {tuple(exact.values.shape)}; run both on the same target, layers and prompts"
        )
    # Same shape is not enough: a noising grid against a denoising one (or raw against normalised
    # values, or other prompts) gives a correlation that means nothing.
    am, em = attribution.meta, exact.meta
    for key, what in (("direction", "direction"), ("target", "target"), ("normalised", "normalisation")):
        if am.get(key) != em.get(key):
            raise ValueError(
                f"grids differ in {what}: attribution {key}={am.get(key)!r}, exact {key}={em.get(key)!r}; "
                f"run both with the same {key}"
            )
    for key in ("clean", "corrupted"):
        a_v, e_v = am.get(key), em.get(key)
        if a_v is not None and e_v is not None and abs(a_v - e_v) > 1e-3 * max(1.0, abs(a_v), abs(e_v)):
            raise ValueError(
                f"grids come from different runs: the {key} metric is {a_v:.6g} for the attribution grid and {e_v:.6g} "
                "for the exact one; run both on the same prompts, metric and model"
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
