"""Path patching (Wang et al. 2022, "Interpretability in the Wild", section 3 and appendix B).

Activation patching says *whether* a head matters; path patching says *through which path*. It
measures the effect of a set of **sender** heads on given **receivers** only, with every other
head held fixed:

1. Cache the clean (``x_orig``) and corrupted (``x_new``) runs.
2. Run on the base input with the senders' outputs (``hook_z``) patched from the other run and
   **every other head's output frozen** to its base value, at every position. Record the
   receivers' inputs: the senders' change reaches them only along direct paths (through the
   residual stream, and through MLPs, see below).
3. Run on the base input again with only the receivers' inputs patched to the recorded values;
   the rest of the model is recomputed. Score the output with the metric.

With ``receivers="logits"`` step 2's output *is* the answer: the senders' direct effect on the
logits (through the residual stream and the MLPs).

Choices, following the paper (and its reference implementation):

* ``direction="noise"`` (default, as in the paper): the base run is the clean one and the senders
  get their corrupted (ABC) outputs; ``"denoise"`` swaps the roles.
* MLPs are **recomputed** in step 2 (the paper freezes only attention heads, treating MLPs as part
  of the paths); ``freeze_mlps=True`` freezes them to their base values too.
* Receivers' inputs are patched at every position.
* **Grouped-query attention.** A receiver ``(layer, head, "q")`` is one query head: its query is
  ``hook_q[:, :, head]``. Keys and values exist per KV head, shared by the
  ``n_heads / n_kv_heads`` query heads of a group (SmolLM2: query heads 0-2 read KV head 0, 3-5
  KV head 1, 6-8 KV head 2). A ``"k"``/``"v"`` receiver named by a query head therefore patches
  the keys/values of its whole KV head, which every query head of the group reads; the result's
  ``meta["kv_receivers"]`` lists the KV heads patched and the query heads they feed.

Results use the scale of :mod:`mechlib.patching`: by default normalised so that 0 is the corrupted
run's metric and 1 the clean run's. Under ``"noise"`` a value of 1 means the path carries nothing,
and ``1 - value`` is the fraction of the clean-minus-corrupted difference that flows through it.

Each sender set is an intervention list (:mod:`mechlib.interventions`) run on any backend
(:mod:`mechlib.backends`). Sweeps over many sender sets (:func:`path_patch_sweep`: every head as a
sender; :func:`path_patch_many`: chosen sets, e.g. a class and its controls) batch the sets as rows
of few calls, on runs cached once; on the engine they are grouped by the sender layer and
resume from the base run at that layer.

Example:
    >>> heads = path_patch_sweep(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds),
    ...                          receivers=["L9H6", "L9H9"], component="q")        # doctest: +SKIP
    >>> heads.top(5, largest=False)                                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib import validate
from mechlib.backends import Backend, backend_arg, get_backend
from mechlib.interventions import Freeze, Intervention, Patch, Record, Replace, Site
from mechlib.metrics import Metric, as_metric
from mechlib.patching import PatchResult, base_runs, metric_scale
from mechlib.results import head_label
from mechlib.stats import Estimate, mean_ci
from mechlib.types import Model

__all__ = ["path_patch", "path_patch_many", "path_patch_sweep", "PathPatchResult", "normalize_receivers"]

HeadLike = Union[str, tuple[int, int]]


def normalize_receivers(model: Model, receivers: Iterable[HeadLike], component: str) -> dict[int, list[int]]:
    """``{layer: [index into hook_{component}'s head axis]}`` for query-head receivers.

    For ``"q"`` the index is the query head; for ``"k"``/``"v"`` the KV head the query head reads
    (``head // (n_heads // n_kv_heads)``).
    """
    validate.choice(component, "component", ("q", "k", "v"))
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    group = model.cfg.n_heads // n_kv
    out: dict[int, list[int]] = {}
    for l, h in validate.head_specs(model, receivers, "receivers"):
        idx = h if component == "q" else h // group
        out.setdefault(l, [])
        if idx not in out[l]:
            out[l].append(idx)
    return out


@dataclass
class PathPatchResult:
    """The metric with one sender set's path into the receivers patched.

    Attributes:
        value: The metric after the path patch (normalised unless ``normalise=False``).
        clean, corrupted: Raw metric on the clean and corrupted runs.
        senders: The sender heads.
        receivers: ``"logits"`` or the receiver heads.
        component: ``"q"``, ``"k"`` or ``"v"`` (``None`` for logits).
        meta: Direction, MLP choice, KV heads patched.
    """

    value: float
    clean: float
    corrupted: float
    senders: list[str]
    receivers: Union[str, list[str]]
    component: Optional[str]
    meta: dict[str, Any] = field(default_factory=dict)
    per_prompt: Optional[torch.Tensor] = None

    def stderr(self) -> float:
        """Standard error of ``value`` over prompts (``per_prompt``: one value per prompt, same scale)."""
        return self.ci().stderr

    def ci(self, confidence: float = 0.95) -> "Estimate":
        """``value`` with its bootstrap interval over prompts (:func:`mechlib.stats.mean_ci`)."""
        if self.per_prompt is None:
            raise ValueError(
                "no per-prompt values: the metric returned one number per batch; use a metric "
                "that returns [batch] values (every mechlib.metrics builder does)"
            )
        return mean_ci(self.per_prompt, confidence=confidence, name="per-prompt path patching values")

    @property
    def effect(self) -> float:
        """Fraction of the clean-minus-corrupted difference the path carries (normalised runs):
        ``1 - value`` when noising, ``value`` when denoising."""
        if not self.meta.get("normalised", True):
            raise ValueError("effect is defined on normalised results; rerun with normalise=True")
        return 1.0 - self.value if self.meta.get("direction") == "noise" else self.value

    def __repr__(self) -> str:
        rec = self.receivers if isinstance(self.receivers, str) else f"{self.receivers} ({self.component})"
        eff = f", effect {self.effect:.3f}" if self.meta.get("normalised", True) else ""
        return f"PathPatchResult({', '.join(self.senders)} -> {rec}: {self.value:.3f}{eff})"


class _PathPatcher:
    """Shared machinery: cached runs, the scale, and batched steps 2 and 3 for many sender sets."""

    def __init__(
        self, model, clean, corrupted, metric, receivers, component, direction, freeze_mlps, normalise, backend
    ):
        clean, corrupted = validate.token_pair(clean, corrupted, model)
        validate.choice(direction, "direction", ("denoise", "noise"))
        for flag, value in (("freeze_mlps", freeze_mlps), ("normalise", normalise)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        self.model = model
        self.metric = as_metric(metric)
        self.cfg = model.cfg
        self.L, self.H = self.cfg.n_layers, self.cfg.n_heads
        self.to_logits = isinstance(receivers, str) and receivers in ("logits", "resid_end")
        if not self.to_logits:
            if isinstance(receivers, str) and not receivers.upper().startswith("L") and "." not in receivers:
                raise ValueError(f"receivers must be 'logits' or heads like 'L9H6', (9, 6); got {receivers!r}")
            self.receivers = normalize_receivers(model, receivers, component)
            self.receiver_labels = [head_label(l, h) for l, h in validate.head_specs(model, receivers, "receivers")]
        self.component = None if self.to_logits else component
        if freeze_mlps and getattr(self.cfg, "attn_only", False):
            freeze_mlps = False
        self.freeze_mlps = freeze_mlps
        self.direction = direction
        self.backend = get_backend(model, backend)
        hooks = {f"blocks.{l}.attn.hook_z" for l in range(self.L)}
        if freeze_mlps:
            hooks |= {f"blocks.{l}.hook_mlp_out" for l in range(self.L)}
        self.runs, self.base, self.source = base_runs(self.backend, clean, corrupted, hooks, direction)
        self.B = clean.shape[0]
        self.vc, self.vk, self.offset, self.span = metric_scale(self.metric, self.runs, normalise)
        self.normalise = normalise

    def meta(self) -> dict[str, Any]:
        m = {
            "direction": self.direction,
            "freeze_mlps": self.freeze_mlps,
            "normalised": self.normalise,
            "clean": self.vc,
            "corrupted": self.vk,
            "backend": self.backend.name,
        }
        if not self.to_logits and self.component in ("k", "v"):
            n_kv = int(getattr(self.cfg, "n_key_value_heads", None) or self.H)
            g = self.H // n_kv
            m["kv_receivers"] = {
                f"L{l}KV{k}": [head_label(l, k * g + j) for j in range(g)]
                for l, ks in self.receivers.items()
                for k in ks
            }
        return m

    def step2(self, senders: list[tuple[int, int]]) -> list[Intervention]:
        """Senders' outputs from the source run, every other head frozen at the base run (MLPs too with
        ``freeze_mlps``) from the first sender's layer up; the receivers' inputs recorded."""
        start = min(l for l, _ in senders)
        stop = self.L - 1 if self.to_logits else max(self.receivers)
        out: list[Intervention] = []
        for l in range(start, min(stop + 1, self.L)):
            out.append(Intervention(Site("z", l), Freeze(self.base)))
            out += [Intervention(Site("z", l, head=h), Patch(self.source)) for sl, h in senders if sl == l]
            if self.freeze_mlps:
                out.append(Intervention(Site("mlp_out", l), Freeze(self.base)))
        if not self.to_logits:  # a receiver below every sender keeps its base input: nothing to record
            out += [Intervention(Site(self.component, l), Record(f"L{l}")) for l in self.receivers if l >= start]
        return out

    def run(
        self, sets: list[list[tuple[int, int]]], max_rows: int = 512, progress: bool = False
    ) -> tuple[list[float], Optional[torch.Tensor]]:
        """The (scaled) metric for each sender set, and per prompt ``[set, prompt]`` (``None`` for
        scalar metrics)."""
        be, m = self.backend, self.metric
        kw = dict(base=self.base, last_only=m.last_only, progress=progress, max_rows=max_rows)
        lists = [self.step2(s) for s in sets]
        if self.to_logits:
            values = be.run(self.runs, lists, score=m.evaluate, desc="path patching", **kw).values
        else:
            rec = be.run(self.runs, lists, score=None, desc="path patching (record)", **kw).records
            patched = [
                [
                    Intervention(Site(self.component, l, head=i), Replace(rec[(j, f"L{l}")]))
                    for l, idx in self.receivers.items()
                    if (j, f"L{l}") in rec
                    for i in idx
                ]
                for j in range(len(sets))
            ]
            values = be.run(self.runs, patched, score=m.evaluate, desc="path patching (receivers)", **kw).values
        scaled = (values.double() - self.offset) / self.span
        means = [float(v.mean()) for v in scaled]
        return means, (scaled.float() if scaled.ndim == 2 else None)

    def results(self, sets: list[list[tuple[int, int]]]) -> list["PathPatchResult"]:
        """One :class:`PathPatchResult` per sender set (each set's heads patched together)."""
        for s in sets:
            if not self.to_logits and min(l for l, _ in s) >= max(self.receivers):
                raise ValueError(
                    f"no path from senders {[head_label(*h) for h in s]} to receivers {self.receiver_labels}: every "
                    "sender is in the receivers' layer or above, so it cannot reach their inputs; pick senders in "
                    "earlier layers (or receivers='logits')"
                )
        values, per = self.run(sets)
        return [
            PathPatchResult(
                values[i],
                self.vc,
                self.vk,
                [head_label(*h) for h in s],
                "logits" if self.to_logits else self.receiver_labels,
                self.component,
                self.meta(),
                per_prompt=None if per is None else per[i],
            )
            for i, s in enumerate(sets)
        ]


def path_patch(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable],
    senders: Union[HeadLike, Sequence[HeadLike]],
    receivers: Union[str, Sequence[HeadLike]] = "logits",
    *,
    component: str = "q",
    direction: str = "noise",
    freeze_mlps: bool = False,
    normalise: bool = True,
    backend: Union[str, Backend] = "auto",
    use_engine: Optional[bool] = None,
) -> PathPatchResult:
    """Path-patch one set of sender heads into the receivers (all senders patched together).

    Args:
        model: A bridge from :func:`mechlib.load_model`.
        clean, corrupted: Token tensors of one shape ``[batch, pos]``.
        metric: A :class:`~mechlib.metrics.Metric` or callable ``logits -> scalar | [batch]``.
        senders: Heads, e.g. ``["L7H3", (8, 6)]``.
        receivers: ``"logits"`` (direct effect on the output) or query heads, e.g.
            ``["L9H6", "L9H9"]``, whose ``component`` input is patched.
        component: ``"q"``, ``"k"`` or ``"v"`` (``k``/``v`` patch the receiver's whole KV head on
            grouped-query models; see the module docstring).
        direction: ``"noise"`` (paper: corrupted senders into the clean run) or ``"denoise"``.
        freeze_mlps: Freeze MLP outputs in step 2 too (default: recomputed, as in the paper).
        normalise: Report 0 = corrupted run, 1 = clean run.
        backend: Where the steps run (:mod:`mechlib.backends`; see :func:`mechlib.patching.patch`):
            step 2 is one intervention list per sender set (``Freeze`` every head at the base run,
            ``Patch`` the senders from the source run, ``Record`` the receivers' inputs), step 3
            ``Replace``s the receivers' inputs by the records. ``use_engine`` is deprecated.

    Returns:
        A :class:`PathPatchResult`; ``per_prompt``, ``ci()`` and ``stderr()`` give its spread over prompts.

    Raises:
        ValueError: Bad token shapes, heads out of range, an unknown component or direction.
    """
    pp = _PathPatcher(
        model,
        clean,
        corrupted,
        metric,
        receivers,
        component,
        direction,
        freeze_mlps,
        normalise,
        backend_arg(backend, use_engine, "path_patch"),
    )
    return pp.results([validate.head_specs(model, senders, "senders")])[0]


def path_patch_many(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable],
    sender_sets: Sequence[Union[HeadLike, Sequence[HeadLike]]],
    receivers: Union[str, Sequence[HeadLike]] = "logits",
    *,
    component: str = "q",
    direction: str = "noise",
    freeze_mlps: bool = False,
    normalise: bool = True,
    backend: Union[str, Backend] = "auto",
) -> list[PathPatchResult]:
    """:func:`path_patch` for several sender sets into the same receivers (e.g. a class of heads
    and its random controls): the clean and corrupted runs are cached once and every set's steps
    run as one batch of intervention lists. Equal to one :func:`path_patch` call per set.

    Args:
        sender_sets: One entry per result, each heads patched together (``["L7H3", (8, 6)]``).
        Others as in :func:`path_patch`.

    Returns:
        One :class:`PathPatchResult` per sender set, in order.

    Example:
        >>> found, *controls = path_patch_many(model, ds.tokens, ds.corrupted_tokens, metric,
        ...                                    [["L7H3", "L8H6"], ["L7H1", "L8H2"]], ["L9H6"])  # doctest: +SKIP
    """
    if (
        isinstance(sender_sets, str)
        or not isinstance(sender_sets, Sequence)
        or not sender_sets
        or any(map(validate.is_head, sender_sets))
    ):
        raise TypeError(
            f"sender_sets must be a non-empty list of sender sets (each a list of heads), got {sender_sets!r:.80}; "
            "patch one set with path_patch"
        )
    pp = _PathPatcher(model, clean, corrupted, metric, receivers, component, direction, freeze_mlps, normalise, backend)
    return pp.results([validate.head_specs(model, s, f"sender_sets[{i}]") for i, s in enumerate(sender_sets)])


def path_patch_sweep(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable],
    receivers: Union[str, Sequence[HeadLike]] = "logits",
    *,
    component: str = "q",
    senders: Optional[Sequence[HeadLike]] = None,
    direction: str = "noise",
    freeze_mlps: bool = False,
    normalise: bool = True,
    max_rows: int = 512,
    progress: bool = True,
    backend: Union[str, Backend] = "auto",
    use_engine: Optional[bool] = None,
) -> PatchResult:
    """Path-patch every head (or ``senders``) singly into the receivers: a layer x head grid.

    Senders at or above the last receiver layer have no path to it and are left NaN. Arguments
    as in :func:`path_patch`; ``max_rows`` bounds the rows (sender sets x prompts) per call.
    """
    max_rows = validate.whole(max_rows, "max_rows", minimum=1)
    pp = _PathPatcher(
        model,
        clean,
        corrupted,
        metric,
        receivers,
        component,
        direction,
        freeze_mlps,
        normalise,
        backend_arg(backend, use_engine, "path_patch_sweep"),
    )
    top = model.cfg.n_layers if pp.to_logits else max(pp.receivers)
    cands = (
        validate.head_specs(model, senders, "senders")
        if senders is not None
        else [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    )
    cands = [c for c in cands if c[0] < top]
    if not cands:
        raise ValueError(
            f"no sender lies below the receivers {pp.receiver_labels}: a sender must be in an earlier "
            "layer than the last receiver to reach it"
        )
    vals, per = pp.run([[c] for c in cands], max_rows=max_rows, progress=progress)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    grid = torch.full((L, H), float("nan"))
    per_prompt = None if per is None else torch.full((pp.B, L, H), float("nan"))
    for i, ((l, h), v) in enumerate(zip(cands, vals)):
        grid[l, h] = v
        if per_prompt is not None:
            per_prompt[:, l, h] = per[i]
    rec = "logits" if pp.to_logits else f"{', '.join(pp.receiver_labels)} ({component})"
    return PatchResult(
        grid,
        ("layer", "head"),
        {},
        title=f"path patching: head -> {rec}",
        metric=("normalised " if normalise else "") + pp.metric.name,
        meta={**pp.meta(), "receivers": rec, "target": "path"},
        per_prompt=per_prompt,
    )
