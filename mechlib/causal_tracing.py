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
carries the restored state's effect.

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
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from mechlib import facts as _facts
from mechlib.engine import BaseRun, Engine, get_engine
from mechlib.results import Grid

__all__ = [
    "KINDS",
    "SEVERED",
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


def _check_params(model: Any, samples: int, noise: float, window: int, kinds: Sequence[str], severed: Sequence[str]) -> None:
    n_layers = model.cfg.n_layers
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (ROME uses 10), got {samples!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0):
        raise ValueError(
            f"the noise scale must be a positive number (the std of the Gaussian noise added to the "
            f"subject's embeddings; ROME uses 3 x the std of subject-token embeddings), got {noise!r}"
        )
    if not isinstance(window, int) or not 1 <= window <= n_layers:
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


_NOISE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_noise_scale(model: Any) -> NoiseScale:
    """The reference spread that sets the default noise (noise std = 3 x ``.std``).

    For a model with a tokenizer: the std of the embeddings of every subject token of mechlib's
    facts dataset (:func:`mechlib.facts.noise_scale`), as ROME measured over its subjects. For a
    model without one (the tiny random models): the std of the whole embedding matrix. Cached
    per model.
    """
    hit = _NOISE_CACHE.get(model)
    if hit is not None:
        return hit
    if getattr(model, "tokenizer", None) is not None:
        facts = [f for f in _facts.load_facts()]
        scale = _facts.noise_scale(model, facts)
    else:
        W = model.W_E.detach().float()
        scale = NoiseScale(float(W.std()), W.shape[0], W.shape[0], f"all {W.shape[0]} rows of the token embedding matrix")
    _NOISE_CACHE[model] = scale
    return scale


def _resolve_noise(model: Any, noise: Union[None, float, NoiseScale], multiplier: float = 3.0) -> tuple[float, str]:
    if noise is None:
        scale = default_noise_scale(model)
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
        where = f"{self.label!r}({self.index}, {self.role})" if self.role and self.role != self.label else repr(self.label)
        return f"Peak({self.kind}: L{self.layer} @ {where} = {self.value:.3g})"


def _heatmap(ax: Any, values: torch.Tensor, rows: list[str], kind: str, title: str, xlabel: str, cbar: str, vmin: Optional[float]) -> None:
    """ROME-style heatmap: rows are tokens/roles, columns are layers."""
    v = values.float().numpy()
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
    return "single restored layer" if kind == "resid" else f"centre of interval of {window} restored {'MLP' if kind == 'mlp' else 'attn'} layers"


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
        return Grid(g.values - self.corrupted_prob, g.dims, g.labels, f"indirect effect ({kind})", "restored - corrupted p", dict(g.meta))

    def severed_effect(self) -> Grid:
        """Indirect effect at ``severed_token`` per layer and variant: ``Grid(layer, variant)``."""
        if not self.severed:
            raise ValueError("this trace has no severed variant; trace with severed=('mlp', 'attn')")
        names = list(self.severed)
        vals = torch.stack([self.severed[n].values for n in names], dim=1) - self.corrupted_prob
        return Grid(vals, ("layer", "variant"), {"variant": names}, "indirect effect at the last subject token", "restored - corrupted p")

    def peak(self, kind: str = "resid") -> Peak:
        """The (layer, token) of the largest indirect effect of ``kind``."""
        (c, v), = self.effect(kind).top(1)
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
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.25 * len(self.str_tokens) + 1.6), squeeze=False)
        rows = [f"{t}*" if self.subject_start <= i < self.subject_end else t for i, t in enumerate(self.str_tokens)]
        for ax, kind in zip(axes[0], kinds):
            xl = _xlabel(kind, self.window) + (f" within {model_name}" if model_name else "")
            _heatmap(ax, self._grid(kind).values.T, rows, kind, _TITLE[kind], xl, f"p({self.target_str.strip()})", self.corrupted_prob)
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
    """

    effects: dict[str, Grid]
    n_facts: int
    role_counts: dict[str, int]
    clean_prob: float
    corrupted_prob: float
    total_effect: float
    severed: Optional[Grid] = None
    window: int = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.effects)

    def effect(self, kind: str = "resid") -> Grid:
        if kind not in self.effects:
            raise KeyError(f"kind {kind!r} was not traced; this average has {self.kinds}")
        return self.effects[kind]

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
            _heatmap(ax, torch.nan_to_num(g.values.T), g.labels["role"], kind, title, xl, "mean indirect effect on p", 0.0)
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
            ax.bar([l + (j - (len(names) - 1) / 2) * width for l in range(n_layers)], g.values[:, j].numpy(), width,
                   color=_SEVER_COLOR.get(name), label=_SEVER_LABEL.get(name, name))
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
        out.append(eng.resume_rows(base, starts[ids], t, resid=resid[ids], base_index=base_index[ids], edits=make_edits(ids)))
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
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    nL, S = eng.n_layers, noise.shape[0]
    P = tokens.shape[0]
    dev = eng.device
    T = tokens[None].to(dev)
    clean = eng.run(T)
    embed = eng.embed(T).expand(S, -1, -1).clone()
    embed[:, s0:s1] += noise.to(device=dev, dtype=embed.dtype)
    corr = eng.run(embed=embed)
    clean_p = float(_prob(clean.logits[0, -1], target))
    corr_p = float(_prob(corr.logits[:, -1], target).mean())

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

    def window_rows(kind: str, t: int, lo: torch.Tensor, clean_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Block lo, the window's first, changes only token t (its keys and values come from the
        # corrupted residual): apply it in closed form and start every row at lo + 1.
        x = post_corr[lo, base_index, t:].clone()
        if kind == "mlp":
            x[:, 0] = mid_corr[lo, base_index, t] + clean_out[lo, t]
        else:
            mid = pre_corr[lo, base_index, t] + clean_out[lo, t]
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
    for kind in kinds:
        out = torch.full((nL, P), corr_p)
        if kind != "resid":
            hook = _HOOK[kind]
            clean_out = _stack(clean, hook, nL)[:, 0]  # [L, P, d]
            lo = (layer_of - window // 2).clamp(min=0)
            hi = (layer_of - (-window // 2)).clamp(max=nL)
        for t in range(s0, P):
            if kind == "resid":
                starts, x = resid_rows(t)
                edits = no_edits
            else:
                starts, x = window_rows(kind, t, lo, clean_out)

                def edits(ids, t=t, hook=hook, clean_out=clean_out):
                    hi_c = hi[ids]

                    def restore(l):
                        def fn(act, ctx):  # rows computed at l start at lo + 1 <= l
                            rows = ctx.rows if ctx.rows is not None else torch.arange(act.shape[0])
                            act[(hi_c[rows] > l).to(act.device), 0] = clean_out[l, t]
                            return act

                        return fn

                    layers = range(int(lo[ids].min()) + 1, min(int(hi_c.max()), top_layer(t)))
                    return {f"blocks.{l}.{hook}": restore(l) for l in layers}

            logits = _run_rows(eng, corr, t, starts, x, base_index, edits, max_rows)
            out[:, t] = _prob(logits, target).view(nL, S).mean(dim=1).cpu()
        restored[kind] = out

    sev: dict[str, torch.Tensor] = {}
    if severed:
        t = sever_pos
        if "resid" in restored:
            sev["none"] = restored["resid"][:, t].clone()
        else:
            starts, x = resid_rows(t)
            sev["none"] = _prob(_run_rows(eng, corr, t, starts, x, base_index, no_edits, max_rows), target).view(nL, S).mean(1).cpu()
        for variant in severed:
            frozen = _stack(corr, _HOOK[variant], nL)[:, :, t]  # [L, S, d] corrupted outputs at t

            def freeze(l):
                def fn(act, ctx):  # every row computed at layer l restored a layer below l
                    act[:, 0] = frozen[l, ctx.base_index.to(frozen.device)]
                    return act

                return fn

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
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ROME's loop: per cell, one bridge forward of ``[clean, corrupted x samples]``, the
    restored state copied from the clean row (row 0) into the corrupted rows."""
    nL, S = model.cfg.n_layers, noise.shape[0]
    P = tokens.shape[0]
    batch = tokens[None].repeat(S + 1, 1).to(model.cfg.device)

    def corrupt(act, hook):
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
            logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)] + hooks)
        p = _prob(logits[:, -1], target)
        return float(p[0]), float(p[1:].mean())

    clean_p, corr_p = run([])
    restored: dict[str, torch.Tensor] = {}
    for kind in kinds:
        out = torch.full((nL, P), corr_p)
        for t in range(s0 if skip_before_subject else 0, P):
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
            cache = _cache_with_hooks(model, batch, names, [("hook_embed", corrupt)])  # ROME's first pass

            def freeze(name):
                def fn(act, hook):
                    act = act.clone()
                    act[1:, t] = cache[name][1:, t]
                    return act

                return fn

            vals = []
            for L in range(nL):
                hooks = [(f"blocks.{L}.hook_resid_post", restore(t))] + [(names[l], freeze(names[l])) for l in range(L + 1, nL)]
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
    tokens: Int[torch.Tensor, "pos"],
    subject: tuple[int, int],
    target: int,
    *,
    kinds: Optional[Sequence[str]] = None,
    samples: int = 10,
    noise: Union[None, float, NoiseScale] = None,
    window: int = 10,
    seed: int = 0,
    severed: Sequence[str] = (),
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
            :func:`default_noise_scale`.
        window: Layers restored together for ``"mlp"``/``"attn"`` (ROME: 10), centred.
        seed: Seed of the noise.
        severed: Also run the severed trace at the last subject token with the later MLPs
            (``"mlp"``) and/or attention (``"attn"``) frozen at their corrupted values.
        method: ``"engine"`` (batched, exact) or ``"bridge"`` (ROME's plain loop: one bridge
            forward per cell; used automatically when the engine cannot mirror the model).
        max_rows: Most rows per engine call (memory bound).
        str_tokens: Token strings for labels (default: the ids).
        target_str: The attribute as text (default: the id).

    Returns:
        A :class:`FactTrace`.

    Raises:
        ValueError: Bad subject span, target, noise (must be > 0), window (1..n_layers),
            samples, kinds, or method.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt [pos], got shape {tuple(tokens.shape)}")
    P = tokens.shape[0]
    s0, s1 = int(subject[0]), int(subject[1])
    if not 0 <= s0 < s1 <= P:
        raise ValueError(f"subject span {subject} does not fit a prompt of {P} tokens; need 0 <= start < end <= {P}")
    if not 0 <= int(target) < model.cfg.d_vocab:
        raise ValueError(f"target token {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
    if kinds is None:
        kinds = tuple(k for k in KINDS if not (k == "mlp" and model.cfg.attn_only))
    kinds = tuple(kinds)
    severed = tuple(severed)
    scale, source = _resolve_noise(model, noise)
    _check_params(model, samples, scale, window, kinds, severed)
    if method not in ("engine", "bridge"):
        raise ValueError(f"method must be 'engine' or 'bridge', got {method!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    eng = get_engine(model) if method == "engine" else None
    if method == "engine" and eng is None:
        warnings.warn("the engine cannot mirror this model; tracing with one bridge forward per cell (slow)", stacklevel=2)
    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, scale, seed)
    args = (tokens, s0, s1, int(target), nz, kinds, window, severed, s1 - 1)
    if eng is not None:
        clean_p, corr_p, restored, sev = _trace_engine(eng, *args, max_rows=max_rows)
    else:
        clean_p, corr_p, restored, sev = _trace_bridge(model, *args, skip_before_subject=method == "engine")
    labels = list(str_tokens) if str_tokens is not None else [str(int(i)) for i in tokens]
    if len(labels) != P:
        raise ValueError(f"str_tokens has {len(labels)} entries for {P} tokens")
    grids = {
        k: Grid(v, ("layer", "token"), {"token": labels}, f"p(attribute) with {k} restored", "probability")
        for k, v in restored.items()
    }
    sev_grids = {k: Grid(v, ("layer",), {}, f"severed: {k}", "probability") for k, v in sev.items()}
    return FactTrace(
        tokens=tokens, str_tokens=labels, subject_start=s0, subject_end=s1, target=int(target),
        target_str=target_str if target_str is not None else str(int(target)), clean_prob=clean_p,
        corrupted_prob=corr_p, restored=grids, severed=sev_grids, severed_token=s1 - 1 if sev else None,
        noise=scale, noise_source=source, samples=samples, window=window, seed=seed,
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
    ``seed``, ``severed``, ``method``).

    Raises:
        ValueError: The subject is not in the prompt, the attribute is more than one token,
            the model has no tokenizer, or a parameter is out of range.

    Example:
        >>> tr = trace_fact(model, "The Eiffel Tower is located in the city of",
        ...                 subject="Eiffel Tower", attribute=" Paris")    # doctest: +SKIP
        >>> tr.effect("resid").top(1)                                      # doctest: +SKIP
    """
    if isinstance(fact, _facts.KnownFact):
        fact = fact.fact
    if isinstance(fact, str):
        if subject is None or attribute is None:
            raise ValueError("tracing a prompt string needs subject= (as it appears in the prompt) and attribute= (the answer token, e.g. ' Paris')")
        prompt = fact
        pos = prompt.find(subject)
        if pos < 0:
            raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}; the subject must appear in the prompt verbatim")
        fact = _facts.Fact(subject, "custom", prompt[:pos] + "{}" + prompt[pos + len(subject):], attribute)
    elif subject is not None or attribute is not None:
        raise ValueError("subject= and attribute= are only for prompt strings; a Fact carries its own")
    tf = fact if isinstance(fact, _facts.TokenizedFact) else _facts.tokenize_fact(model, fact)
    trace = trace_tokens(
        model, tf.tokens, (tf.subject_start, tf.subject_end), tf.attribute_token,
        str_tokens=tf.str_tokens, target_str=tf.fact.attribute, **kwargs,
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
        noise = default_noise_scale(model)
    return [trace_fact(model, f, noise=noise, **kwargs) for f in tqdm(facts, desc="causal tracing", disable=not progress)]


def average_by_role(traces: Sequence[FactTrace]) -> RoleTrace:
    """Average indirect effects over facts by ROME's token roles (:data:`mechlib.facts.TOKEN_ROLES`).

    Example:
        >>> avg = average_by_role(traces)      # doctest: +SKIP
        >>> avg.peak("mlp")                    # doctest: +SKIP
        Peak(mlp: L5 @ 'last subject token' = 0.12)
    """
    if not traces:
        raise ValueError("average_by_role needs at least one FactTrace")
    kinds = traces[0].kinds
    n_layers = traces[0].n_layers
    for tr in traces:
        if tr.kinds != kinds or tr.n_layers != n_layers:
            raise ValueError("all traces must come from the same model and kinds")
    roles = list(_facts.TOKEN_ROLES)
    effects = {}
    for kind in kinds:
        per = torch.stack([_facts.average_by_role(tr.effect(kind).values, tr.subject_start, tr.subject_end) for tr in traces])
        effects[kind] = Grid(torch.nanmean(per, dim=0), ("layer", "role"), {"role": roles}, f"average indirect effect ({kind})", "restored - corrupted p",
                             {"n_facts": len(traces)})
    counts = {}
    for r in roles:
        counts[r] = sum(1 for tr in traces if _facts.role_positions(len(tr.str_tokens), tr.subject_start, tr.subject_end)[r])
    sev = None
    with_sev = [tr for tr in traces if tr.severed]
    if with_sev:
        names = list(with_sev[0].severed)
        sev = Grid(torch.stack([tr.severed_effect().values for tr in with_sev]).mean(0), ("layer", "variant"), {"variant": names},
                   "average indirect effect at the last subject token", "restored - corrupted p", {"n_facts": len(with_sev)})
    clean = sum(tr.clean_prob for tr in traces) / len(traces)
    corr = sum(tr.corrupted_prob for tr in traces) / len(traces)
    return RoleTrace(effects, len(traces), counts, clean, corr, clean - corr, sev, traces[0].window)
