"""Causal-tracing results: one fact's trace, averages over facts by token role, peaks, plots.

:class:`FactTrace` holds one fact's restored probabilities per (layer, token) for each kind of
state (``"resid"``, ``"mlp"``, ``"attn"``) and the severed trace; :func:`average_by_role` averages
many over ROME's token roles (:data:`mechlib.facts.TOKEN_ROLES`) into a :class:`RoleTrace` that
keeps every fact's values, so :meth:`RoleTrace.ci` gives intervals over facts. Produced by
:mod:`mechlib.causal_tracing`.

Example:
    >>> avg = average_by_role(trace_facts(model, facts))     # doctest: +SKIP
    >>> avg.peak("mlp"), avg.ci("mlp", "last subject token", 5)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float

from mechlib import facts as _facts
from mechlib.results import Grid
from mechlib.stats import Estimate, mean_ci
from mechlib.validate import whole

__all__ = ["KINDS", "SEVERED", "FactTrace", "Peak", "RoleTrace", "average_by_role"]

#: The kinds of state causal tracing restores, in ROME's order.
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
#: Variants of the severed trace: nothing frozen, MLPs frozen, attention frozen.
SEVERED: tuple[str, ...] = ("none", "mlp", "attn")

_TITLE = {
    "resid": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring Attn after corrupted input",
}
_CMAP = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_SEVER_COLOR = {"none": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
_SEVER_LABEL = {"none": "effect of single state", "mlp": "with MLPs severed", "attn": "with attention severed"}


@dataclass(frozen=True)
class Peak:
    """The largest entry of a trace: where (layer, token or role) and how much.

    Attributes:
        kind: ``"resid"``, ``"mlp"`` or ``"attn"``.
        layer: The restored layer (for windows: the window's centre).
        index: The token position (fact traces) or role index (role averages).
        label: The token string or role name.
        value: The indirect effect there.
        role: The token's role (fact traces; the role itself for role averages).
    """

    kind: str
    layer: int
    index: int
    label: str
    value: float
    role: str = ""

    def __repr__(self) -> str:
        where = (
            f"{self.label!r}({self.index}, {self.role})" if self.role and self.role != self.label else repr(self.label)
        )
        return f"Peak({self.kind}: L{self.layer} @ {where} = {self.value:.3g})"


def _heatmap(
    ax: Any, values: torch.Tensor, rows: list[str], kind: str, title: str, xlabel: str, cbar: str, vmin: Optional[float]
) -> None:
    """ROME-style heatmap: rows are tokens/roles, columns are layers."""
    import numpy as np

    v = np.ma.masked_invalid(values.float().numpy())  # untraced cells (nan) stay blank
    im = ax.pcolor(v, cmap=_CMAP[kind], vmin=vmin)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(rows))], rows, fontsize=7)
    n_layers = v.shape[1]
    step = max(1, n_layers // 6)
    ax.set_xticks([0.5 + i for i in range(0, n_layers, step)], [str(i) for i in range(0, n_layers, step)])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.figure.colorbar(im, ax=ax).set_label(cbar, fontsize=8)


def _xlabel(kind: str, window: int) -> str:
    return (
        "single restored layer"
        if kind == "resid"
        else f"centre of interval of {window} restored {'MLP' if kind == 'mlp' else 'attn'} layers"
    )


@dataclass
class FactTrace:
    """The causal trace of one fact: restored probabilities per (layer, token) for each kind.

    Attributes:
        tokens: The prompt's tokens ``[pos]``.
        str_tokens: The tokens as strings.
        subject_start: First subject position.
        subject_end: One past the last subject position.
        target: The attribute's token id.
        target_str: The attribute as a string.
        clean_prob: Probability of the attribute on the clean prompt.
        corrupted_prob: Mean probability over the corrupted runs.
        restored: ``{kind: Grid(layer, token)}`` mean probability of the attribute with that
            state restored (cells before the subject hold ``corrupted_prob``: exactly no effect).
        severed: ``{variant: Grid(layer,)}`` restored probability of the residual state at
            ``severed_token`` with nothing (``"none"``), the later MLPs (``"mlp"``) or the later
            attention outputs (``"attn"``) frozen at their corrupted values; empty if not run.
        severed_token: The position the severed trace restores (the last subject token).
        noise: The noise standard deviation used.
        noise_source: How the noise scale was set.
        samples: Number of noise samples.
        window: Window of the MLP / attention restorations.
        seed: Seed of the noise.
        corrupt: Where the noise was added: ``"embed"`` (ROME) or ``"block0"`` (after block 0).
        top_token: The model's top next token on the clean prompt.
        top_prob: Its clean probability.
        backend: The backend that ran the interventions (``"engine"``, ``"bridge"``, ``"nnsight"``).
        prompt, subject, attribute: The fact, when traced from text.
    """

    tokens: torch.Tensor
    str_tokens: list[str]
    subject_start: int
    subject_end: int
    target: int
    target_str: str
    clean_prob: float
    corrupted_prob: float
    restored: dict[str, Grid]
    severed: dict[str, Grid] = field(default_factory=dict)
    severed_token: Optional[int] = None
    noise: float = 0.0
    noise_source: str = ""
    samples: int = 0
    window: int = 0
    seed: int = 0
    corrupt: str = "embed"
    top_token: Optional[int] = None
    top_prob: float = math.nan
    backend: str = ""
    prompt: Optional[str] = None
    subject: Optional[str] = None
    attribute: Optional[str] = None

    @property
    def n_layers(self) -> int:
        return next(iter(self.restored.values())).shape[0]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.restored)

    @property
    def roles(self) -> list[str]:
        """ROME's token role of every position (:func:`mechlib.facts.token_roles`)."""
        return _facts.token_roles(len(self.str_tokens), self.subject_start, self.subject_end)

    @property
    def total_effect(self) -> float:
        """``clean_prob - corrupted_prob``."""
        return self.clean_prob - self.corrupted_prob

    def effect(self, kind: str = "resid") -> Grid:
        """Indirect effect ``restored - corrupted`` as a ``Grid(layer, token)``."""
        g = self._grid(kind)
        return Grid(
            g.values - self.corrupted_prob,
            g.dims,
            g.labels,
            f"indirect effect ({kind})",
            "restored - corrupted p",
            dict(g.meta),
        )

    def severed_effect(self) -> Grid:
        """Indirect effect at ``severed_token`` per layer and variant: ``Grid(layer, variant)``."""
        if not self.severed:
            raise ValueError("this trace has no severed variant; trace with severed=('mlp', 'attn')")
        names = list(self.severed)
        vals = torch.stack([self.severed[n].values for n in names], dim=1) - self.corrupted_prob
        return Grid(
            vals,
            ("layer", "variant"),
            {"variant": names},
            "indirect effect at the last subject token",
            "restored - corrupted p",
        )

    def peak(self, kind: str = "resid") -> Peak:
        """The (layer, token) of the largest indirect effect of ``kind``."""
        ((c, v),) = self.effect(kind).top(1)
        t = c["token"]
        return Peak(kind, c["layer"], t, self.str_tokens[t], v, self.roles[t])

    def _grid(self, kind: str) -> Grid:
        if kind not in self.restored:
            raise KeyError(f"kind {kind!r} was not traced; this trace has {self.kinds}")
        return self.restored[kind]

    def plot(self, kinds: Optional[Sequence[str]] = None, *, model_name: str = ""):
        """ROME's heatmaps (Fig. 1): restored probability, tokens down, layers across.

        Subject tokens are marked with ``*``; the colour scale starts at the corrupted
        probability. Returns the matplotlib figure.
        """
        import matplotlib.pyplot as plt

        kinds = tuple(kinds or self.kinds)
        fig, axes = plt.subplots(
            1, len(kinds), figsize=(4.2 * len(kinds), 0.25 * len(self.str_tokens) + 1.6), squeeze=False
        )
        rows = [f"{t}*" if self.subject_start <= i < self.subject_end else t for i, t in enumerate(self.str_tokens)]
        for ax, kind in zip(axes[0], kinds):
            xl = _xlabel(kind, self.window) + (f" within {model_name}" if model_name else "")
            _heatmap(
                ax,
                self._grid(kind).values.T,
                rows,
                kind,
                _TITLE[kind],
                xl,
                f"p({self.target_str.strip()})",
                self.corrupted_prob,
            )
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        subj = self.subject or "".join(self.str_tokens[self.subject_start : self.subject_end])
        return (
            f"FactTrace({subj!r} -> {self.target_str!r}: clean p={self.clean_prob:.3f}, corrupted p={self.corrupted_prob:.3f}; "
            + ", ".join(repr(self.peak(k)) for k in self.kinds)
            + ")"
        )


@dataclass
class RoleTrace:
    """Causal traces averaged over facts by token role, as in ROME's Fig. 2.

    Attributes:
        effects: ``{kind: Grid(layer, role)}`` mean indirect effect over the facts (a role a
            fact lacks, e.g. middle subject tokens of a two-token subject, is left out of that
            role's mean).
        n_facts: Facts averaged.
        role_counts: How many facts contributed to each role.
        clean_prob: Mean clean probability.
        corrupted_prob: Mean corrupted probability.
        total_effect: Mean of ``clean - corrupted``.
        severed: ``Grid(layer, variant)`` mean indirect effect at the last subject token with
            nothing / MLPs / attention severed, or ``None``.
        window: The window of the MLP / attention restorations.
        per_fact: ``{kind: [fact, layer, role]}`` every fact's indirect effect by role (``nan``
            where a fact lacks the role), the values the means above average; intervals over
            facts come from these (:meth:`values`, :meth:`ci`).
        severed_per_fact: ``[fact, layer, variant]`` every severed fact's effect, or ``None``.
        total_effects: ``[fact]`` every fact's ``clean - corrupted``.
        corrupt: Where the noise was added (``"embed"`` or ``"block0"``).
    """

    effects: dict[str, Grid]
    n_facts: int
    role_counts: dict[str, int]
    clean_prob: float
    corrupted_prob: float
    total_effect: float
    severed: Optional[Grid] = None
    window: int = 0
    per_fact: dict[str, torch.Tensor] = field(default_factory=dict)
    severed_per_fact: Optional[torch.Tensor] = None
    total_effects: Optional[torch.Tensor] = None
    corrupt: str = "embed"

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.effects)

    def effect(self, kind: str = "resid") -> Grid:
        if kind not in self.effects:
            raise KeyError(f"kind {kind!r} was not traced; this average has {self.kinds}")
        return self.effects[kind]

    def values(self, kind: str, role: str) -> Float[torch.Tensor, "fact layer"]:
        """Every fact's indirect effect of ``kind`` at ``role``, per layer: ``[fact, layer]``, only
        the facts that have the role (a one-token subject has no middle subject tokens)."""
        self.effect(kind)
        if kind not in self.per_fact:
            raise ValueError("this RoleTrace holds no per-fact values; build it with average_by_role(traces)")
        roles = list(_facts.TOKEN_ROLES)
        if role not in roles:
            raise ValueError(f"role must be one of {tuple(roles)}, got {role!r}")
        v = self.per_fact[kind][:, :, roles.index(role)]
        return v[~torch.isnan(v).any(dim=1)]

    def severed_values(self, variant: str) -> Float[torch.Tensor, "fact layer"]:
        """Every severed fact's indirect effect at its last subject token, per layer, with
        ``variant`` (``"none"``, ``"mlp"``, ``"attn"``) severed: ``[fact, layer]``."""
        if self.severed is None or self.severed_per_fact is None:
            raise ValueError("no severed traces were averaged; trace with severed=('mlp', 'attn')")
        names = self.severed.labels["variant"]
        if variant not in names:
            raise ValueError(f"variant must be one of {tuple(names)}, got {variant!r}")
        return self.severed_per_fact[:, :, names.index(variant)]

    def ci(self, kind: str, role: str, layers: Union[int, Sequence[int], range, slice], **kwargs: Any) -> Estimate:
        """Mean indirect effect over facts with its bootstrap interval (:func:`mechlib.stats.mean_ci`).

        Args:
            kind: ``"resid"``, ``"mlp"`` or ``"attn"``; or ``"severed:none"``, ``"severed:mlp"``,
                ``"severed:attn"`` for the severed trace (``role`` must then be
                ``"last subject token"``).
            role: One of :data:`mechlib.facts.TOKEN_ROLES`.
            layers: One layer, or several (a list, range or slice): each fact's effect is first
                averaged over them.
            **kwargs: Passed to :func:`~mechlib.stats.mean_ci` (``confidence``, ``seed``).

        Example:
            >>> avg.ci("mlp", "last subject token", 5)         # doctest: +SKIP
            Estimate(value=0.41, low=0.33, high=0.49, n=10, ...)
        """
        per = self._per_fact(kind, role)
        return mean_ci(_layer_mean(per, layers, per.shape[1]), name=f"{kind} effect at {role}", **kwargs)

    def stderr(self, kind: str, role: str, layers: Union[int, Sequence[int], range, slice]) -> float:
        """Standard error over facts of the mean indirect effect (see :meth:`ci`)."""
        per = self._per_fact(kind, role)
        v = _layer_mean(per, layers, per.shape[1])
        return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else math.nan

    def total_effect_ci(self, **kwargs: Any) -> Estimate:
        """The total effect (clean - corrupted) over facts, with its interval."""
        if self.total_effects is None:
            raise ValueError("this RoleTrace holds no per-fact values; build it with average_by_role(traces)")
        return mean_ci(self.total_effects, name="total effects", **kwargs)

    def _per_fact(self, kind: str, role: str) -> torch.Tensor:
        if kind.startswith("severed:"):
            if role != "last subject token":
                raise ValueError(f"the severed trace restores the last subject token only, got role {role!r}")
            return self.severed_values(kind.split(":", 1)[1])
        return self.values(kind, role)

    def peak(self, kind: str = "resid") -> Peak:
        """The (layer, role) of the largest average indirect effect of ``kind``."""
        g = self.effect(kind)
        vals = torch.nan_to_num(g.values, nan=-math.inf)
        i = int(vals.argmax())
        layer, r = divmod(i, vals.shape[1])
        role = g.labels["role"][r]
        return Peak(kind, layer, r, role, float(g.values[layer, r]), role)

    def at(self, kind: str, role: str) -> Grid:
        """The layer profile of one role: ``Grid(layer,)``."""
        g = self.effect(kind)
        return g.select(role=g.labels["role"].index(role))

    def plot(self, kinds: Optional[Sequence[str]] = None, *, model_name: str = ""):
        """ROME's averaged heatmaps: mean indirect effect, roles down, layers across."""
        import matplotlib.pyplot as plt

        kinds = tuple(kinds or self.kinds)
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.0), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            g = self.effect(kind)
            title = f"Average indirect effect ({kind}), {self.n_facts} facts"
            xl = _xlabel(kind, self.window) + (f" within {model_name}" if model_name else "")
            _heatmap(
                ax, torch.nan_to_num(g.values.T), g.labels["role"], kind, title, xl, "mean indirect effect on p", 0.0
            )
        fig.tight_layout()
        return fig

    def plot_severed(self, ax: Any = None):
        """ROME's Fig. 3: indirect effect at the last subject token, per layer, with the later
        MLPs or attention severed (frozen at their corrupted values)."""
        import matplotlib.pyplot as plt

        if self.severed is None:
            raise ValueError("no severed traces were averaged; trace with severed=('mlp', 'attn')")
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3))
        g = self.severed
        names = g.labels["variant"]
        n_layers = g.shape[0]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.bar(
                [l + (j - (len(names) - 1) / 2) * width for l in range(n_layers)],
                g.values[:, j].numpy(),
                width,
                color=_SEVER_COLOR.get(name),
                label=_SEVER_LABEL.get(name, name),
            )
        ax.set_xlabel("layer at which the single hidden state is restored")
        ax.set_ylabel("average indirect effect")
        ax.set_title(f"Last subject token, {self.n_facts} facts")
        ax.legend(fontsize=8)
        return ax.figure

    def __repr__(self) -> str:
        return (
            f"RoleTrace({self.n_facts} facts: clean p={self.clean_prob:.3f}, corrupted p={self.corrupted_prob:.3f}, "
            f"total effect={self.total_effect:.3f}; " + ", ".join(repr(self.peak(k)) for k in self.kinds) + ")"
        )


