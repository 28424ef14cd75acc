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

Speed. Sweeps run on :mod:`mechlib.engine` when the model can be mirrored: the two base runs are
cached once; every patch resumes from the base run at the patched layer and position (the layers
below and the positions before it are exact to reuse: attention is causal), and many patches
(cells x prompts) share one forward call as rows of a batch. Cells are grouped by (position,
layer); small groups merge with the next layers until a call has ``min_rows`` rows. When the metric
declares ``last_only`` only the last position is unembedded. Models the engine cannot mirror fall
back to the bridge's hooks (same batching, no reuse). Results match
``transformer_lens.patching.get_act_patch_*`` to float rounding (``tests/test_patching.py``).

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
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from mechlib.engine import BaseRun, EditContext, get_engine
from mechlib.metrics import Metric, as_metric
from mechlib.results import Grid, head_label

__all__ = [
    "TARGETS",
    "Target",
    "PatchResult",
    "patch",
    "patch_many",
    "check_pair",
    "check_layers",
    "check_heads",
    "Runner",
    "head_attention",
    "evaluate_circuit",
    "CircuitScore",
]

# Floats of logits one call may hold when a metric needs every position (rows x pos x vocab).
_MAX_LOGIT_FLOATS = 6e7
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


class PatchResult(Grid):
    """A patching grid: a :class:`~mechlib.results.Grid` that knows its clean/corrupted scores.

    Cells a sweep did not compute (``layers=``/``heads=``/``positions=`` subsets) are NaN and
    ignored by :meth:`top`. ``meta`` holds ``clean``, ``corrupted`` (raw metric values),
    ``direction``, ``target``, ``normalised``.
    """

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
        rows = [
            (f"L{l}KV{h}" if hname == "kv_head" else head_label(l, h)) for l in range(L) for h in range(H)
        ]
        return Grid(self.values.reshape(L * H, P), ("head", "pos"), {"head": rows, "pos": self.labels["pos"]},
                    self.title, self.metric, self.meta)

    def plot(self, ax: Optional[Any] = None, **kw: Any):
        """Heatmap; a layer x head x pos grid is drawn as one (layer, head) row per head."""
        if len(self.dims) == 3:
            g = self.heads()
            keep = ~torch.isnan(g.values).all(dim=1)
            if not keep.all():
                idx = keep.nonzero().flatten().tolist()
                g = Grid(g.values[idx], g.dims, {"head": [g.labels["head"][i] for i in idx], "pos": g.labels["pos"]},
                         g.title, g.metric, g.meta)
            fig = g.plot(ax=ax, **kw)
            a = fig.axes[0] if ax is None else ax
            if g.values.shape[0] <= 60:
                a.set_yticks(range(g.values.shape[0]), g.labels["head"], fontsize=6)
            return fig
        return super().plot(ax=ax, **kw)


# ---- input checks ----------------------------------------------------------------------------


def check_pair(clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    """Raise ``ValueError`` unless clean and corrupted are token tensors of one shape ``[batch, pos]``."""
    for name, t in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} tokens must be a [batch, pos] tensor, got {shape}; use model.to_tokens(prompts)")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in shape; "
            "patching pairs them row by row and position by position, so build prompts of equal token length "
            "(e.g. mechlib.ioi.make_ioi_dataset)"
        )


def check_layers(model: Any, layers: Optional[Iterable[int]]) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    out = sorted({int(l) for l in layers})
    bad = [l for l in out if not 0 <= l < n]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{n - 1}")
    return out


def check_heads(model: Any, heads: Optional[Iterable[int]], kv: bool = False) -> list[int]:
    n = _n_kv(model) if kv else model.cfg.n_heads
    if heads is None:
        return list(range(n))
    out = sorted({int(h) for h in heads})
    bad = [h for h in out if not 0 <= h < n]
    if bad:
        what = "key/value heads" if kv else "heads"
        raise ValueError(f"head(s) {bad} out of range: this model has {n} {what} per layer (0..{n - 1})")
    return out


