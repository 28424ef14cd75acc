"""Causal tracing of factual recall (Meng et al. 2022, ROME), batched on the engine.

ROME locates where a model recalls a fact such as *(Eiffel Tower, is in the city of, Paris)*:

1. **Clean run.** The prompt as is; ``p_clean`` = probability of the attribute (``" Paris"``).
2. **Corrupted runs.** Gaussian noise added to the token embeddings of the subject's tokens
   (several seeded samples; scale 3 x the spread of subject-token embeddings);
   ``p_corrupted`` = mean probability of the attribute. Total effect = clean - corrupted.
3. **Restored runs.** A corrupted run in which one clean state is put back; the indirect effect
   of that state = restored - corrupted probability. Three kinds of state:

   * ``"resid"``: the residual stream after layer ``L`` at token ``t``
     (``blocks.L.hook_resid_post``), a single state;
   * ``"mlp"``: the MLP outputs at token ``t`` of a window of layers centred on ``L``
     (default 10 layers, clipped at the ends: ``L - 5 .. L + 4``);
   * ``"attn"``: the attention outputs over the same window.

The **severed** variant (ROME Fig. 3) restores the residual stream at ``(L, t)`` while holding the
MLP (or attention) outputs at ``t`` in every later layer at their corrupted values: if the
indirect effect at the last subject token collapses in early layers, the MLPs there are what
carries the restored state's effect. Only layers above ``L`` are frozen; the restored state holds
the clean outputs of the layers at and below it, MLP 0's included.

**MLP 0.** In many models MLP 0 reads little but the current token and acts as an extension of
the embedding, so restoring it undoes much of what noise on the embeddings destroyed. Two tools
separate that from recall: ``window=1`` restores one MLP at a time, and ``corrupt="block0"``
counts block 0 as part of the embedding (block 0 runs clean, the noise is added to the residual
after it; windows then restore from layer 1 on).

A fact the model does not predict (attribute probability below :data:`UNPREDICTED_RATIO` x the
top token's) is refused, with what the model predicts instead; ``allow_unpredicted=True``
overrides. :func:`average_by_role` keeps every fact's values, so :meth:`RoleTrace.ci` gives an
interval over facts for any (kind, role, layers) cell.

Everything for one fact runs in a handful of batched engine calls (:mod:`mechlib.engine`):
per restored token, one call holds every (layer, noise sample) row, each row starting at the
first layer it changes (:meth:`~mechlib.engine.Engine.resume_rows`) and only on the positions
from the restored token on; restoring before the first subject token is skipped (clean and
corrupted states are identical there, so the effect is exactly 0). A window's first block changes
only the restored token (its keys and values still come from the corrupted run), so it is applied
in closed form and the row starts one block higher; and the top block runs its queries, MLP and
the rest for the last token alone, since only the last token's logits are read. Models the engine cannot
mirror fall back to ROME's plain loop, one bridge forward per cell (``method="bridge"``).

Example:
    >>> import mechlib
    >>> from mechlib.causal_tracing import trace_fact, trace_facts, average_by_role
    >>> model = mechlib.load_model("smollm2-135m")                           # doctest: +SKIP
    >>> tr = trace_fact(model, "The Eiffel Tower is located in the city of",
    ...                 subject="Eiffel Tower", attribute=" Paris")          # doctest: +SKIP
    >>> tr.peak("mlp")                                                        # doctest: +SKIP
    Peak(mlp: L4 @ ' Tower'(3, last subject token) = 0.41)
    >>> fig = tr.plot()                        # three ROME heatmaps          # doctest: +SKIP
    >>> avg = average_by_role(trace_facts(model, facts))                      # doctest: +SKIP
    >>> avg.peak("resid"), avg.total_effect                                  # doctest: +SKIP
    >>> one = average_by_role(trace_facts(model, facts, kinds=("mlp",), window=1,
    ...                                   positions=["last subject token"]))  # doctest: +SKIP
    >>> one.ci("mlp", "last subject token", 0)     # MLP 0 alone, interval over facts  # doctest: +SKIP
    >>> trace_facts(model, facts, corrupt="block0", severed=("mlp",))        # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from mechlib import facts as _facts
from mechlib.engine import BaseRun, Engine, get_engine
from mechlib.results import Grid
from mechlib.stats import Estimate, mean_ci
from mechlib.validate import position_list, whole

__all__ = [
    "CORRUPTIONS",
    "KINDS",
    "SEVERED",
    "UNPREDICTED_RATIO",
    "FactTrace",
    "NoiseScale",
    "Peak",
    "RoleTrace",
    "average_by_role",
    "corruption_noise",
    "default_noise_scale",
    "trace_fact",
    "trace_facts",
    "trace_tokens",
    "window_layers",
]

NoiseScale = _facts.NoiseScale

#: The kinds of state causal tracing restores, in ROME's order.
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
#: Variants of the severed trace: nothing frozen, MLPs frozen, attention frozen.
SEVERED: tuple[str, ...] = ("none", "mlp", "attn")
#: Where the subject is corrupted: its token embeddings (``"embed"``, ROME) or the residual
#: stream after block 0 (``"block0"``: MLP 0 counted as part of the embedding).
CORRUPTIONS: tuple[str, ...] = ("embed", "block0")
#: A fact is refused when the attribute's clean probability is below this fraction of the
#: model's top next token's (the model does not predict it); ``allow_unpredicted=True`` overrides.
UNPREDICTED_RATIO = 0.1

_HOOK = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_TITLE = {
    "resid": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring Attn after corrupted input",
}
_CMAP = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_SEVER_COLOR = {"none": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
_SEVER_LABEL = {"none": "effect of single state", "mlp": "with MLPs severed", "attn": "with attention severed"}


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers a windowed (MLP / attention) restoration centred on ``layer`` covers.

    As ROME: ``layer - window // 2`` up to (excluding) ``layer + ceil(window / 2)``, clipped to
    the model.

    Example:
        >>> window_layers(12, 10, 30)
        range(7, 17)
        >>> window_layers(1, 10, 30)
        range(0, 6)
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _check_params(model: Any, samples: Any, window: Any, kinds: Sequence[str], severed: Sequence[str]) -> None:
    n_layers = model.cfg.n_layers
    whole(samples, "samples", minimum=1)
    whole(window, "window")
    if not 1 <= window <= n_layers:
        raise ValueError(
            f"window must be an integer from 1 to the model's {n_layers} layers (ROME uses 10 on a "
            f"48-layer model), got {window!r}"
        )
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {tuple(kinds)}")
    bad = [v for v in severed if v not in ("mlp", "attn")]
    if bad:
        raise ValueError(f"severed may contain 'mlp' and/or 'attn', got {tuple(severed)}")
    if model.cfg.attn_only and ("mlp" in kinds or "mlp" in severed):
        raise ValueError("this model is attention-only: it has no MLPs to restore or sever; drop 'mlp'")


def _check_noise(noise: Any) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(
            f"noise must be a number (the std of the Gaussian noise added to the subject), a NoiseScale, or None "
            f"for the default (3 x the std of subject-token embeddings), got {noise!r} ({type(noise).__name__})"
        )
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(
            f"the noise scale must be a positive number (the std of the Gaussian noise added to the "
            f"subject's embeddings; ROME uses 3 x the std of subject-token embeddings), got {noise!r}"
        )


def _str_selection(value: Any, name: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A selection of names such as ``kinds=("resid", "mlp")``; a bare string is refused
    (it would be read as a selection of letters)."""
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be a tuple of names from {tuple(allowed)}, got the single string {value!r}; "
            f"pass {name}=({value!r},)"
        )
    if not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a tuple of names from {tuple(allowed)}, got {value!r} ({type(value).__name__})"
        )
    return tuple(value)