def _layer_mean(per: torch.Tensor, layers: Any, n_layers: int) -> torch.Tensor:
    """``per[:, layers]`` averaged over the layers: one value per fact."""
    if isinstance(layers, slice):
        idx = list(range(n_layers))[layers]
    elif isinstance(layers, range):
        idx = list(layers)
    elif isinstance(layers, (list, tuple)):
        idx = [whole(l, "layers") for l in layers]
    else:
        idx = [whole(layers, "layers")]
    if not idx:
        raise ValueError(f"layers selects no layer; give layers from 0 to {n_layers - 1}")
    bad = [l for l in idx if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers: {bad[0]} is out of range; this trace has layers 0..{n_layers - 1}")
    return per[:, idx].mean(dim=1)


def average_by_role(traces: Sequence[FactTrace]) -> RoleTrace:
    """Average indirect effects over facts by ROME's token roles (:data:`mechlib.facts.TOKEN_ROLES`).

    The result keeps every fact's values (:attr:`RoleTrace.per_fact`), so claims can be stated
    with intervals over facts (:meth:`RoleTrace.ci`).

    Example:
        >>> avg = average_by_role(traces)      # doctest: +SKIP
        >>> avg.peak("mlp")                    # doctest: +SKIP
        Peak(mlp: L5 @ 'last subject token' = 0.12)
        >>> avg.ci("mlp", "last subject token", 5)   # doctest: +SKIP
    """
    if isinstance(traces, FactTrace) or not isinstance(traces, Sequence):
        raise TypeError(f"traces must be a list of FactTrace, got {type(traces).__name__}")
    if not traces:
        raise ValueError("average_by_role needs at least one FactTrace")
    bad = [type(tr).__name__ for tr in traces if not isinstance(tr, FactTrace)]
    if bad:
        raise TypeError(f"traces must hold FactTrace objects only, got a {bad[0]}")
    kinds = traces[0].kinds
    n_layers = traces[0].n_layers
    for tr in traces:
        if tr.kinds != kinds or tr.n_layers != n_layers:
            raise ValueError("all traces must come from the same model and kinds")
        if (tr.window, tr.corrupt) != (traces[0].window, traces[0].corrupt):
            raise ValueError(
                f"all traces must share window and corruption (their averages would mix different restorations): "
                f"got window {tr.window} / corrupt {tr.corrupt!r} beside window {traces[0].window} / {traces[0].corrupt!r}"
            )
    roles = list(_facts.TOKEN_ROLES)
    effects, per_fact = {}, {}
    for kind in kinds:
        per = torch.stack(
            [_facts.average_by_role(tr.effect(kind).values, tr.subject_start, tr.subject_end) for tr in traces]
        )
        per_fact[kind] = per
        effects[kind] = Grid(
            torch.nanmean(per, dim=0),
            ("layer", "role"),
            {"role": roles},
            f"average indirect effect ({kind})",
            "restored - corrupted p",
            {"n_facts": len(traces)},
        )
    counts = {}
    for r in roles:
        counts[r] = sum(
            1 for tr in traces if _facts.role_positions(len(tr.str_tokens), tr.subject_start, tr.subject_end)[r]
        )
    sev, sev_per = None, None
    with_sev = [tr for tr in traces if tr.severed]
    if with_sev:
        names = list(with_sev[0].severed)
        sev_per = torch.stack([tr.severed_effect().values for tr in with_sev])
        sev = Grid(
            sev_per.mean(0),
            ("layer", "variant"),
            {"variant": names},
            "average indirect effect at the last subject token",
            "restored - corrupted p",
            {"n_facts": len(with_sev)},
        )
    clean = sum(tr.clean_prob for tr in traces) / len(traces)
    corr = sum(tr.corrupted_prob for tr in traces) / len(traces)
    totals = torch.tensor([tr.total_effect for tr in traces], dtype=torch.float64)
    return RoleTrace(
        effects,
        len(traces),
        counts,
        clean,
        corr,
        clean - corr,
        sev,
        traces[0].window,
        per_fact=per_fact,
        severed_per_fact=sev_per,
        total_effects=totals,
        corrupt=traces[0].corrupt,
    )