def _n_kv(model: Any) -> int:
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def _target(name: Union[str, Target], model: Any) -> Target:
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise KeyError(f"unknown patching target {name!r}; choose one of {sorted(TARGETS)}")
    t = TARGETS[name]
    if t.hook in ("hook_resid_mid", "hook_mlp_out") and getattr(model.cfg, "attn_only", False):
        raise KeyError(f"target {name!r} does not exist on an attention-only model (no MLPs)")
    return t


def _pos_labels(model: Any, tokens: torch.Tensor, given: Optional[Sequence[str]]) -> list[str]:
    n = tokens.shape[1]
    if given is not None:
        if len(given) != n:
            raise ValueError(f"pos_labels has {len(given)} entries for {n} positions")
        return [str(x) for x in given]
    if getattr(model, "tokenizer", None) is not None:
        try:
            return [str(s) for s in model.to_str_tokens(tokens[0])]
        except Exception:
            pass
    return [str(i) for i in range(n)]


# ---- running: the engine, or the bridge's hooks ----------------------------------------------


@dataclass
class Cached:
    """A base run: tokens, logits, the activations a sweep needs, and the engine's run if any."""

    tokens: torch.Tensor
    logits: torch.Tensor
    acts: dict[str, torch.Tensor]
    run: Optional[BaseRun] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.acts[name]


