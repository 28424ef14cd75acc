"""One intervention language: *where* (a :class:`Site`) and *what* (an operation), as data.

Every causal technique in mechlib (activation patching, path patching, attribution patching,
ablation, circuit evaluation, causal tracing) is a builder of intervention lists; a backend
(:mod:`mechlib.backends`: the resuming CPU ``engine``, any ``TransformerBridge`` through its hooks,
any Hugging Face model through ``nnsight``) executes them. One list is one forward pass of the
whole prompt batch; a sweep hands the backend many lists, which it batches as rows of few calls.

A **site** names an activation (a hook point of :data:`POINTS`, TransformerLens's names and layouts),
its layer, optionally one head (a *KV* head for ``k``/``v``), positions, and prompts (rows of the
batch). An **operation** says what happens there:

=================  ===========================================================================
operation          effect on the site's slice
=================  ===========================================================================
``Patch(run)``     set to the same slice of a cached run (``"clean"``, ``"corrupted"``, ...)
``Freeze(run)``    the same, meant as "hold at the base run's value" (path patching)
``Replace(value)`` set to a given tensor (a mean over a reference batch, a recorded activation)
``Add(value)``     add a given tensor (causal tracing's seeded noise on the subject's embeddings)
``Zero()``         set to zero
``Noise(std)``     add Gaussian noise (seeded, identical on every backend)
``Record(key)``    read the slice (after the list's earlier operations at that hook)
=================  ===========================================================================

Operations at the same hook apply in list order, so "freeze every head, then patch the senders"
is two interventions. Sites are checked when built (whole numbers, a head only where the point
has heads, ...; :mod:`mechlib.validate`); the backend checks them against the model (layer and
head ranges, points it can reach) before running anything.

Layouts (TransformerLens's): ``resid``-like points ``[batch, pos, d]``; ``z``/``q``/``k``/``v``
``[batch, pos, head, d_head]``; ``pattern`` ``[batch, head, query_pos, key_pos]`` (its positions
are query positions). A :class:`Replace` (or :class:`Add`) value has the point's full layout with the batch and
position axes of size ``batch`` or 1 and ``n_pos`` or 1 (broadcast).

Example (TransformerLens's ``get_act_patch_attn_head_out_by_pos`` cell L3H1 @ 5, ROME's
``trace_with_patch`` restoring a residual, an ablation):
    >>> patch_cell = [Intervention(Site("z", 3, head=1, positions=(5,)), Patch("clean"))]
    >>> restore = [Intervention(Site("embed", positions=(1, 2, 3)), Noise(0.1, seed=0)),
    ...            Intervention(Site("resid_pre", 7, positions=(3,)), Patch("clean"))]
    >>> ablate = [Intervention(Site("z", 2, head=h), Zero()) for h in (0, 4)]
    >>> patch_cell[0].site.hook
    'blocks.3.attn.hook_z'
    >>> Site("resid_pre", 3, head=1)
    Traceback (most recent call last):
    ...
    ValueError: head: point 'resid_pre' has no head axis; leave head=None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from mechlib import validate

__all__ = [
    "POINTS",
    "Point",
    "Site",
    "Patch",
    "Freeze",
    "Replace",
    "Add",
    "Zero",
    "Noise",
    "Record",
    "Operation",
    "Intervention",
    "intervention_list",
    "point_of_hook",
]


@dataclass(frozen=True)
class Point:
    """A hook point: TransformerLens's hook suffix and the layout of its activation.

    ``layout`` is ``"resid"`` (``[batch, pos, d]``), ``"head"`` (``[batch, pos, head, d_head]``)
    or ``"pattern"`` (``[batch, head, query, key]``); ``kv`` marks per-KV-head activations.
    """

    name: str
    hook: str
    layout: str
    kv: bool = False
    order: int = 0  # forward order within a block

    @property
    def has_head(self) -> bool:
        return self.layout != "resid"


POINTS: dict[str, Point] = {
    p.name: p
    for p in [
        Point("embed", "hook_embed", "resid", order=-1),
        Point("resid_pre", "hook_resid_pre", "resid", order=0),
        Point("q", "attn.hook_q", "head", order=1),
        Point("k", "attn.hook_k", "head", kv=True, order=2),
        Point("v", "attn.hook_v", "head", kv=True, order=3),
        Point("pattern", "attn.hook_pattern", "pattern", order=4),
        Point("z", "attn.hook_z", "head", order=5),
        Point("attn_out", "hook_attn_out", "resid", order=6),
        Point("resid_mid", "hook_resid_mid", "resid", order=7),
        Point("mlp_pre", "mlp.hook_pre", "resid", order=8),
        Point("mlp_post", "mlp.hook_post", "resid", order=9),
        Point("mlp_out", "hook_mlp_out", "resid", order=10),
        Point("resid_post", "hook_resid_post", "resid", order=11),
    ]
}
_BY_HOOK = {p.hook: p for p in POINTS.values()}


def point_of_hook(hook: str) -> tuple[Point, Optional[int]]:
    """``"blocks.3.attn.hook_z"`` -> ``(POINTS["z"], 3)``; ``"hook_embed"`` -> ``(POINTS["embed"], None)``."""
    if hook == "hook_embed":
        return POINTS["embed"], None
    parts = hook.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BY_HOOK:
        return _BY_HOOK[parts[2]], int(parts[1])
    raise KeyError(
        f"{hook!r} is not a hook point of the intervention language; points are "
        f"{sorted(POINTS)} (hooks like 'blocks.3.attn.hook_z', 'hook_embed')"
    )


def _int_tuple(values: Any, name: str, allow_negative: bool) -> Optional[tuple[int, ...]]:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a tuple of ints (or None for all), got {values!r} ({type(values).__name__})")
    out = []
    for v in values.reshape(-1).tolist() if isinstance(values, torch.Tensor) else values:
        v = validate.whole(v, name)
        if v < 0 and not allow_negative:
            raise ValueError(f"{name} must be non-negative, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"{name} is empty: pass None for all, or at least one index")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Site:
    """Where an intervention acts.

    Attributes:
        point: A name of :data:`POINTS` (``"resid_pre"``, ``"z"``, ``"k"``, ``"pattern"``, ...).
        layer: The block (``None`` only for ``"embed"``).
        head: One head of a head point (a KV head for ``"k"``/``"v"``), or ``None`` for all.
        positions: Positions (negative ones count from the end; query positions for
            ``"pattern"``), or ``None`` for all.
        rows: Prompts of the batch the intervention applies to, or ``None`` for all.
    """

    point: str
    layer: Optional[int] = None
    head: Optional[int] = None
    positions: Optional[tuple[int, ...]] = None
    rows: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.point, str) or self.point not in POINTS:
            raise ValueError(f"point: unknown hook point {self.point!r}; choose one of {sorted(POINTS)}")
        if self.point == "embed":
            if self.layer is not None:
                raise ValueError("layer: the 'embed' point has no layer; leave layer=None")
        else:
            if self.layer is None:
                raise ValueError(f"layer: point {self.point!r} needs a layer, e.g. Site({self.point!r}, 3)")
            object.__setattr__(self, "layer", validate.whole(self.layer, "layer", minimum=0))
        if self.head is not None:
            if not POINTS[self.point].has_head:
                raise ValueError(f"head: point {self.point!r} has no head axis; leave head=None")
            object.__setattr__(self, "head", validate.whole(self.head, "head", minimum=0))
        object.__setattr__(self, "positions", _int_tuple(self.positions, "positions", allow_negative=True))
        object.__setattr__(self, "rows", _int_tuple(self.rows, "rows", allow_negative=False))

    @property
    def spec(self) -> Point:
        return POINTS[self.point]

    @property
    def hook(self) -> str:
        """The TransformerLens hook name, e.g. ``"blocks.3.attn.hook_z"``."""
        return "hook_embed" if self.point == "embed" else f"blocks.{self.layer}.{self.spec.hook}"

    @property
    def block(self) -> int:
        """The block a backend must recompute from (``0`` for ``"embed"``)."""
        return 0 if self.layer is None else self.layer

    def first_position(self, n_pos: int) -> int:
        """The earliest position the site touches, for prompts of ``n_pos`` tokens."""
        if self.positions is None:
            return 0
        return min(p + n_pos if p < 0 else p for p in self.positions)

    def __str__(self) -> str:
        s = self.point if self.layer is None else f"L{self.layer}.{self.point}"
        if self.head is not None:
            s += f"[{'KV' if self.spec.kv else 'H'}{self.head}]"
        if self.positions is not None:
            s += f"@{list(self.positions)}"
        if self.rows is not None:
            s += f" rows {list(self.rows)}"
        return s


# ---- operations ------------------------------------------------------------------------------


def _run_name(run: Any) -> str:
    if not isinstance(run, str) or not run:
        raise TypeError(f"run must name a cached run, e.g. 'clean' or 'corrupted'; got {run!r}")
    return run


@dataclass(frozen=True)
class Patch:
    """Set the site to its value in the cached run ``run`` (same prompt, same positions)."""

    run: str

    def __post_init__(self) -> None:
        _run_name(self.run)


@dataclass(frozen=True)
class Freeze:
    """Hold the site at its value in the cached run ``run`` (the base run, in path patching)."""

    run: str

    def __post_init__(self) -> None:
        _run_name(self.run)


@dataclass(frozen=True, eq=False)
class Replace:
    """Set the site to ``value``: the point's full layout, batch and position axes of size n or 1.

    E.g. a per-position mean of ``hook_z`` over a reference batch, ``[1, pos, head, d_head]``.
    """

    value: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.value, torch.Tensor):
            raise TypeError(f"value must be a tensor in the point's layout, got {type(self.value).__name__}")
        if not self.value.is_floating_point():
            raise TypeError(f"value must be a float tensor, got dtype {self.value.dtype}")
        object.__setattr__(self, "value", self.value.detach())


@dataclass(frozen=True, eq=False)
class Add:
    """Add ``value`` to the site: the point's full layout, batch and position axes of size n or 1
    (as :class:`Replace`), e.g. ``[samples, pos, d_model]`` noise that is zero off the subject."""

    value: torch.Tensor

    def __post_init__(self) -> None:
        Replace.__post_init__(self)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Zero:
    """Set the site to zero."""


@dataclass(frozen=True)
class Noise:
    """Add Gaussian noise of standard deviation ``std`` (a fixed draw per ``seed``, the same on
    every backend: it is drawn on the CPU for the whole ``[batch, pos, ...]`` activation of the
    base prompts, and the site's slice is added)."""

    std: float
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.std, bool) or not isinstance(self.std, (int, float)) or not self.std >= 0:
            raise ValueError(f"std must be a non-negative number, got {self.std!r}")
        object.__setattr__(self, "seed", validate.whole(self.seed, "seed"))

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(tuple(shape), generator=g) * float(self.std)


