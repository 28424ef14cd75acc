"""Activation patching: which activations carry the difference between a clean and a corrupted run.

Patch one activation from a *source* run into a *base* run, run on, and score the output with a
metric. Two directions:

* ``"denoise"`` (default; TransformerLens's convention): clean activations into the corrupted
  run. A high score means the activation is *sufficient* to restore the behaviour.
* ``"noise"``: corrupted activations into the clean run. A low score means it is *necessary*.

Both are reported on the same normalised scale by default: ``0`` is the corrupted run's score and
``1`` the clean run's.

Targets (``target=``; grids are labelled :class:`PatchResult` objects):

==================  ==============================  ===========================
target              hook                            grid axes
==================  ==============================  ===========================
``resid_pre``       ``blocks.{l}.hook_resid_pre``   layer x pos
``resid_mid``       ``blocks.{l}.hook_resid_mid``   layer x pos
``resid_post``      ``blocks.{l}.hook_resid_post``  layer x pos
``attn_out``        ``blocks.{l}.hook_attn_out``    layer x pos
``mlp_out``         ``blocks.{l}.hook_mlp_out``     layer x pos
``head_out``        ``blocks.{l}.attn.hook_z``      layer x head (all positions)
``head_out_by_pos`` ``blocks.{l}.attn.hook_z``      layer x head x pos
``q`` / ``q_by_pos``  ``attn.hook_q``                 layer x head [x pos]
``k`` / ``k_by_pos``  ``attn.hook_k``                 layer x kv_head [x pos]
``v`` / ``v_by_pos``  ``attn.hook_v``                 layer x kv_head [x pos]
``pattern`` / ``pattern_by_pos``  ``attn.hook_pattern``  layer x head [x query pos]
==================  ==============================  ===========================

On grouped-query models (SmolLM2: 9 query heads, 3 KV heads) keys and values exist per *KV head*,
so ``k``/``v`` grids have a ``kv_head`` axis of ``n_key_value_heads`` entries (as in
``transformer_lens.patching``); a KV head feeds ``n_heads / n_kv_heads`` query heads.

Execution. A sweep is a list of interventions per cell (:mod:`mechlib.interventions`: the cell's
site set from the source run, ``Patch``) handed to a backend (:mod:`mechlib.backends`), which
batches the lists as rows of few forward calls. ``backend="auto"`` runs on :mod:`mechlib.engine`
when it mirrors the model: the two base runs are cached once, every call resumes from the base run
at its earliest patched layer and position (exact: attention is causal), cells are grouped by
(position, layer) and small groups merge with the next layers until a call has ``min_rows`` rows,
and with a ``last_only`` metric only the last position is unembedded. Other models run on the
bridge's hooks (same batching, no reuse); ``backend="nnsight"`` runs any Hugging Face model
through nnsight, locally or on NDIF. ``result.meta["backend"]`` names the one used. Results match
``transformer_lens.patching.get_act_patch_*`` to float rounding (``tests/test_patching.py``), on
every backend (``tests/test_backends.py``).

Error bars. With a metric that returns one value per prompt, results keep ``per_prompt``
``[prompt, *grid]``; ``result.stderr()`` and ``result.ci(0.95)`` are grids of standard errors and
bootstrap intervals over prompts, and ``result.plot_top(k)`` draws the top cells with them.

Example:
    >>> from mechlib.ioi import make_ioi_dataset                                # doctest: +SKIP
    >>> from mechlib.metrics import ioi_metric                                  # doctest: +SKIP
    >>> ds = make_ioi_dataset(model, 8, seed=0)                                 # doctest: +SKIP
    >>> grid = patch(model, ds.tokens, ds.corrupted_tokens, ioi_metric(ds),     # doctest: +SKIP
    ...              target="head_out_by_pos", pos_labels=ds.labels(0))
    >>> grid.top(5); grid.plot()                                                # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib import validate
from mechlib.attention import head_attention  # re-exported: it lives in mechlib.attention
from mechlib.backends import Backend, Runs, backend_arg, get_backend
from mechlib.circuits import (  # re-exported: they live in mechlib.circuits
    CircuitEvaluator,
    CircuitScore,
    evaluate_circuit,
)
from mechlib.interventions import Intervention, Patch, Site, point_of_hook
from mechlib.metrics import Metric, as_metric
from mechlib.results import Grid, PromptGrid, head_label
from mechlib.types import Model

__all__ = [
    "TARGETS",
    "Target",
    "PatchResult",
    "patch",
    "patch_many",
    "check_pair",
    "check_layers",
    "check_heads",
    "patch_lists",
    "base_runs",
    "resolve_target",
    "position_labels",
    "metric_scale",
    "head_attention",
    "evaluate_circuit",
    "CircuitEvaluator",
    "CircuitScore",
]

_DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Target:
    """What a sweep patches: the hook, the activation's layout, and whether it goes by position.

    ``kind`` is ``"resid"`` (``[batch, pos, d]``), ``"head"`` (``[batch, pos, head, d_head]``) or
    ``"pattern"`` (``[batch, head, query, key]``); ``kv`` marks per-KV-head activations.
    """

    name: str
    hook: str
    kind: str
    by_pos: bool
    kv: bool = False

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    @property
    def point(self) -> str:
        """The :mod:`mechlib.interventions` point of the hook (``"z"``, ``"resid_pre"``, ...)."""
        return point_of_hook(self.hook_name(0))[0].name

    @property
    def has_head(self) -> bool:
        return self.kind != "resid"

    def dims(self) -> tuple[str, ...]:
        if not self.has_head:
            return ("layer", "pos")
        head = "kv_head" if self.kv else "head"
        return ("layer", head, "pos") if self.by_pos else ("layer", head)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("resid_pre", "hook_resid_pre", "resid", True),
        Target("resid_mid", "hook_resid_mid", "resid", True),
        Target("resid_post", "hook_resid_post", "resid", True),
        Target("attn_out", "hook_attn_out", "resid", True),
        Target("mlp_out", "hook_mlp_out", "resid", True),
        Target("head_out", "attn.hook_z", "head", False),
        Target("head_out_by_pos", "attn.hook_z", "head", True),
        Target("q", "attn.hook_q", "head", False),
        Target("q_by_pos", "attn.hook_q", "head", True),
        Target("k", "attn.hook_k", "head", False, kv=True),
        Target("k_by_pos", "attn.hook_k", "head", True, kv=True),
        Target("v", "attn.hook_v", "head", False, kv=True),
        Target("v_by_pos", "attn.hook_v", "head", True, kv=True),
        Target("pattern", "attn.hook_pattern", "pattern", False),
        Target("pattern_by_pos", "attn.hook_pattern", "pattern", True),
    ]
}


# ---- results ---------------------------------------------------------------------------------


@dataclass(repr=False, eq=False)
class PatchResult(PromptGrid):
    """A patching grid: a :class:`~mechlib.results.PromptGrid` that knows its clean/corrupted scores.

    Cells a sweep did not compute (``layers=``/``heads=``/``positions=`` subsets) are NaN and
    ignored by :meth:`top`. ``meta`` holds ``clean``, ``corrupted`` (raw metric values),
    ``direction``, ``target``, ``normalised``, ``backend`` (the one that ran it).

    ``per_prompt`` ``[prompt, *grid]`` holds each prompt's value on the grid's scale (their mean
    is ``values``) when the metric returns one value per prompt; :meth:`stderr` and :meth:`ci`
    turn it into error bars over prompts, :meth:`estimate` into one cell's interval,
    :meth:`plot_top` draws the top cells with them (all from :class:`~mechlib.results.PromptGrid`).

    Example:
        >>> g = patch(model, clean, corrupted, metric, "head_out")                 # doctest: +SKIP
        >>> low, high = g.ci(0.95)                                                 # doctest: +SKIP
        >>> g.plot_top(8)                                                          # doctest: +SKIP
    """

    _ci_label: ClassVar[str] = "patch_ci"
    _ci_resamples: ClassVar[int] = 1000

    def __repr__(self) -> str:
        return Grid.__repr__(self)

    def label(self, **coords: int) -> str:
        if set(coords) == {"layer", "kv_head"}:
            return f"L{coords['layer']}KV{coords['kv_head']}"
        return super().label(**coords)

    def heads(self) -> Grid:
        """Head-by-position grids flattened to ``("head", "pos")`` rows labelled ``L5H1``."""
        if len(self.dims) != 3:
            raise ValueError(f"heads() flattens a layer x head x pos grid; this one is {self.dims}")
        L, H, P = self.values.shape
        hname = self.dims[1]
        rows = [(f"L{l}KV{h}" if hname == "kv_head" else head_label(l, h)) for l in range(L) for h in range(H)]
        return Grid(
            self.values.reshape(L * H, P),
            ("head", "pos"),
            {"head": rows, "pos": self.labels["pos"]},
            self.title,
            self.metric,
            self.meta,
        )

    def plot(self, ax: Optional[Any] = None, **kw: Any):
        """Heatmap; a layer x head x pos grid is drawn as one (layer, head) row per head."""
        if len(self.dims) == 3:
            g = self.heads()
            keep = ~torch.isnan(g.values).all(dim=1)
            if not keep.all():
                idx = keep.nonzero().flatten().tolist()
                g = Grid(
                    g.values[idx],
                    g.dims,
                    {"head": [g.labels["head"][i] for i in idx], "pos": g.labels["pos"]},
                    g.title,
                    g.metric,
                    g.meta,
                )
            fig = g.plot(ax=ax, **kw)
            a = fig.axes[0] if ax is None else ax
            if g.values.shape[0] <= 60:
                a.set_yticks(range(g.values.shape[0]), g.labels["head"], fontsize=6)
            return fig
        return super().plot(ax=ax, **kw)


# ---- input checks ----------------------------------------------------------------------------


def check_pair(clean: Any, corrupted: Any, model: Optional[Model] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mechlib.validate.token_pair`: clean and corrupted ``[batch, pos]`` id tensors of one shape."""
    return validate.token_pair(clean, corrupted, model)