def _subject_span(subject: Any, n_pos: int) -> tuple[int, int]:
    """``(start, end)`` token positions of the subject, checked: a pair of whole numbers with
    ``0 <= start < end <= n_pos``."""
    if isinstance(subject, (str, bytes)) or not isinstance(subject, (tuple, list, torch.Tensor)):
        raise TypeError(
            f"subject must be a (start, end) pair of token positions, end exclusive, got {subject!r} "
            f"({type(subject).__name__}); for a one-token subject at position p pass subject=(p, p + 1)"
        )
    items = subject.tolist() if isinstance(subject, torch.Tensor) else list(subject)
    if len(items) != 2:
        raise ValueError(
            f"subject must be a (start, end) pair of token positions, got {len(items)} values: {subject!r}"
        )
    s0, s1 = whole(items[0], "subject start"), whole(items[1], "subject end")
    if not 0 <= s0 < s1 <= n_pos:
        raise ValueError(
            f"subject span {tuple(items)} does not fit a prompt of {n_pos} tokens; need 0 <= start < end <= {n_pos}"
        )
    return s0, s1


_NOISE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_noise_scale(model: Any, corrupt: str = "embed") -> NoiseScale:
    """The reference spread that sets the default noise (noise std = 3 x ``.std``).

    For a model with a tokenizer: the std of the vectors that are corrupted, at every subject
    token of mechlib's facts dataset (:func:`mechlib.facts.noise_scale`), as ROME measured over
    its subjects: the token embeddings as ``hook_embed`` sees them (``corrupt="embed"``; Gemma's
    ``sqrt(d_model)`` scale included) or the residual stream after block 0 (``corrupt="block0"``).
    For a model without one (the tiny random models): the same over every vocabulary token (for
    ``"block0"``, each token alone at position 0). Cached per model.
    """
    _check_corrupt(corrupt)
    per_model = _NOISE_CACHE.setdefault(model, {})
    hit = per_model.get(corrupt)
    if hit is not None:
        return hit
    if getattr(model, "tokenizer", None) is not None:
        scale = _facts.noise_scale(model, _facts.load_facts(), at=corrupt)
    elif corrupt == "embed":
        n = model.cfg.d_vocab
        W = _facts.embedding_vectors(model, torch.arange(n))
        scale = NoiseScale(float(W.std()), n, n, f"the token embeddings (hook_embed) of all {n} vocabulary tokens")
    else:
        ids = torch.arange(model.cfg.d_vocab)
        x = _facts.block0_outputs(model, [[int(i)] for i in ids], [(0, 1)] * len(ids))
        scale = NoiseScale(
            float(x.std()),
            len(ids),
            len(ids),
            f"the block-0 outputs (blocks.0.hook_resid_post) of all {len(ids)} vocabulary tokens, each alone",
        )
    per_model[corrupt] = scale
    return scale