@dataclass(frozen=True)
class Record:
    """Read the site's slice (after the list's earlier operations at the same hook) into ``key``."""

    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise TypeError(f"key must be a non-empty string, got {self.key!r}")


Operation = Union[Patch, Freeze, Replace, Add, Zero, Noise, Record]
_OPS = (Patch, Freeze, Replace, Add, Zero, Noise, Record)


@dataclass(frozen=True)
class Intervention:
    """One operation at one site. Lists of them are one forward pass (see the module docstring)."""

    site: Site
    op: Operation

    def __post_init__(self) -> None:
        if not isinstance(self.site, Site):
            raise TypeError(f"site must be a Site, got {type(self.site).__name__}")
        if not isinstance(self.op, _OPS):
            raise TypeError(f"op must be one of {[o.__name__ for o in _OPS]}, got {type(self.op).__name__}")
        if isinstance(self.op, (Replace, Add)):
            want = 3 if self.site.spec.layout == "resid" else 4
            if self.op.value.ndim != want:
                raise ValueError(
                    f"{type(self.op).__name__} value for point {self.site.point!r} must have {want} axes "
                    f"(the point's layout), got shape {tuple(self.op.value.shape)}"
                )

    @property
    def edits(self) -> bool:
        """Whether it changes the run (everything but :class:`Record`)."""
        return not isinstance(self.op, Record)

    def __str__(self) -> str:
        return f"{type(self.op).__name__}({self.site})"