def check_layers(model: Model, layers: Optional[Iterable[int]]) -> list[int]:
    """:func:`mechlib.validate.layer_list`: every layer for ``None``, else sorted unique checked ints."""
    return validate.layer_list(model, layers)


def check_heads(model: Model, heads: Optional[Iterable[int]], kv: bool = False) -> list[int]:
    """:func:`mechlib.validate.head_list`: every (KV) head for ``None``, else sorted unique checked ints."""
    return validate.head_list(model, heads, kv=kv)


_n_kv = validate.n_kv_heads


def resolve_target(name: Union[str, Target], model: Model) -> Target:
    """The :class:`Target` named ``name`` (one of :data:`TARGETS`), checked against ``model``."""
    if isinstance(name, Target):
        return name
    if not isinstance(name, str) or name not in TARGETS:
        raise KeyError(f"unknown patching target {name!r}; choose one of {sorted(TARGETS)}")
    t = TARGETS[name]
    if t.hook in ("hook_resid_mid", "hook_mlp_out") and getattr(model.cfg, "attn_only", False):
        raise KeyError(f"target {name!r} does not exist on an attention-only model (no MLPs)")
    return t


def position_labels(model: Model, tokens: torch.Tensor, given: Optional[Sequence[str]]) -> list[str]:
    """One label per position: ``given`` (checked), else the first prompt's string tokens, else ``"0", "1", ...``."""
    n = tokens.shape[1]
    if given is not None:
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise TypeError(f"pos_labels must be a list with one label per position, got {type(given).__name__}")
        if len(given) != n:
            raise ValueError(f"pos_labels has {len(given)} entries for {n} positions")
        return [str(x) for x in given]
    if getattr(model, "tokenizer", None) is not None:
        try:
            return [str(s) for s in model.to_str_tokens(tokens[0])]
        except Exception:
            pass
    return [str(i) for i in range(n)]