def _check_corrupt(corrupt: Any) -> None:
    if corrupt not in CORRUPTIONS:
        raise ValueError(
            f"corrupt must be one of {CORRUPTIONS}: 'embed' (ROME: noise on the subject's token embeddings) or "
            f"'block0' (MLP 0 as part of the embedding: noise on the residual after block 0), got {corrupt!r}"
        )


def _resolve_noise(
    model: Any, noise: Union[None, float, NoiseScale], corrupt: str = "embed", multiplier: float = 3.0
) -> tuple[float, str]:
    if noise is None:
        scale = default_noise_scale(model, corrupt)
        return scale.noise(multiplier), f"{multiplier:g} x {scale.std:.4g} (std of {scale.measured_on})"
    if isinstance(noise, NoiseScale):
        return noise.noise(multiplier), f"{multiplier:g} x {noise.std:.4g} (std of {noise.measured_on})"
    return noise, "given"


def corruption_noise(
    samples: int, n_subject_tokens: int, d_model: int, scale: float, seed: int = 0
) -> Float[torch.Tensor, "samples subject d_model"]:
    """The Gaussian noise added to the subject's token embeddings: ``scale * N(0, 1)``, seeded.

    The same noise is used for every restored cell of a fact (as in ROME), so every cell's
    effect is measured against the same corrupted runs.

    Example:
        >>> corruption_noise(10, 3, 576, 0.3, seed=0).shape
        torch.Size([10, 3, 576])
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples, n_subject_tokens, d_model, generator=g) * float(scale)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# The batched tracer (engine)
# ----------------------------------------------------------------------------------------


def _prob(logits: torch.Tensor, target: int) -> torch.Tensor:
    return logits.float().softmax(dim=-1)[..., target]


def _stack(run: BaseRun, hook: str, n_layers: int) -> torch.Tensor:
    """``[layer, batch, pos, d]`` of one per-layer hook."""
    return torch.stack([run[f"blocks.{l}.{hook}"] for l in range(n_layers)])


def _empty_grid(n_layers: int, n_pos: int, corrupted: float, traced: Sequence[int]) -> torch.Tensor:
    """``[layer, pos]``: ``nan`` at positions not traced, ``corrupted`` (no effect) elsewhere
    until a restoration fills the cell."""
    out = torch.full((n_layers, n_pos), math.nan)
    out[:, list(traced)] = corrupted
    return out


def _run_rows(
    eng: Engine,
    base: BaseRun,
    t: int,
    starts: torch.Tensor,
    resid: torch.Tensor,
    base_index: torch.Tensor,
    make_edits: Callable[[torch.Tensor], dict],
    max_rows: int,
) -> torch.Tensor:
    """Resume rows in chunks of at most ``max_rows``; ``make_edits(row_ids)`` builds each
    chunk's edits (``ctx.rows`` indexes the chunk)."""
    out = []
    for a in range(0, starts.shape[0], max_rows):
        ids = torch.arange(a, min(a + max_rows, starts.shape[0]))
        out.append(
            eng.resume_rows(base, starts[ids], t, resid=resid[ids], base_index=base_index[ids], edits=make_edits(ids))
        )
    return torch.cat(out)


