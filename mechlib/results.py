"""Labelled results: tensors that know their axes (layer, head, position, token) and plot.

Every technique in mechlib returns a :class:`Grid` (or a thin subclass): head scores
``(layer, head)``, patching sweeps ``(layer, pos)`` or ``(layer, head, pos)``, causal traces
``(layer, token)``, logit-lens curves ``(layer,)``. One class means one way to ask for the top
entries, index by label, and draw a heatmap.

Example:
    >>> import torch
    >>> g = Grid(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), dims=("layer", "head"), title="scores")
    >>> [(c, round(v, 3)) for c, v in g.top(1)]
    [({'layer': 0, 'head': 1}, 0.9)]
    >>> g.label(layer=0, head=1)
    'L0H1'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from mechlib.stats import Estimate, mean_ci
from mechlib.validate import parse_head, whole  # parse_head is re-exported: it lives in mechlib.validate

__all__ = ["Grid", "PromptGrid", "head_label", "parse_head"]


def head_label(layer: int, head: int) -> str:
    """``"L5H1"``: the label mechlib uses for attention head ``head`` of layer ``layer``."""
    return f"L{layer}H{head}"


@dataclass
class Grid:
    """A tensor with named axes and a label for every index.

    Attributes:
        values: The numbers, shape matching ``dims``.
        dims: Axis names, e.g. ``("layer", "head")``.
        labels: For each axis, one string per index (defaults: the index as a string; for
            ``pos``/``token`` axes pass the string tokens so plots read as text).
        title: What the numbers are, for plots.
        metric: The unit or metric name, e.g. ``"normalised logit diff"``.
        meta: Anything else worth carrying (the prompts, the metric's clean/corrupted values).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    title: str = ""
    metric: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).detach().cpu()
        self.dims = tuple(self.dims)
        if self.values.ndim != len(self.dims):
            raise ValueError(f"values have {self.values.ndim} axes but dims name {len(self.dims)}: {self.dims}")
        labels = dict(self.labels)
        for axis, name in enumerate(self.dims):
            n = self.values.shape[axis]
            given = labels.get(name)
            if given is None:
                labels[name] = [str(i) for i in range(n)]
            elif len(given) != n:
                raise ValueError(f"axis {name!r} has {n} entries but {len(given)} labels")
            else:
                labels[name] = [str(x) for x in given]
        self.labels = labels

    # ---- access ----------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.values[index]

    def axis(self, name: str) -> int:
        if name not in self.dims:
            raise KeyError(f"no axis {name!r}; axes are {self.dims}")
        return self.dims.index(name)

    def label(self, **coords: int) -> str:
        """A readable label for one entry, e.g. ``L5H1`` or ``L5 @ ' Mary'(14)``."""
        if set(coords) >= {"layer", "head"} and len(coords) == 2:
            return head_label(coords["layer"], coords["head"])
        parts = []
        for name in self.dims:
            if name in coords:
                i = coords[name]
                lab = self.labels[name][i]
                if name == "layer":
                    parts.append(f"L{i}")
                elif name == "head":
                    parts.append(f"H{i}")
                else:
                    parts.append(f"{lab!r}({i})" if lab != str(i) else f"{name}{i}")
        return " ".join(parts)

    def top(self, k: int = 10, *, largest: bool = True, absolute: bool = False) -> list[tuple[dict[str, int], float]]:
        """The ``k`` largest (or smallest) entries as ``({axis: index}, value)`` pairs.

        NaN cells (e.g. those a sweep over a subset did not compute) are never returned.
        """
        flat = self.values.flatten().float()
        key = flat.abs() if absolute else flat
        nan = torch.isnan(flat)
        key = key.masked_fill(nan, float("-inf") if largest else float("inf"))
        k = min(k, int((~nan).sum()))
        idx = torch.topk(key, k, largest=largest).indices
        out = []
        for i in idx.tolist():
            coords = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({d: int(c) for d, c in zip(self.dims, coords)}, float(flat[i])))
        return out

    def top_labels(self, k: int = 10, **kw: Any) -> list[str]:
        """Like :meth:`top`, as readable labels (``L5H1`` for heads)."""
        return [self.label(**c) for c, _ in self.top(k, **kw)]

    def sum(self, dim: str) -> "Grid":
        """Sum out one axis."""
        a = self.axis(dim)
        dims = tuple(d for d in self.dims if d != dim)
        return Grid(self.values.sum(a), dims, {d: self.labels[d] for d in dims}, self.title, self.metric, self.meta)

    def max(self, dim: str) -> "Grid":
        """Max over one axis."""
        a = self.axis(dim)
        dims = tuple(d for d in self.dims if d != dim)
        return Grid(self.values.amax(a), dims, {d: self.labels[d] for d in dims}, self.title, self.metric, self.meta)

    def select(self, **coords: int) -> "Grid":
        """Fix some axes at an index, e.g. ``grid.select(pos=-1)``."""
        values = self.values
        dims = list(self.dims)
        for name, i in coords.items():
            a = dims.index(name)
            values = values.select(a, i)
            dims.pop(a)
        return Grid(values, tuple(dims), {d: self.labels[d] for d in dims}, self.title, self.metric, self.meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dims": list(self.dims),
            "labels": self.labels,
            "values": self.values.tolist(),
            "title": self.title,
            "metric": self.metric,
        }

    def __repr__(self) -> str:
        shape = " x ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        best = ", ".join(f"{self.label(**c)}={v:.3g}" for c, v in self.top(3))
        return f"{type(self).__name__}({self.title or 'values'}: {shape}; top {best})"

    # ---- plots -----------------------------------------------------------------------

    def plot(self, ax: Optional[Any] = None, *, cmap: str = "RdBu", center: Optional[float] = 0.0, **kw: Any):
        """Heatmap (2 axes), bar chart (1 axis) or one heatmap per leading index (3 axes).

        Returns:
            The matplotlib figure.
        """
        import matplotlib.pyplot as plt

        v = self.values.float().numpy()
        if v.ndim == 3:
            n = v.shape[0]
            fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), squeeze=False)
            for i in range(n):
                self.select(**{self.dims[0]: i}).plot(ax=axes[0, i], cmap=cmap, center=center, **kw)
                axes[0, i].set_title(f"{self.dims[0]} {self.labels[self.dims[0]][i]}")
            fig.suptitle(self.title)
            fig.tight_layout()
            return fig
        if ax is None:
            w = 1.0 + 0.35 * (v.shape[1] if v.ndim == 2 else v.shape[0])
            h = 1.5 + 0.22 * v.shape[0] if v.ndim == 2 else 3.0
            fig, ax = plt.subplots(figsize=(min(max(w, 4), 14), min(max(h, 3), 10)))
        fig = ax.figure
        if v.ndim == 1:
            ax.bar(range(len(v)), v, **kw)
            names = self.labels[self.dims[0]]
            ax.set_xticks(range(len(v)), names, rotation=90 if len(v) > 12 else 0, fontsize=7)
            ax.set_xlabel(self.dims[0])
            ax.set_ylabel(self.metric)
        elif v.ndim == 2:
            if center is not None:
                span = float(abs(v - center).max()) or 1.0
                kw.setdefault("vmin", center - span)
                kw.setdefault("vmax", center + span)
            im = ax.imshow(v, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
            rows, cols = self.dims
            ax.set_ylabel(rows)
            ax.set_xlabel(cols)
            if cols in ("pos", "token", "position") or len(self.labels[cols]) <= 30:
                ax.set_xticks(range(v.shape[1]), self.labels[cols], rotation=90, fontsize=7)
            if len(self.labels[rows]) <= 40 and rows not in ("layer",):
                ax.set_yticks(range(v.shape[0]), self.labels[rows], fontsize=7)
            fig.colorbar(im, ax=ax, label=self.metric)
        else:
            raise ValueError(f"cannot plot {v.ndim} axes; select() some first")
        ax.set_title(self.title)
        return fig


@dataclass(repr=False, eq=False)
class PromptGrid(Grid):
    """A :class:`Grid` of means over prompts that keeps each prompt's values, for error bars.

    ``per_prompt`` is ``[prompt, *values.shape]``; ``values`` is its mean over prompts (NaN-aware:
    a prompt where a cell is undefined, e.g. a sequence with no induction target, is left out of
    that cell). :meth:`stderr` and :meth:`ci` give grids of standard errors and bootstrap
    intervals over prompts, :meth:`estimate` one cell's :class:`~mechlib.stats.Estimate` (what a
    findings claim is checked against), :meth:`plot_top` the top cells with their intervals.
    Head scores (:func:`mechlib.induction.head_scores`), direct logit attribution per head and
    component, head attention (:func:`mechlib.attention.head_attention`) and patching grids
    (:class:`~mechlib.patching.PatchResult`) all are ``PromptGrid`` objects.

    Example:
        >>> per = torch.tensor([[[0.2, 0.8]], [[0.4, 0.6]], [[0.3, 0.7]]])  # 3 prompts, 1 x 2 grid
        >>> g = PromptGrid(per.mean(0), ("layer", "head"), per_prompt=per)
        >>> round(g.estimate(layer=0, head=1).value, 3), g.estimate(layer=0, head=1).n
        (0.7, 3)
        >>> low, high = g.ci(0.95)
        >>> bool(low.values[0, 1] <= 0.7 <= high.values[0, 1])
        True
    """

    per_prompt: Optional[torch.Tensor] = None

    #: Label of the bootstrap's generator and default resamples: with these, one cell of
    #: :meth:`ci` is exactly :func:`mechlib.stats.mean_ci` of that cell's per-prompt values.
    _ci_label: ClassVar[str] = "mean_ci"
    _ci_resamples: ClassVar[int] = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_prompt is not None:
            self.per_prompt = torch.as_tensor(self.per_prompt).detach().cpu()
            if tuple(self.per_prompt.shape[1:]) != tuple(self.values.shape):
                raise ValueError(
                    f"per_prompt must be [prompt, *{tuple(self.values.shape)}], got {tuple(self.per_prompt.shape)}"
                )

    @classmethod
    def from_prompts(cls, per_prompt: torch.Tensor, dims: tuple[str, ...], **kw: Any) -> "PromptGrid":
        """A grid whose values are the (NaN-aware) mean over prompts of ``per_prompt``."""
        per = torch.as_tensor(per_prompt).detach().cpu().float()
        return cls(per.nanmean(0), dims, per_prompt=per, **kw)

    @property
    def n_prompts(self) -> int:
        return int(self._need_prompts().shape[0])

    def _need_prompts(self) -> torch.Tensor:
        if self.per_prompt is None:
            raise ValueError(
                "this result has no per-prompt values: its metric returned one number per batch; "
                "use a metric that returns [batch] values (every mechlib.metrics builder does)"
            )
        return self.per_prompt

    def _defined_prompts(self) -> torch.Tensor:
        """Per-prompt values without the prompts where no cell is defined (all NaN)."""
        per = self._need_prompts()
        keep = ~torch.isnan(per.reshape(per.shape[0], -1).float()).all(1)
        return per if bool(keep.all()) or not bool(keep.any()) else per[keep]

    def _like(self, values: torch.Tensor, what: str) -> Grid:
        return Grid(values, self.dims, self.labels, f"{self.title} ({what})", self.metric, dict(self.meta))

    def _cell(self, coords: dict[str, Any]) -> tuple[int, ...]:
        idx = []
        for d in self.dims:
            if d not in coords:
                raise KeyError(f"give every axis of {self.dims}, got {sorted(coords)}")
            c = coords[d]
            if isinstance(c, str):
                if c not in self.labels[d]:
                    raise KeyError(f"{d}={c!r} is not one of the labels of axis {d!r}")
                c = self.labels[d].index(c)
            c = whole(c, d)
            if not 0 <= c < self.values.shape[self.dims.index(d)]:
                raise IndexError(f"{d}={c} is out of range 0..{self.values.shape[self.dims.index(d)] - 1}")
            idx.append(c)
        unknown = set(coords) - set(self.dims)
        if unknown:
            raise KeyError(f"no axis {sorted(unknown)}; axes are {self.dims}")
        return tuple(idx)

    def at(self, **coords: Any) -> torch.Tensor:
        """Per-prompt values of one cell, e.g. ``at(layer=5, head=1)`` (a string is a label)."""
        return self._need_prompts()[(slice(None), *self._cell(coords))]

    def estimate(self, confidence: float = 0.95, **coords: Any) -> Estimate:
        """One cell's mean over prompts with its bootstrap interval (:func:`mechlib.stats.mean_ci`);
        prompts where the cell is undefined (NaN) are left out, e.g. ``estimate(layer=5, head=1)``."""
        v = self.at(**coords)
        v = v[~torch.isnan(v.float())]
        return mean_ci(v, confidence=confidence, name=f"per-prompt values of {self.label(**self._named(coords))}")

    def _named(self, coords: dict[str, Any]) -> dict[str, int]:
        return dict(zip(self.dims, self._cell(coords)))

    def stderr(self) -> Grid:
        """Standard error of each cell's mean over prompts (TransformerLens's ``standard_error``)."""
        from transformer_lens.utilities.statistics import standard_error

        per = self._defined_prompts()
        if per.shape[0] < 2:
            return self._like(torch.full_like(self.values, float("nan")), "standard error")
        return self._like(standard_error(per.double(), dim=0).float(), "standard error")

    def ci(self, confidence: float = 0.95, *, n_resamples: Optional[int] = None, seed: int = 0) -> tuple[Grid, Grid]:
        """Percentile-bootstrap interval of each cell's mean over prompts, as ``(low, high)`` grids.

        TransformerLens's ``bootstrap_ci`` (as :func:`mechlib.stats.mean_ci`), vectorised over cells
        (every cell resampled with the same prompt indices); one prompt gives a zero-width
        interval; NaN cells stay NaN (use :meth:`estimate` for a cell some prompts leave undefined).
        """
        from transformer_lens.utilities.statistics import bootstrap_ci, derive_generator

        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        per = self._defined_prompts()
        if per.shape[0] == 1:
            return self._like(per[0], "low"), self._like(per[0], "high")
        lo, hi = bootstrap_ci(
            per.double(),
            dim=0,
            confidence=confidence,
            n_resamples=self._ci_resamples if n_resamples is None else n_resamples,
            generator=derive_generator(seed, self._ci_label),
        )
        pct = f"{round(confidence * 100)}% CI"
        return self._like(lo.float(), f"{pct} low"), self._like(hi.float(), f"{pct} high")

    def plot_top(self, k: int = 10, *, confidence: float = 0.95, absolute: bool = True, ax: Optional[Any] = None):
        """Bar chart of the ``k`` top cells with their confidence intervals over prompts."""
        import matplotlib.pyplot as plt

        top = self.top(k, absolute=absolute)
        lo, hi = self.ci(confidence)
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(top) + 1.5), 3.2))
        vals = [v for _, v in top]
        idx = [tuple(c.values()) for c, _ in top]
        err = [
            [v - float(lo.values[i]) for v, i in zip(vals, idx)],
            [float(hi.values[i]) - v for v, i in zip(vals, idx)],
        ]
        ax.bar(range(len(top)), vals, yerr=err, capsize=3)
        ax.set_xticks(range(len(top)), [self.label(**c) for c, _ in top], rotation=60, fontsize=7)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.title}: top {len(top)} ({round(confidence * 100)}% CI over {self.n_prompts} prompts)")
        return ax.figure

    def __repr__(self) -> str:
        return Grid.__repr__(self)