# ---- running: intervention lists on a backend ------------------------------------------------


@dataclass
class _Cell:
    layer: int
    head: Optional[int]
    pos: Optional[int]
    index: tuple[int, ...]  # where the value goes in the grid


def _cells(t: Target, layers: list[int], heads: list[int], positions: list[int]) -> list[_Cell]:
    cells = []
    for l in layers:
        if not t.has_head:
            cells += [_Cell(l, None, p, (l, p)) for p in positions]
        elif t.by_pos:
            cells += [_Cell(l, h, p, (l, h, p)) for h in heads for p in positions]
        else:
            cells += [_Cell(l, h, None, (l, h)) for h in heads]
    return cells


def patch_lists(t: Target, cells: Sequence[_Cell], source: str) -> list[list[Intervention]]:
    """One intervention list per cell: the cell's site set from the ``source`` run."""
    return [
        [
            Intervention(
                Site(t.point, c.layer, head=c.head, positions=None if c.pos is None else (c.pos,)), Patch(source)
            )
        ]
        for c in cells
    ]


def base_runs(
    be: Backend, clean: torch.Tensor, corrupted: torch.Tensor, hooks: Iterable[str], direction: str
) -> tuple[Runs, str, str]:
    """The clean and corrupted runs cached on ``be``, and the names of the base and source runs."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    runs = be.cache({"clean": clean, "corrupted": corrupted}, hooks)
    base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    return runs, base, source


def metric_scale(metric: Metric, runs: Runs, normalise: bool) -> tuple[float, float, float, float]:
    """Clean and corrupted metric values, and the affine map (offset, span) to report in."""
    clean, corrupted = runs.logits["clean"], runs.logits["corrupted"]
    metric.check(clean)  # a finite float metric whose last_only claim holds, before any sweep
    metric.check(corrupted)
    vc = float(metric.scalar(clean[:, -1:] if metric.last_only else clean))
    vk = float(metric.scalar(corrupted[:, -1:] if metric.last_only else corrupted))
    if not normalise:
        return vc, vk, 0.0, 1.0
    span = vc - vk
    if abs(span) < 1e-8:
        raise ValueError(
            f"cannot normalise: the clean ({vc:.4g}) and corrupted ({vk:.4g}) runs score the same on "
            f"{metric.name!r}; pass normalise=False or prompts the metric tells apart"
        )
    return vc, vk, vk, span


def _scatter(
    values: torch.Tensor, cells: Sequence[Any], shape: Sequence[int], offset: float, span: float
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Grid of scaled means, and ``[prompt, *grid]`` scaled per-prompt values (``None`` for scalar metrics)."""
    grid = torch.full(tuple(shape), float("nan"))
    per = torch.full((values.shape[1], *shape), float("nan")) if values.ndim == 2 else None
    for cell, v in zip(cells, values):
        idx = cell.index if hasattr(cell, "index") else cell
        grid[idx] = (float(v.mean()) - offset) / span
        if per is not None:
            per[(slice(None), *idx)] = (v - offset) / span
    return grid, per