def _trace_engine(
    eng: Engine,
    tokens: torch.Tensor,
    s0: int,
    s1: int,
    target: int,
    noise: torch.Tensor,
    kinds: Sequence[str],
    window: int,
    severed: Sequence[str],
    sever_pos: int,
    max_rows: int,
    corrupt: str = "embed",
    check: Optional[Callable[[torch.Tensor], None]] = None,
    positions: Optional[Sequence[int]] = None,
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    nL, S = eng.n_layers, noise.shape[0]
    P = tokens.shape[0]
    dev = eng.device
    T = tokens[None].to(dev)
    clean = eng.run(T)
    if check is not None:
        check(clean.logits[0, -1])
    if corrupt == "embed":
        embed = eng.embed(T).expand(S, -1, -1).clone()
        embed[:, s0:s1] += noise.to(device=dev, dtype=embed.dtype)
        corr = eng.run(embed=embed)
    else:  # block0: the clean residual after block 0, noised at the subject

        def add_noise(act, ctx):
            act = act.clone()
            act[:, s0:s1] += noise.to(device=act.device, dtype=act.dtype)
            return act

        corr = eng.run(T.expand(S, -1), edits={"blocks.0.hook_resid_post": add_noise})
    # With the noise added after block 0, block 0's attention and MLP outputs are clean in the
    # corrupted run: restoring them changes nothing, so windows start at layer 1.
    first = 0 if corrupt == "embed" else 1
    clean_p = float(_prob(clean.logits[0, -1], target))
    corr_each = _prob(corr.logits[:, -1], target).float().cpu()  # [S]
    corr_p = float(corr_each.mean())

    layer_of = torch.arange(nL).repeat_interleave(S)  # row = layer * S + sample
    base_index = torch.arange(S).repeat(nL)
    post_clean = _stack(clean, "hook_resid_post", nL)[:, 0]  # [L, P, d]
    post_corr = _stack(corr, "hook_resid_post", nL)  # [L, S, P, d]
    pre_corr = _stack(corr, "hook_resid_pre", nL)
    no_edits: Callable[[torch.Tensor], dict] = lambda ids: {}  # noqa: E731

    def resid_rows(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = post_corr[:, :, t:].reshape(nL * S, P - t, -1).clone()
        x[:, 0] = post_clean[layer_of, t]
        return layer_of + 1, x

    def window_rows(
        kind: str, t: int, lo: torch.Tensor, bi: torch.Tensor, clean_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Block lo, the window's first, changes only token t (its keys and values come from the
        # corrupted residual): apply it in closed form and start every row at lo + 1.
        x = post_corr[lo, bi, t:].clone()
        if kind == "mlp":
            x[:, 0] = mid_corr[lo, bi, t] + clean_out[lo, t]
        else:
            mid = pre_corr[lo, bi, t] + clean_out[lo, t]
            if eng.attn_only:
                x[:, 0] = mid
            else:
                for l in lo.unique().tolist():
                    rows = lo == l
                    x[rows, 0] = mid[rows] + eng.mlp(l, mid[rows])
        return lo + 1, x

    def top_layer(t: int) -> int:
        # An edit in the top block at a token before the last cannot reach the last token's logits.
        return nL if t == P - 1 else nL - 1

    restored: dict[str, torch.Tensor] = {}
    mid_corr = _stack(corr, "hook_resid_mid", nL) if "mlp" in kinds else None
    traced = list(range(P)) if positions is None else list(positions)
    for kind in kinds:
        out = _empty_grid(nL, P, corr_p, traced)
        if kind != "resid":
            hook = _HOOK[kind]
            clean_out = _stack(clean, hook, nL)[:, 0]  # [L, P, d]
            lo_all = (layer_of - window // 2).clamp(min=first)
            hi_all = (layer_of - (-window // 2)).clamp(max=nL)
            live = hi_all > lo_all  # rows whose window holds a layer that can change anything
            lo, hi, bi = lo_all[live], hi_all[live], base_index[live]
        for t in (t for t in traced if t >= s0):
            if kind == "resid":
                starts, x = resid_rows(t)
                logits = _run_rows(eng, corr, t, starts, x, base_index, no_edits, max_rows)
                out[:, t] = _prob(logits, target).view(nL, S).mean(dim=1).cpu()
                continue
            if not bool(live.any()):
                continue
            starts, x = window_rows(kind, t, lo, bi, clean_out)

            def edits(ids, t=t, hook=hook, clean_out=clean_out, hi=hi, lo=lo):
                hi_c = hi[ids]

                def restore(l):
                    def fn(act, ctx):  # rows computed at l start at lo + 1 <= l
                        rows = ctx.rows if ctx.rows is not None else torch.arange(act.shape[0])
                        act[(hi_c[rows] > l).to(act.device), 0] = clean_out[l, t]
                        return act

                    return fn

                layers = range(int(lo[ids].min()) + 1, min(int(hi_c.max()), top_layer(t)))
                return {f"blocks.{l}.{hook}": restore(l) for l in layers}

            logits = _run_rows(eng, corr, t, starts, x, bi, edits, max_rows)
            p = corr_each[base_index].clone()  # rows with nothing to restore keep their corrupted p
            p[live] = _prob(logits, target).float().cpu()
            out[:, t] = p.view(nL, S).mean(dim=1)
        restored[kind] = out

    sev: dict[str, torch.Tensor] = {}
    if severed:
        t = sever_pos
        if "resid" in restored and t in traced:
            sev["none"] = restored["resid"][:, t].clone()
        else:
            starts, x = resid_rows(t)
            sev["none"] = (
                _prob(_run_rows(eng, corr, t, starts, x, base_index, no_edits, max_rows), target)
                .view(nL, S)
                .mean(1)
                .cpu()
            )
        for variant in severed:
            frozen = _stack(corr, _HOOK[variant], nL)[:, :, t]  # [L, S, d] corrupted outputs at t

            def freeze(l, frozen=frozen):
                def fn(act, ctx):  # every row computed at layer l restored a layer below l
                    act[:, 0] = frozen[l, ctx.base_index.to(frozen.device)]
                    return act

                return fn

            # Rows restoring the state after layer L start at L + 1: only the outputs of layers
            # above L are frozen (the restored state already holds the clean ones at and below L,
            # MLP 0's included).
            edits = lambda ids, v=variant: {f"blocks.{l}.{_HOOK[v]}": freeze(l) for l in range(top_layer(t))}  # noqa: E731
            starts, x = resid_rows(t)
            logits = _run_rows(eng, corr, t, starts, x, base_index, edits, max_rows)
            sev[variant] = _prob(logits, target).view(nL, S).mean(1).cpu()
    return clean_p, corr_p, restored, sev


# ----------------------------------------------------------------------------------------
# ROME's plain loop (bridge hooks, one forward per cell)
# ----------------------------------------------------------------------------------------


def _trace_bridge(
    model: Any,
    tokens: torch.Tensor,
    s0: int,
    s1: int,
    target: int,
    noise: torch.Tensor,
    kinds: Sequence[str],
    window: int,
    severed: Sequence[str],
    sever_pos: int,
    skip_before_subject: bool = False,
    corrupt: str = "embed",
    check: Optional[Callable[[torch.Tensor], None]] = None,
    positions: Optional[Sequence[int]] = None,
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ROME's loop: per cell, one bridge forward of ``[clean, corrupted x samples]``, the
    restored state copied from the clean row (row 0) into the corrupted rows."""
    nL, S = model.cfg.n_layers, noise.shape[0]
    P = tokens.shape[0]
    batch = tokens[None].repeat(S + 1, 1).to(model.cfg.device)
    site = "hook_embed" if corrupt == "embed" else "blocks.0.hook_resid_post"
    if check is not None:
        with torch.no_grad():
            check(model(batch[:1])[0, -1])

    def add_noise(act, hook):
        act = act.clone()
        act[1:, s0:s1] += noise.to(act)
        return act

    def restore(t):
        def fn(act, hook):
            act = act.clone()
            act[1:, t] = act[0, t]
            return act

        return fn

    def run(hooks) -> tuple[float, float]:
        with torch.no_grad():
            logits = model.run_with_hooks(batch, fwd_hooks=[(site, add_noise)] + hooks)
        p = _prob(logits[:, -1], target)
        return float(p[0]), float(p[1:].mean())

    clean_p, corr_p = run([])
    restored: dict[str, torch.Tensor] = {}
    for kind in kinds:
        traced = list(range(P)) if positions is None else list(positions)
        out = _empty_grid(nL, P, corr_p, traced)
        for t in (t for t in traced if t >= (s0 if skip_before_subject else 0)):
            for L in range(nL):
                layers = [L] if kind == "resid" else list(window_layers(L, window, nL))
                out[L, t] = run([(f"blocks.{l}.{_HOOK[kind]}", restore(t)) for l in layers])[1]
        restored[kind] = out
    sev: dict[str, torch.Tensor] = {}
    if severed:
        t = sever_pos
        sev["none"] = torch.tensor([run([(f"blocks.{L}.hook_resid_post", restore(t))])[1] for L in range(nL)])
        for variant in severed:
            names = [f"blocks.{l}.{_HOOK[variant]}" for l in range(nL)]
            cache = _cache_with_hooks(model, batch, names, [(site, add_noise)])  # ROME's first pass

            def freeze(name, cache=cache):
                def fn(act, hook):
                    act = act.clone()
                    act[1:, t] = cache[name][1:, t]
                    return act

                return fn

            vals = []
            for L in range(nL):
                hooks = [(f"blocks.{L}.hook_resid_post", restore(t))] + [
                    (names[l], freeze(names[l])) for l in range(L + 1, nL)
                ]
                vals.append(run(hooks)[1])
            sev[variant] = torch.tensor(vals)
    return clean_p, corr_p, restored, sev


def _cache_with_hooks(model: Any, batch: torch.Tensor, names: list[str], hooks: list) -> dict[str, torch.Tensor]:
    """One bridge forward with ``hooks``, saving the activations named ``names``."""
    cache: dict[str, torch.Tensor] = {}

    def save(act, hook):
        cache[hook.name] = act.detach().clone()
        return act

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=hooks + [(n, save) for n in names])
    return cache


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------


def trace_tokens(
    model: Any,
    tokens: Int[torch.Tensor, " pos"],
    subject: tuple[int, int],
    target: int,
    *,
    kinds: Optional[Sequence[str]] = None,
    samples: int = 10,
    noise: Union[None, float, NoiseScale] = None,
    window: int = 10,
    seed: int = 0,
    severed: Sequence[str] = (),
    corrupt: str = "embed",
    positions: Optional[Sequence[Union[int, str]]] = None,
    allow_unpredicted: bool = False,
    method: str = "engine",
    max_rows: int = 4096,
    str_tokens: Optional[list[str]] = None,
    target_str: Optional[str] = None,
) -> FactTrace:
    """Causal-trace one prompt given as tokens (works on models without a tokenizer).

    Args:
        model: A TransformerBridge (mechlib.load_model).
        tokens: The prompt's tokens ``[pos]`` (no batch axis).
        subject: ``(start, end)`` token positions of the subject, ``end`` exclusive.
        target: The attribute's token id.
        kinds: Which states to restore, from ``("resid", "mlp", "attn")``; default: all the
            model has.
        samples: Noise samples (ROME: 10).
        noise: Noise std; a :class:`NoiseScale` (noise = 3 x its std) or ``None`` for
            :func:`default_noise_scale` (of the vectors ``corrupt`` names).
        window: Layers restored together for ``"mlp"``/``"attn"`` (ROME: 10), centred;
            ``window=1`` restores one layer's MLP (attention) output at a time.
        seed: Seed of the noise.
        severed: Also run the severed trace at the last subject token with the later MLPs
            (``"mlp"``) and/or attention (``"attn"``) frozen at their corrupted values. Only the
            outputs of layers above the restored one are frozen: the restored state already
            holds the clean outputs of the layers at and below it (MLP 0's included).
        corrupt: Where the noise goes: ``"embed"`` (ROME) adds it to the subject's token
            embeddings (``hook_embed``); ``"block0"`` treats block 0 (MLP 0 with it) as part of
            the embedding: it runs block 0 clean and adds the noise to the residual stream
            after it (``blocks.0.hook_resid_post``) at the subject's positions. Restoring
            block 0's MLP or attention outputs then changes nothing, and windows restore from
            layer 1 on (a window that holds only layer 0 has exactly no effect).
        positions: Restore only at these token positions (ints, negative ones counted from
            the end, and/or role names from :data:`mechlib.facts.TOKEN_ROLES`, e.g.
            ``["last subject token"]``); the grids hold ``nan`` at the others. Default: every
            position. The severed trace always restores the last subject token.
        allow_unpredicted: Trace even when the model does not predict the attribute (its clean
            probability below :data:`UNPREDICTED_RATIO` x that of the model's top next token);
            otherwise that is refused with a ``ValueError`` saying what the model predicts.
        method: ``"engine"`` (batched, exact) or ``"bridge"`` (ROME's plain loop: one bridge
            forward per cell; used automatically when the engine cannot mirror the model).
        max_rows: Most rows per engine call (memory bound).
        str_tokens: Token strings for labels (default: the ids).
        target_str: The attribute as text (default: the id).

    Returns:
        A :class:`FactTrace`.

    Raises:
        TypeError: A parameter of the wrong type: ``samples``/``window``/``seed``/``target``
            not whole numbers (``True`` included), ``noise`` not a number, ``subject`` not a
            pair, ``kinds``/``severed`` a bare string.
        ValueError: Bad subject span (not two positions, or outside the prompt), target,
            noise (must be > 0), window (1..n_layers), samples, kinds, corrupt, or method; an
            attribute the model does not predict (see ``allow_unpredicted``).
    """
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.long().cpu()
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt [pos], got shape {tuple(tokens.shape)}")
    P = tokens.shape[0]
    s0, s1 = _subject_span(subject, P)
    target = whole(target, "target")
    if not 0 <= target < model.cfg.d_vocab:
        raise ValueError(f"target token {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
    if kinds is None:
        kinds = tuple(k for k in KINDS if not (k == "mlp" and model.cfg.attn_only))
    kinds = _str_selection(kinds, "kinds", KINDS)
    severed = _str_selection(severed, "severed", ("mlp", "attn"))
    seed = whole(seed, "seed")
    _check_corrupt(corrupt)
    if not isinstance(allow_unpredicted, bool):
        raise TypeError(f"allow_unpredicted must be True or False, got {allow_unpredicted!r}")
    if noise is not None and not isinstance(noise, NoiseScale):
        _check_noise(noise)
    _check_params(model, samples, window, kinds, severed)  # before measuring a default noise scale
    scale, source = _resolve_noise(model, noise, corrupt)
    _check_noise(scale)
    if method not in ("engine", "bridge"):
        raise ValueError(f"method must be 'engine' or 'bridge', got {method!r}")
    max_rows = whole(max_rows, "max_rows", minimum=1)
    traced = _positions(positions, P, s0, s1)
    labels = list(str_tokens) if str_tokens is not None else [str(int(i)) for i in tokens]
    if len(labels) != P:
        raise ValueError(f"str_tokens has {len(labels)} entries for {P} tokens")
    target_label = target_str if target_str is not None else str(target)
    top: dict[str, Any] = {}

    def check(last_logits: torch.Tensor) -> None:
        probs = last_logits.float().softmax(-1)
        top_p, top_id = (float(v) for v in probs.max(-1))
        top.update(token=int(top_id), prob=top_p)
        p = float(probs[target])
        if allow_unpredicted or p >= UNPREDICTED_RATIO * top_p:
            return
        raise ValueError(_unpredicted_message(model, target_label, p, int(top_id), top_p, labels))

    eng = get_engine(model) if method == "engine" else None
    if method == "engine" and eng is None:
        warnings.warn(
            "the engine cannot mirror this model; tracing with one bridge forward per cell (slow)", stacklevel=2
        )
    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, scale, seed)
    args = (tokens, s0, s1, target, nz, kinds, window, severed, s1 - 1)
    if eng is not None:
        clean_p, corr_p, restored, sev = _trace_engine(
            eng, *args, max_rows=max_rows, corrupt=corrupt, check=check, positions=traced
        )
    else:
        clean_p, corr_p, restored, sev = _trace_bridge(
            model, *args, skip_before_subject=method == "engine", corrupt=corrupt, check=check, positions=traced
        )
    grids = {
        k: Grid(v, ("layer", "token"), {"token": labels}, f"p(attribute) with {k} restored", "probability")
        for k, v in restored.items()
    }
    sev_grids = {k: Grid(v, ("layer",), {}, f"severed: {k}", "probability") for k, v in sev.items()}
    return FactTrace(
        tokens=tokens,
        str_tokens=labels,
        subject_start=s0,
        subject_end=s1,
        target=target,
        target_str=target_label,
        clean_prob=clean_p,
        corrupted_prob=corr_p,
        restored=grids,
        severed=sev_grids,
        severed_token=s1 - 1 if sev else None,
        noise=scale,
        noise_source=source,
        samples=samples,
        window=window,
        seed=seed,
        corrupt=corrupt,
        top_token=top.get("token"),
        top_prob=top.get("prob", math.nan),
    )


def _positions(positions: Any, n_pos: int, s0: int, s1: int) -> Optional[list[int]]:
    """The traced positions: ``None`` for all, else sorted unique ints from positions and role names."""
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise TypeError(
            f"positions must be a list of token positions and/or role names, got {positions!r}; "
            f"e.g. positions=['last subject token'] or positions=[-1]"
        )
    items = list(positions)
    by_role = _facts.role_positions(n_pos, s0, s1)
    out: list[int] = []
    ints = []
    for item in items:
        if isinstance(item, str):
            if item not in by_role:
                raise ValueError(f"positions: {item!r} is not a token role; roles are {_facts.TOKEN_ROLES}")
            out += by_role[item]
        else:
            ints.append(item)
    if ints:
        out += position_list(n_pos, ints, "positions")
    if not out:
        raise ValueError(f"positions {items!r} select no token of this prompt")
    return sorted(set(out))


def _token_text(model: Any, token: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return tok.decode([token]) if tok is not None else str(token)


def _unpredicted_message(model: Any, target: str, p: float, top_id: int, top_p: float, str_tokens: list[str]) -> str:
    top = _token_text(model, top_id)
    hints = []
    if str_tokens and str_tokens[-1][-1:].isspace():
        hints.append(
            "the prompt ends in a space: byte-level tokenizers put the space at the start of the next "
            "word, so end the prompt without it and give the attribute a leading space"
        )
    if target[:1].isalnum() and top[:1].isspace():
        hints.append(
            f"the attribute has no leading space; after a word the model predicts words with one "
            f"(did you mean {' ' + target!r}?)"
        )
    hint = (" Hint: " + "; ".join(hints) + ".") if hints else ""
    return (
        f"the model does not predict the attribute {target!r}: its clean probability is {p:.3g}, below "
        f"{UNPREDICTED_RATIO:g} x that of the model's top next token {top!r} (p = {top_p:.3g}). Causal tracing "
        f"explains how the model recalls what it predicts; ROME traces known facts only "
        f"(mechlib.facts.known_facts).{hint} Pass allow_unpredicted=True to trace it anyway."
    )


FactLike = Union[str, _facts.Fact, _facts.KnownFact, _facts.TokenizedFact]


def trace_fact(
    model: Any,
    fact: FactLike,
    *,
    subject: Optional[str] = None,
    attribute: Optional[str] = None,
    **kwargs: Any,
) -> FactTrace:
    """Causal-trace one fact (a :class:`~mechlib.facts.Fact`, KnownFact, TokenizedFact, or a
    prompt string with ``subject=`` and ``attribute=``).

    The subject's token positions are found in the prompt with :mod:`mechlib.facts`; keyword
    arguments are those of :func:`trace_tokens` (``kinds``, ``samples``, ``noise``, ``window``,
    ``seed``, ``severed``, ``corrupt``, ``allow_unpredicted``, ``method``).

    Raises:
        TypeError: ``subject``/``attribute`` not strings, or a parameter of the wrong type.
        ValueError: The subject is not in the prompt, the attribute is more than one token,
            the model has no tokenizer, the model does not predict the attribute (unless
            ``allow_unpredicted=True``), or a parameter is out of range.

    Example:
        >>> tr = trace_fact(model, "The Eiffel Tower is located in the city of",
        ...                 subject="Eiffel Tower", attribute=" Paris")    # doctest: +SKIP
        >>> tr.effect("resid").top(1)                                      # doctest: +SKIP
    """
    if isinstance(fact, _facts.KnownFact):
        fact = fact.fact
    for name, value in (("subject", subject), ("attribute", attribute)):
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"{name} must be a string (as it appears in the prompt / the answer token), got {value!r} "
                f"({type(value).__name__}); to give token positions use trace_tokens(model, tokens, (start, end), target)"
            )
    if isinstance(fact, str):
        if subject is None or attribute is None:
            raise ValueError(
                "tracing a prompt string needs subject= (as it appears in the prompt) and attribute= (the answer token, e.g. ' Paris')"
            )
        prompt = fact
        pos = prompt.find(subject)
        if pos < 0:
            raise ValueError(
                f"subject {subject!r} does not occur in prompt {prompt!r}; the subject must appear in the prompt verbatim"
            )
        fact = _facts.Fact(subject, "custom", prompt[:pos] + "{}" + prompt[pos + len(subject) :], attribute)
    elif subject is not None or attribute is not None:
        raise ValueError("subject= and attribute= are only for prompt strings; a Fact carries its own")
    elif not isinstance(fact, (_facts.Fact, _facts.TokenizedFact)):
        raise TypeError(f"fact must be a Fact, KnownFact, TokenizedFact or a prompt string, got {type(fact).__name__}")
    tf = fact if isinstance(fact, _facts.TokenizedFact) else _facts.tokenize_fact(model, fact)
    trace = trace_tokens(
        model,
        tf.tokens,
        (tf.subject_start, tf.subject_end),
        tf.attribute_token,
        str_tokens=tf.str_tokens,
        target_str=tf.fact.attribute,
        **kwargs,
    )
    trace.prompt, trace.subject, trace.attribute = tf.fact.prompt, tf.fact.subject, tf.fact.attribute
    return trace


def trace_facts(
    model: Any,
    facts: Sequence[FactLike],
    *,
    noise: Union[None, float, NoiseScale] = None,
    progress: bool = True,
    **kwargs: Any,
) -> list[FactTrace]:
    """Causal-trace many facts (same noise scale and seed for all), with a progress bar.

    Args:
        model: A TransformerBridge with a tokenizer.
        facts: Facts (or KnownFacts, TokenizedFacts).
        noise: As in :func:`trace_tokens`; measured once for all facts.
        progress: Show a tqdm bar over facts.
        **kwargs: Passed to :func:`trace_fact`.

    Example:
        >>> known = [k.fact for k in known_facts(model, load_facts())]       # doctest: +SKIP
        >>> traces = trace_facts(model, known[:50], noise=noise_scale(model, known))  # doctest: +SKIP
    """
    if noise is None:
        noise = default_noise_scale(model, kwargs.get("corrupt", "embed"))
    return [
        trace_fact(model, f, noise=noise, **kwargs) for f in tqdm(facts, desc="causal tracing", disable=not progress)
    ]


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
