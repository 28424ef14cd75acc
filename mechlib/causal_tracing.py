"""Causal tracing of factual recall (Meng et al. 2022, ROME), as intervention lists on any backend.

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

**One implementation, any backend.** The corrupted run is a base run given as the prompt plus
one intervention (``Add(noise)`` at the subject: :func:`mechlib.corruption.corruption`); every
cell is a list of interventions on it (``Patch("clean")`` at the restored states,
``Freeze("corrupted")`` at the severed outputs) that a backend of :mod:`mechlib.backends` runs
(``backend="auto"``: the engine where it mirrors the model, else the bridge; the one used is
:attr:`FactTrace.backend`). On the engine the corrupted run is cached once and every list
resumes from it at its first restored layer and token, all lists of a token in one call, each row
from its own layer, unembedding the last position only. Cells that cannot change the last
token's logits are not run: restorations before the first subject token (clean and corrupted
states are identical there: the effect is exactly 0) and outputs of the top block at an earlier
token.

Layout: :mod:`mechlib.corruption` (noise scale, the corrupted run), :mod:`mechlib.trace_results`
(:class:`FactTrace`, :class:`RoleTrace`, :class:`Peak`, :func:`average_by_role`), this module (the
tracing); every public name is importable from here.

Example:
    >>> import mechlib
    >>> from mechlib.causal_tracing import trace_fact, trace_facts, average_by_role
    >>> model = mechlib.load_model("smollm2-135m")                           # doctest: +SKIP
    >>> tr = trace_fact(model, "The Eiffel Tower is located in the city of",
    ...                 subject="Eiffel Tower", attribute=" Paris")          # doctest: +SKIP
    >>> tr.peak("mlp"), tr.backend                                            # doctest: +SKIP
    (Peak(mlp: L4 @ ' Tower'(3, last subject token) = 0.41), 'engine')
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
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from mechlib import facts as _facts
from mechlib.backends import MAX_LOGIT_FLOATS, Backend, RunSpec, get_backend
from mechlib.corruption import (
    CORRUPTIONS,
    NoiseScale,
    check_corrupt,
    check_noise,
    corruption,
    corruption_noise,
    default_noise_scale,
    resolve_noise,
)
from mechlib.interventions import Freeze, Intervention, Patch, Site
from mechlib.results import Grid
from mechlib.trace_results import KINDS, SEVERED, FactTrace, Peak, RoleTrace, average_by_role
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
    "corruption",
    "corruption_noise",
    "default_noise_scale",
    "trace_fact",
    "trace_facts",
    "trace_tokens",
    "window_layers",
]

#: A fact is refused when the attribute's clean probability is below this fraction of the
#: model's top next token's (the model does not predict it); ``allow_unpredicted=True`` overrides.
UNPREDICTED_RATIO = 0.1

#: The intervention point each kind restores (and each severed variant freezes).
_POINT = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


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


# ----------------------------------------------------------------------------------------
# The tracer: intervention lists on a backend
# ----------------------------------------------------------------------------------------


def _prob(logits: torch.Tensor, target: int) -> torch.Tensor:
    return logits.float().softmax(dim=-1)[..., target]


def _restore(point: str, layers: Iterable[int], t: int) -> list[Intervention]:
    return [Intervention(Site(point, l, positions=(t,)), Patch("clean")) for l in layers]


def _trace(
    be: Backend,
    tokens: torch.Tensor,
    s0: int,
    s1: int,
    target: int,
    noise: torch.Tensor,
    kinds: Sequence[str],
    window: int,
    severed: Sequence[str],
    corrupt: str,
    check: Any,
    traced: list[int],
    max_rows: int,
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean and corrupted probabilities, restored grids ``{kind: [layer, pos]}`` and severed
    profiles ``{variant: [layer]}``: one list of interventions per cell, run on ``be``."""
    nL, S, P = be.n_layers, noise.shape[0], tokens.shape[0]
    batch = tokens[None].repeat(S, 1)
    hooks = {f"blocks.{l}.hook_{_POINT[k]}" for k in kinds for l in range(nL)}
    if severed:
        hooks |= {f"blocks.{l}.hook_resid_post" for l in range(nL)}
        hooks |= {f"blocks.{l}.hook_{_POINT[v]}" for v in severed for l in range(nL)}
    corrupted = RunSpec(batch, corruption(noise, P, (s0, s1), corrupt))
    runs = be.cache({"clean": batch, "corrupted": corrupted}, hooks)
    clean_last = runs.last_logits("clean")[0]
    check(clean_last)
    clean_p = float(_prob(clean_last, target))
    corr_p = float(_prob(runs.last_logits("corrupted"), target).float().cpu().mean())
    # With the noise added after block 0, block 0's attention and MLP outputs are clean in the
    # corrupted run: restoring them changes nothing, so windows start at layer 1.
    first = 0 if corrupt == "embed" else 1

    def top(t: int) -> int:
        # Outputs of the top block at a token before the last cannot reach the last token's logits.
        return nL if t == P - 1 else nL - 1

    restored = {k: torch.full((nL, P), math.nan) for k in kinds}
    for grid in restored.values():
        grid[:, traced] = corr_p  # unchanged cells: exactly no effect
    lists: list[list[Intervention]] = []
    cells: list[tuple[str, int, int]] = []  # (kind or "severed:variant", layer, token)
    for kind in kinds:
        for t in (t for t in traced if t >= s0):
            for L in range(nL):
                if kind == "resid":
                    layers = [L] if L < top(t) else []
                else:
                    layers = [l for l in window_layers(L, window, nL) if first <= l < top(t)]
                if layers:
                    lists.append(_restore(_POINT[kind], layers, t))
                    cells.append((kind, L, t))
    # The severed trace restores the residual at the last subject token; "none" freezes nothing
    # (the resid trace's column there, when it was traced).
    sever_t = s1 - 1
    reuse = "resid" in kinds and sever_t in traced
    sev: dict[str, torch.Tensor] = {v: torch.full((nL,), corr_p) for v in (["none", *severed] if severed else [])}
    for variant in [v for v in sev if not (v == "none" and reuse)]:
        for L in range(min(nL, top(sever_t))):
            frozen = []
            if variant != "none":
                frozen = [
                    Intervention(Site(_POINT[variant], l, positions=(sever_t,)), Freeze("corrupted"))
                    for l in range(L + 1, top(sever_t))
                ]
            lists.append(_restore("resid_post", [L], sever_t) + frozen)
            cells.append((f"severed:{variant}", L, sever_t))
    if lists:
        if not be.reuses_prefix:  # a backend that unembeds every position: bound the logits per call
            max_rows = min(max_rows, max(S, int(MAX_LOGIT_FLOATS // (P * be.d_vocab))))
        out = be.run(
            runs,
            lists,
            base="corrupted",
            score=lambda lg: _prob(lg[:, -1], target),
            min_rows=max_rows,
            max_rows=max_rows,
            desc="causal tracing",
        )
        values = out.values.view(len(lists), S).mean(dim=1)
        for (key, L, t), v in zip(cells, values.tolist()):
            if key.startswith("severed:"):
                sev[key.split(":", 1)[1]][L] = v
            else:
                restored[key][L, t] = v
    if severed and reuse:
        sev["none"] = restored["resid"][:, sever_t].clone()
    return clean_p, corr_p, restored, sev


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
    backend: Union[str, Backend] = "auto",
    max_rows: int = 4096,
    str_tokens: Optional[list[str]] = None,
    target_str: Optional[str] = None,
    method: Optional[str] = None,
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
        backend: Which backend runs the intervention lists (:func:`mechlib.backends.get_backend`):
            ``"auto"`` (the engine where it mirrors the model, else the bridge), ``"engine"``,
            ``"bridge"``, ``"nnsight"``, or a :class:`~mechlib.backends.Backend`. The one used
            is :attr:`FactTrace.backend`.
        max_rows: Most rows (lists x samples) per backend call (memory bound).
        str_tokens: Token strings for labels (default: the ids).
        target_str: The attribute as text (default: the id).
        method: Deprecated: ``"engine"`` is ``backend="auto"``, ``"bridge"`` is ``backend="bridge"``.

    Returns:
        A :class:`FactTrace`.

    Raises:
        TypeError: A parameter of the wrong type: ``samples``/``window``/``seed``/``target``
            not whole numbers (``True`` included), ``noise`` not a number, ``subject`` not a
            pair, ``kinds``/``severed`` a bare string.
        ValueError: Bad subject span (not two positions, or outside the prompt), target,
            noise (must be > 0), window (1..n_layers), samples, kinds, corrupt, or backend; an
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
    check_corrupt(corrupt)
    if not isinstance(allow_unpredicted, bool):
        raise TypeError(f"allow_unpredicted must be True or False, got {allow_unpredicted!r}")
    if noise is not None and not isinstance(noise, NoiseScale):
        check_noise(noise)
    _check_params(model, samples, window, kinds, severed)  # before measuring a default noise scale
    scale, source = resolve_noise(model, noise, corrupt)
    check_noise(scale)
    if method is not None:
        if method not in ("engine", "bridge"):
            raise ValueError(f"method must be 'engine' or 'bridge', got {method!r}")
        warnings.warn(
            "trace_tokens(method=...) is deprecated; pass backend='auto' / 'engine' / 'bridge' / 'nnsight'",
            DeprecationWarning,
            stacklevel=2,
        )
        if backend != "auto":
            raise ValueError("pass backend= or the deprecated method=, not both")
        backend = "auto" if method == "engine" else "bridge"
    be = get_backend(model, backend)
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

    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, scale, seed)
    clean_p, corr_p, restored, sev = _trace(
        be, tokens, s0, s1, target, nz, kinds, window, severed, corrupt, check, traced or list(range(P)), max_rows
    )
    grids = {
        k: Grid(
            v,
            ("layer", "token"),
            {"token": labels},
            f"p(attribute) with {k} restored",
            "probability",
            {"backend": be.name},
        )
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
        backend=be.name,
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
    ``seed``, ``severed``, ``corrupt``, ``positions``, ``allow_unpredicted``, ``backend``).

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