def patch(
    model: Model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, Callable[[torch.Tensor], Any]],
    target: Union[str, Target] = "head_out_by_pos",
    *,
    direction: str = "denoise",
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    positions: Optional[Iterable[int]] = None,
    normalise: bool = True,
    progress: bool = True,
    min_rows: int = 32,
    max_rows: Optional[int] = None,
    pos_labels: Optional[Sequence[str]] = None,
    backend: Union[str, Backend] = "auto",
    use_engine: Optional[bool] = None,
) -> PatchResult:
    """Activation-patching sweep of one target over layers (x heads) (x positions).

    Args:
        model: A bridge from :func:`mechlib.load_model`.
        clean: Clean tokens ``[batch, pos]``.
        corrupted: Corrupted tokens, same shape, aligned position by position.
        metric: A :class:`~mechlib.metrics.Metric` or a callable ``logits -> scalar | [batch]``
            (plain callables get full logits; a ``Metric`` with ``last_only`` gets ``[batch, 1,
            vocab]``, much cheaper).
        target: One of :data:`TARGETS` (see the module docstring).
        direction: ``"denoise"`` (clean into corrupted, TransformerLens's convention) or ``"noise"``
            (corrupted into clean).
        layers, heads, positions: Subsets to sweep (default all); cells left out are NaN.
            For ``k``/``v`` targets ``heads`` are KV heads.
        normalise: Report ``(m - m_corrupted) / (m_clean - m_corrupted)`` (0 = corrupted run,
            1 = clean run) instead of the raw metric.
        progress: Show a tqdm bar.
        min_rows: Merge cells of consecutive layers (same start position) into one call until it
            has at least this many rows (rows = cells x prompts).
        max_rows: Most rows per call (default: 4096, or what fits 60M logit floats when the metric
            needs every position).
        pos_labels: Labels of the position axis (default: the first prompt's string tokens).
        backend: ``"auto"`` (the engine where it mirrors the model, else the bridge), ``"engine"``,
            ``"bridge"``, ``"nnsight"`` or a :class:`~mechlib.backends.Backend`
            (:mod:`mechlib.backends`); the one used is ``result.meta["backend"]``.
        use_engine: Deprecated: ``False`` is ``backend="bridge"``.

    Returns:
        A :class:`PatchResult` with axes ``Target.dims()``; ``per_prompt`` holds each prompt's
        value (``stderr()``, ``ci()`` give error bars over prompts).

    Raises:
        ValueError: Token shapes differ, layer/head/position out of range, a metric of the wrong
            output shape, an unknown direction.
        KeyError: An unknown target.
    """
    clean, corrupted = validate.token_pair(clean, corrupted, model)
    t = resolve_target(target, model)
    metric = as_metric(metric)
    validate.choice(direction, "direction", _DIRECTIONS)
    B, T = clean.shape
    layers_ = validate.layer_list(model, layers)
    if heads is not None and not t.has_head:
        raise ValueError(
            f"heads: target {t.name!r} has no head axis (it patches the whole residual/layer output); "
            "leave heads=None, or patch a head target such as 'head_out_by_pos'"
        )
    heads_ = validate.head_list(model, heads, kv=t.kv) if t.has_head else []
    if positions is not None and not t.by_pos:
        raise ValueError(f"target {t.name!r} patches all positions at once; use {t.name + '_by_pos'!r} for positions")
    positions_ = validate.position_list(T, positions)
    for flag, value in (("normalise", normalise), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    min_rows = validate.whole(min_rows, "min_rows", minimum=1)
    if max_rows is not None:
        max_rows = validate.whole(max_rows, "max_rows", minimum=1)
    be = get_backend(model, backend_arg(backend, use_engine, "patch"))
    hooks = {t.hook_name(l) for l in layers_}
    runs, base, source = base_runs(be, clean, corrupted, hooks, direction)
    vc, vk, offset, span = metric_scale(metric, runs, normalise)
    # Check the metric's output shape once, up front, on the base run.
    metric.evaluate(runs.last_logits(base)[:, None] if metric.last_only else runs.logits[base])

    cells = _cells(t, layers_, heads_, positions_)
    out = be.run(
        runs,
        patch_lists(t, cells, source),
        base=base,
        score=metric.evaluate,
        last_only=metric.last_only,
        progress=progress,
        min_rows=min_rows,
        max_rows=max_rows,
        desc=f"patch {t.name} ({direction})",
    )
    n_heads = (_n_kv(model) if t.kv else model.cfg.n_heads) if t.has_head else None
    shape = [model.cfg.n_layers] + ([n_heads] if t.has_head else []) + ([T] if t.by_pos else [])
    values, per_prompt = _scatter(out.values, cells, shape, offset, span)

    dims = t.dims()
    labels: dict[str, list[str]] = {"pos": position_labels(model, clean, pos_labels)} if t.by_pos else {}
    what = {"denoise": "clean -> corrupted", "noise": "corrupted -> clean"}[direction]
    return PatchResult(
        values,
        dims,
        labels,
        title=f"patching {t.name} ({what})",
        metric=("normalised " if normalise else "") + metric.name,
        meta={
            "clean": vc,
            "corrupted": vk,
            "direction": direction,
            "target": t.name,
            "normalised": normalise,
            "n_prompts": B,
            "calls": out.calls,
            "backend": be.name,
        },
        per_prompt=per_prompt,
    )


def patch_many(
    model: Model,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Union[Metric, Callable],
    targets: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    **kwargs: Any,
) -> dict[str, PatchResult]:
    """:func:`patch` for several targets, as ``{target: PatchResult}``."""
    targets = validate.str_list(targets, "targets")
    return {t: patch(model, clean, corrupted, metric, t, **kwargs) for t in targets}
