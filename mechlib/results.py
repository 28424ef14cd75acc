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

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["Grid", "head_label", "parse_head"]


def head_label(layer: int, head: int) -> str:
    """``"L5H1"``: the label mechlib uses for attention head ``head`` of layer ``layer``."""
    return f"L{layer}H{head}"


def parse_head(label: str | tuple[int, int]) -> tuple[int, int]:
    """``"L5H1"``, ``"5.1"``, ``(5, 1)`` or ``[5, 1]`` -> ``(5, 1)``; anything else is an error.

    Strict: ``"L0H1x"``, ``"L1.5H2"``, ``(1.0, 2)``, ``(True, 1)`` and negative indices are refused
    (``ValueError`` for a malformed label or a negative index, ``TypeError`` for another type), never
    read as the nearest head.
    """
    from mechlib.validate import whole

    if isinstance(label, (tuple, list)):
        if len(label) != 2:
            raise ValueError(f"a head is (layer, head), got {label!r} with {len(label)} entries")
        try:
            layer, head = whole(label[0], "the head's layer"), whole(label[1], "the head's index")
        except TypeError as exc:
            raise TypeError(f"cannot read a head from {label!r}: {exc}") from None
        if layer < 0 or head < 0:
            raise ValueError(f"a head's layer and index are non-negative, got {label!r}")
        return layer, head
    if not isinstance(label, str):
        raise TypeError(f"a head is 'L5H1', '5.1' or (5, 1), got {label!r} ({type(label).__name__})")
    m = _HEAD_RE.fullmatch(label.strip())
    if m is None:
        raise ValueError(f"cannot read a head from {label!r}; write it as 'L5H1', '5.1' or (5, 1)")
    a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    return int(a), int(b)


_HEAD_RE = re.compile(r"[Ll]([0-9]+)[Hh]([0-9]+)|([0-9]+)\.([0-9]+)")


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