class Runner:
    """Runs a model with edits, on the engine (resuming from a base run) or the bridge's hooks.

    Edits are ``{hook: fn(act, ctx) -> act | None}`` as in :mod:`mechlib.engine`: ``act`` covers
    positions ``ctx.start_pos..`` (always 0 on the bridge) of the rows ``ctx.base_index``.
    """

    def __init__(self, model: Any, use_engine: bool = True) -> None:
        self.model = model
        self.engine = get_engine(model) if use_engine else None

    def check_hooks(self, names: Iterable[str]) -> None:
        names = list(names)
        if self.engine is not None:
            self.engine.check_hook_names(names)
            return
        valid = set(self.model.hook_dict) if hasattr(self.model, "hook_dict") else None
        if valid is not None:
            bad = [n for n in names if n not in valid]
            if bad:
                raise KeyError(f"hook name(s) {bad} do not exist on this model; e.g. 'blocks.0.attn.hook_z'")

    def cache(self, tokens: torch.Tensor, hooks: Iterable[str]) -> Cached:
        hooks = set(hooks)
        if self.engine is not None:
            keep = hooks | {f"blocks.{l}.hook_resid_pre" for l in range(self.model.cfg.n_layers)}
            keep.add(f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post")
            run = self.engine.run(tokens, keep=keep)
            return Cached(run.tokens, run.logits, run.acts, run)
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
        return Cached(tokens, logits, {k: cache[k] for k in hooks if k in cache.keys()})

    def resume(
        self,
        base: Cached,
        start_layer: int,
        start_pos: int,
        edits: dict[str, Callable],
        base_index: torch.Tensor,
        last_only: bool,
        stop_layer: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Patched logits ``[rows, pos, vocab]``, or ``[rows, 1, vocab]`` with ``last_only``.

        With ``stop_layer`` the engine runs blocks below it only and returns ``None`` (for edits
        that record activations); the bridge runs the whole model.
        """
        if self.engine is not None:
            out = self.engine.resume(base.run, start_layer, start_pos, edits=edits, base_index=base_index,
                                     last_only=last_only, stop_layer=stop_layer)
            if out is None:
                return None
            return out[:, None] if last_only else out
        hooks = []
        for name, fn in edits.items():
            layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1

            def hook(act, hook=None, fn=fn, name=name, layer=layer):
                out = fn(act, EditContext(name, layer, 0, base_index))
                return act if out is None else out

            hooks.append((name, hook))
        with torch.no_grad():
            logits = self.model.run_with_hooks(base.tokens[base_index], fwd_hooks=hooks)
        return logits[:, -1:] if last_only else logits


# ---- the sweep -------------------------------------------------------------------------------


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


def _groups(cells: list[_Cell], batch: int, min_rows: int, max_rows: int, reuse_pos: bool) -> list[list[_Cell]]:
    """Cells in calls: same start position; consecutive layers merge until ``min_rows`` rows."""
    by_start: dict[int, list[_Cell]] = {}
    for c in cells:
        by_start.setdefault((c.pos or 0) if reuse_pos else 0, []).append(c)
    groups: list[list[_Cell]] = []
    for sp in sorted(by_start):
        layer_cells: dict[int, list[_Cell]] = {}
        for c in by_start[sp]:
            layer_cells.setdefault(c.layer, []).append(c)
        current: list[_Cell] = []
        for l in sorted(layer_cells):
            for c in layer_cells[l]:
                if current and (len(current) + 1) * batch > max_rows:
                    groups.append(current)
                    current = []
                current.append(c)
            if len(current) * batch >= min_rows:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
    return groups


def _patch_edit(t: Target, cells: list[tuple[int, Optional[int], Optional[int]]], src: torch.Tensor, batch: int):
    """An edit writing ``src`` (the source run's activation) into each cell's rows."""

    def edit(act: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        sp = ctx.start_pos
        out = act.clone()
        for r0, head, pos in cells:
            rows = slice(r0, r0 + batch)
            if t.kind == "resid":
                out[rows, pos - sp] = src[:, pos]
            elif t.kind == "head":
                if pos is None:
                    out[rows, :, head] = src[:, sp:, head]
                else:
                    out[rows, pos - sp, head] = src[:, pos, head]
            else:  # pattern [batch, head, query, key]
                if pos is None:
                    out[rows, head] = src[:, head, sp:]
                else:
                    out[rows, head, pos - sp] = src[:, head, pos]
        return out

    return edit


def _metric_rows(metric: Metric, logits: torch.Tensor, n_cells: int, batch: int) -> torch.Tensor:
    vals = []
    for c in range(n_cells):
        out = metric.evaluate(logits[c * batch : (c + 1) * batch])
        vals.append(out.float().mean() if out.ndim else out.float())
    return torch.stack(vals)


def base_runs(
    runner: Runner, clean: torch.Tensor, corrupted: torch.Tensor, hooks: Iterable[str], direction: str
) -> tuple[Cached, Cached, Cached, Cached]:
    """``(clean, corrupted, base, source)`` cached runs for a direction."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    hooks = list(hooks)
    runner.check_hooks(hooks)
    c = runner.cache(clean, hooks)
    k = runner.cache(corrupted, hooks)
    base, source = (k, c) if direction == "denoise" else (c, k)
    return c, k, base, source


def _scale(metric: Metric, clean: Cached, corrupted: Cached, normalise: bool) -> tuple[float, float, float, float]:
    """Clean and corrupted metric values, and the affine map (offset, span) to report in."""
    vc = float(metric.scalar(clean.logits[:, -1:] if metric.last_only else clean.logits))
    vk = float(metric.scalar(corrupted.logits[:, -1:] if metric.last_only else corrupted.logits))
    if not normalise:
        return vc, vk, 0.0, 1.0
    span = vc - vk
    if abs(span) < 1e-8:
        raise ValueError(
            f"cannot normalise: the clean ({vc:.4g}) and corrupted ({vk:.4g}) runs score the same on "
            f"{metric.name!r}; pass normalise=False or prompts the metric tells apart"
        )
    return vc, vk, vk, span


def patch(
    model: Any,
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
    use_engine: bool = True,
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
        use_engine: Use the engine when the model supports it (``False``: the bridge's hooks).

    Returns:
        A :class:`PatchResult` with axes ``Target.dims()``.

    Raises:
        ValueError: Token shapes differ, layer/head/position out of range, a metric of the wrong
            output shape, an unknown direction.
        KeyError: An unknown target.
    """
    check_pair(clean, corrupted)
    t = _target(target, model)
    metric = as_metric(metric)
    B, T = clean.shape
    layers_ = check_layers(model, layers)
    heads_ = check_heads(model, heads, kv=t.kv) if t.has_head else []
    if positions is None:
        positions_ = list(range(T))
    else:
        positions_ = sorted({int(p) % T if -T <= int(p) < 0 else int(p) for p in positions})
        bad = [p for p in positions_ if not 0 <= p < T]
        if bad:
            raise ValueError(f"position(s) {bad} out of range for prompts of {T} tokens")
    if positions is not None and not t.by_pos:
        raise ValueError(f"target {t.name!r} patches all positions at once; use {t.name + '_by_pos'!r} for positions")
    runner = Runner(model, use_engine)
    hooks = {t.hook_name(l) for l in layers_}
    c, k, base, source = base_runs(runner, clean.to(_device(model)), corrupted.to(_device(model)), hooks, direction)
    vc, vk, offset, span = _scale(metric, c, k, normalise)
    # Check the metric's output shape once, up front, on the base run.
    metric.evaluate(base.logits[:, -1:] if metric.last_only else base.logits)

    if max_rows is None:
        max_rows = 4096 if metric.last_only else max(B, int(_MAX_LOGIT_FLOATS // (T * model.cfg.d_vocab)))
    max_rows = max(max_rows, B)
    cells = _cells(t, layers_, heads_, positions_)
    groups = _groups(cells, B, min_rows, max_rows, reuse_pos=runner.engine is not None)

    n_heads = (_n_kv(model) if t.kv else model.cfg.n_heads) if t.has_head else None
    shape = [model.cfg.n_layers] + ([n_heads] if t.has_head else []) + ([T] if t.by_pos else [])
    values = torch.full(shape, float("nan"))
    for group in tqdm(groups, desc=f"patch {t.name} ({direction})", disable=not progress):
        start_layer = min(cell.layer for cell in group)
        start_pos = min((cell.pos or 0) for cell in group) if runner.engine is not None else 0
        per_hook: dict[str, list] = {}
        for i, cell in enumerate(group):
            per_hook.setdefault(t.hook_name(cell.layer), []).append((i * B, cell.head, cell.pos))
        edits = {name: _patch_edit(t, cs, source[name], B) for name, cs in per_hook.items()}
        base_index = torch.arange(B).repeat(len(group))
        logits = runner.resume(base, start_layer, start_pos, edits, base_index, metric.last_only)
        got = _metric_rows(metric, logits, len(group), B)
        for cell, v in zip(group, got.tolist()):
            values[cell.index] = (v - offset) / span

    dims = t.dims()
    labels: dict[str, list[str]] = {"pos": _pos_labels(model, clean, pos_labels)} if t.by_pos else {}
    what = {"denoise": "clean -> corrupted", "noise": "corrupted -> clean"}[direction]
    return PatchResult(
        values,
        dims,
        labels,
        title=f"patching {t.name} ({what})",
        metric=("normalised " if normalise else "") + metric.name,
        meta={"clean": vc, "corrupted": vk, "direction": direction, "target": t.name, "normalised": normalise,
              "n_prompts": B, "calls": len(groups)},
    )


def patch_many(
    model: Any,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Union[Metric, Callable],
    targets: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    **kwargs: Any,
) -> dict[str, PatchResult]:
    """:func:`patch` for several targets, as ``{target: PatchResult}``."""
    return {t: patch(model, clean, corrupted, metric, t, **kwargs) for t in targets}


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except Exception:
        return torch.device("cpu")


# ---- helpers for reading circuits out of patching results ------------------------------------


def head_attention(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Sequence[Union[str, tuple[int, int]]],
    query: Union[int, torch.Tensor],
    keys: dict[str, Union[int, torch.Tensor]],
) -> Grid:
    """Attention paid by each head from a query position to named key positions, per prompt mean.

    Args:
        model: A bridge.
        tokens: ``[batch, pos]``.
        heads: ``["L23H0", (24, 4), ...]``.
        query: The query position (an int, or one per prompt), e.g. ``ds.pos("END")``.
        keys: ``{name: position(s)}``, e.g. ``{"IO": ds.pos("IO"), "S1": ds.pos("S1")}``.

    Returns:
        A :class:`~mechlib.results.Grid` ``("head", "key")`` of mean attention probabilities
        (``meta["per_prompt"]``: ``[head, key, batch]``).

    Example:
        >>> head_attention(model, ds.tokens, ["L23H0"], ds.pos("END"),
        ...                {"IO": ds.pos("IO"), "S2": ds.pos("S2")})             # doctest: +SKIP
    """
    from mechlib.results import parse_head

    hs = [parse_head(h) for h in heads]
    for l, h in hs:
        if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
            raise ValueError(f"head L{l}H{h} out of range ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)")
    B = tokens.shape[0]
    idx = torch.arange(B)

    def as_pos(p):
        return torch.full((B,), int(p)) if isinstance(p, int) else torch.as_tensor(p).long()

    q = as_pos(query)
    names = {f"blocks.{l}.attn.hook_pattern" for l, _ in hs}
    engine = get_engine(model)
    if engine is not None:
        acts = engine.run(tokens, keep=names).acts
    else:
        with torch.no_grad():
            _, acts = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    per = torch.zeros(len(hs), len(keys), B)
    for i, (l, h) in enumerate(hs):
        pat = acts[f"blocks.{l}.attn.hook_pattern"][idx, h, q].float().cpu()  # [B, key]
        for j, kp in enumerate(keys.values()):
            per[i, j] = pat[idx, as_pos(kp)]
    return Grid(per.mean(-1), ("head", "key"), {"head": [head_label(l, h) for l, h in hs], "key": list(keys)},
                title="attention from the query position", metric="attention probability",
                meta={"per_prompt": per})


@dataclass
class CircuitScore:
    """How much of the model's behaviour a set of heads keeps when every other head is ablated.

    Attributes:
        heads: The circuit's heads.
        model_value: The metric on the intact model.
        circuit_value: The metric with every head outside the circuit mean-ablated.
        faithfulness: ``circuit_value / model_value`` (1 = the circuit alone does it all).
        per_prompt: The circuit's metric per prompt.
    """

    heads: list[str]
    model_value: float
    circuit_value: float
    per_prompt: torch.Tensor

    @property
    def faithfulness(self) -> float:
        return self.circuit_value / self.model_value

    def __repr__(self) -> str:
        return (f"CircuitScore({len(self.heads)} heads: metric {self.circuit_value:.3f} of {self.model_value:.3f}, "
                f"faithfulness {self.faithfulness:.2f})")


def evaluate_circuit(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    heads: Sequence[Union[str, tuple[int, int]]],
    metric: Union[Metric, Callable],
    *,
    reference: Int[torch.Tensor, "batch pos"],
    groups: Optional[Sequence[Any]] = None,
) -> CircuitScore:
    """Mean-ablate every head outside ``heads`` and score what is left (IOI paper, section 4).

    The means come from ``reference`` (the ABC distribution for IOI: ``ds.corrupted_tokens``),
    per position and per group (``groups``: e.g. ``ds.template_ids.tolist()``, so each prompt
    gets its own template's mean), through :mod:`mechlib.ablation`. MLPs and the embeddings stay.

    Returns:
        A :class:`CircuitScore`; ``faithfulness`` = circuit metric / full-model metric.
    """
    from mechlib.ablation import ablation_hooks, head_means, normalize_heads

    metric = as_metric(metric)
    keep = set(normalize_heads(model, list(heads)))
    outside = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in keep]
    means = head_means(model, reference, groups=groups)
    with torch.no_grad():
        full = metric.evaluate(model(tokens))
        hooks = ablation_hooks(model, outside, "mean", means=means) if outside else []
        ablated = metric.evaluate(model.run_with_hooks(tokens, fwd_hooks=hooks))
    per = ablated.float() if ablated.ndim else ablated.float().reshape(1)
    return CircuitScore([head_label(l, h) for l, h in sorted(keep)], float(full.float().mean()),
                        float(ablated.float().mean()), per.detach().cpu())