def intervention_list(items: Any, name: str = "interventions") -> list[Intervention]:
    """A list of :class:`Intervention` (a bare one is refused, as a str would be)."""
    if isinstance(items, Intervention) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be a list of Intervention, got {type(items).__name__}; wrap one in [ ]")
    out = list(items)
    bad = [x for x in out if not isinstance(x, Intervention)]
    if bad:
        raise TypeError(f"{name} must hold Intervention objects only, got {type(bad[0]).__name__}")
    return out


# ---- execution helpers shared by the backends ------------------------------------------------


def canonical(act: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with batch and position first: patterns ``[b, head, q, k]`` -> ``[b, q, head, k]``."""
    return act.transpose(1, 2) if layout == "pattern" else act


@dataclass
class Placed:
    """An intervention placed on rows of one backend call (rows = lists x prompts)."""

    intervention: Intervention
    rows: torch.Tensor  # [n] rows of the call
    prompts: torch.Tensor  # [n] which base prompt each row is
    lists: torch.Tensor  # [n] which list (of the call) each row belongs to


@dataclass
class Plan:
    """Intervention lists laid out on the rows of one call: list ``i`` owns rows ``i*B .. (i+1)*B``.

    ``by_hook[hook]`` holds, per rank (the k-th intervention at that hook within a list), the
    placed interventions; identical interventions of different lists are merged into one, so a
    backend applies each with one indexed write over all its rows.
    """

    lists: Sequence[Sequence[Intervention]]
    batch: int
    by_hook: dict[str, list[list[Placed]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        B = self.batch
        merged: dict[str, list[dict[Any, list[int]]]] = {}
        for i, lst in enumerate(self.lists):
            rank: dict[str, int] = {}
            for iv in lst:
                h = iv.site.hook
                r = rank.get(h, 0)
                rank[h] = r + 1
                slots = merged.setdefault(h, [])
                while len(slots) <= r:
                    slots.append({})
                slots[r].setdefault(iv, []).append(i)
        all_prompts = list(range(B))
        for h, slots in merged.items():
            out = []
            for slot in slots:
                placed = []
                for iv, idx in slot.items():
                    prompts = all_prompts if iv.site.rows is None else list(iv.site.rows)
                    if max(prompts) >= B:
                        raise ValueError(f"{iv}: rows {list(iv.site.rows)} out of range for a batch of {B} prompts")
                    rows = torch.tensor([i * B + q for i in idx for q in prompts], dtype=torch.long)
                    placed.append(
                        Placed(
                            iv,
                            rows,
                            torch.tensor(prompts * len(idx), dtype=torch.long),
                            torch.tensor([i for i in idx for _ in prompts], dtype=torch.long),
                        )
                    )
                out.append(placed)
            self.by_hook[h] = out

    @property
    def hooks(self) -> list[str]:
        return list(self.by_hook)

    def apply(
        self,
        hook: str,
        act: torch.Tensor,
        start_pos: int,
        n_pos: int,
        sources: "Sources",
        records: Optional[dict[tuple[int, str], torch.Tensor]] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The activation at ``hook`` with this plan's interventions applied (a new tensor).

        Args:
            act: The activation in its layout, every row of the call; its position axis covers
                ``start_pos..n_pos-1``.
            sources: Cached runs for :class:`Patch`/:class:`Freeze` (and the noise draws).
            records: Filled with ``{(list, key): [B, ...] slice}`` by :class:`Record`.
            rows: When ``act`` holds only some rows of the call (a backend that starts rows at
                different layers): which rows, in ``act``'s order. Interventions on rows absent
                from ``act`` are skipped (those rows are not computed at this hook).
        """
        layout = point_of_hook(hook)[0].layout
        out = act.clone()
        view = canonical(out, layout)
        where = None
        if rows is not None:
            rows = rows.cpu()
            n_rows = len(self.lists) * self.batch
            where = torch.full((n_rows,), -1, dtype=torch.long)
            where[rows] = torch.arange(rows.shape[0])
        for placed in self.by_hook.get(hook, []):
            for p in placed:
                if where is not None:
                    at = where[p.rows]
                    keep = at >= 0
                    if not bool(keep.any()):
                        continue
                    p = Placed(p.intervention, at[keep], p.prompts[keep], p.lists[keep])
                _apply_one(view, p, hook, layout, start_pos, n_pos, self.batch, sources, records)
        return out


class Sources:
    """Cached activations of named runs: ``sources.get(run, hook)`` -> ``[batch, ...]`` tensor."""

    def __init__(self, acts: dict[str, dict[str, torch.Tensor]]) -> None:
        self.acts = acts
        self._noise: dict[tuple[Noise, tuple[int, ...]], torch.Tensor] = {}

    def get(self, run: str, hook: str) -> torch.Tensor:
        if run not in self.acts:
            raise KeyError(f"no cached run named {run!r}; cached runs are {sorted(self.acts)}")
        acts = self.acts[run]
        if hook not in acts:
            raise KeyError(f"run {run!r} did not cache {hook!r}; pass it in the hooks to cache")
        return acts[hook]

    def noise(self, op: Noise, shape: tuple[int, ...]) -> torch.Tensor:
        key = (op, shape)
        if key not in self._noise:
            self._noise[key] = op.draw(shape)
        return self._noise[key]


def _apply_one(view, p: Placed, hook, layout, start_pos, n_pos, batch, sources, records) -> None:
    iv = p.intervention
    site, op = iv.site, iv.op
    if site.positions is None:
        pos_abs = torch.arange(start_pos, n_pos)
    else:
        pos_abs = torch.tensor([q + n_pos if q < 0 else q for q in site.positions], dtype=torch.long)
        if int(pos_abs.min()) < 0 or int(pos_abs.max()) >= n_pos:
            raise ValueError(f"{iv}: positions {list(site.positions)} out of range for prompts of {n_pos} tokens")
        if int(pos_abs.min()) < start_pos:  # a backend bug, never a user error
            raise RuntimeError(f"{iv}: the call starts at position {start_pos}, after the site")
    if view.shape[1] != n_pos - start_pos:
        raise RuntimeError(f"{hook}: activation covers {view.shape[1]} positions, expected {n_pos - start_pos}")
    dev = view.device
    r_idx, p_idx = p.rows.to(dev)[:, None], (pos_abs - start_pos).to(dev)[None, :]
    index = (r_idx, p_idx) if site.head is None else (r_idx, p_idx, site.head)
    if isinstance(op, Record):
        if records is not None:
            got = view[index].clone()
            for li in torch.unique(p.lists).tolist():
                records[(li, op.key)] = got[(p.lists == li).to(dev)]
        return
    if isinstance(op, Zero):
        view[index] = 0.0
        return
    target_shape = view[index].shape
    if isinstance(op, (Patch, Freeze)):
        val = _take(canonical(sources.get(op.run, hook), layout), p.prompts, pos_abs, site.head)
    elif isinstance(op, Replace):
        val = _take(canonical(op.value, layout), p.prompts, pos_abs, site.head, broadcast=True)
    elif isinstance(op, Add):
        delta = _take(canonical(op.value, layout), p.prompts, pos_abs, site.head, broadcast=True)
        val = view[index] + delta.to(dev, view.dtype)
    else:  # Noise: one draw over the base prompts' whole activation, sliced like a source run
        delta = sources.noise(op, (batch, n_pos) + tuple(view.shape[2:]))
        val = view[index] + _take(delta, p.prompts, pos_abs, site.head).to(dev, view.dtype)
    view[index] = torch.broadcast_to(val.to(dev, view.dtype), target_shape)


def _take(
    src: torch.Tensor, prompts: torch.Tensor, pos_abs: torch.Tensor, head: Optional[int], broadcast: bool = False
) -> torch.Tensor:
    """``src[prompts, pos_abs(, head)]`` as ``[n, m, ...]``; size-1 batch/pos axes broadcast."""
    dev = src.device
    b = prompts if not (broadcast and src.shape[0] == 1) else torch.zeros_like(prompts)
    q = pos_abs if not (broadcast and src.shape[1] == 1) else torch.zeros_like(pos_abs)
    if broadcast and src.shape[0] != 1 and int(prompts.max()) >= src.shape[0]:
        raise ValueError(f"Replace value has {src.shape[0]} rows for a batch of more prompts; give 1 or one per prompt")
    if broadcast and src.shape[1] != 1 and int(pos_abs.max()) >= src.shape[1]:
        raise ValueError(f"Replace value covers {src.shape[1]} positions; the prompts have more")
    if head is not None:
        src = src[:, :, 0] if (broadcast and src.shape[2] == 1) else src[:, :, head]
    return src.index_select(0, b.to(dev)).index_select(1, q.to(dev))
