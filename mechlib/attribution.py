"""Input feature attribution for one next-token decision, and how faithful each explanation is.

Which words of an input made the model prefer one answer over another at the last position?
Four classical local explanations, all scored on the same *target* (a logit difference between two
answers, an answer's logit or its probability) and aggregated from sub-word tokens to words:

* :func:`occlusion`: leave-one-out; a word's score is how much the target drops when its tokens are
  deleted from the input (the input gets shorter, as in ERASER; nothing is replaced).
* :func:`gradient_x_input`: gradient of the target with respect to each token's embedding, dotted
  with that embedding (Captum's ``InputXGradient``).
* :func:`integrated_gradients`: Captum's ``IntegratedGradients`` on the token embeddings, from a
  baseline where the attributed words' embeddings are zero or a reference token's (the prompt
  template is kept), with the
  completeness error (sum of attributions minus ``f(x) - f(baseline)``) reported per input.
* :func:`attention_scores`: attention from the last position to each token, averaged over heads
  and layers (a popular, unsigned and non-causal comparison).

:func:`random_attribution` is the control every faithfulness number is set beside.

Faithfulness (ERASER, DeYoung et al. 2020, arXiv 1911.03429): :func:`faithfulness` deletes the
top-``k`` fraction of words of a ranking (*comprehensiveness*: how much the target drops; higher is
more faithful) or keeps only them (*sufficiency*: how much it drops; lower is more faithful) for
each ``k`` in ``ks``, averages over ``ks`` (the area over the perturbation curve, AOPC), and counts
decision flips. Agreement between two explanations: :func:`rank_correlation` (Spearman) and
:func:`top_k_overlap`.

Inputs are :class:`Segmented` token sequences: token ids plus, for every token, the index of the
word it belongs to (``-1`` for template tokens that are never attributed or removed). Build them
with :func:`segment` (models with a tokenizer) or :func:`from_tokens` (token ids, one word per token).

Example:
    >>> import mechlib                                                            # doctest: +SKIP
    >>> from mechlib import attribution as attr                                  # doctest: +SKIP
    >>> model = mechlib.load_model()                                              # doctest: +SKIP
    >>> seg = attr.segment(model, "The food was wonderful .".split(), prefix="Review:",
    ...                    suffix="\\nSentiment:")                               # doctest: +SKIP
    >>> target = attr.decision_targets(model, [seg], " positive", " negative")[0]  # doctest: +SKIP
    >>> ig = attr.integrated_gradients(model, [seg], [target], steps=32)[0]     # doctest: +SKIP
    >>> ig.top(2), ig.info["completeness_error"]                                  # doctest: +SKIP
    >>> f = attr.faithfulness(model, [seg], [target], [ig])                       # doctest: +SKIP
    >>> f.aopc_comprehensiveness, f.aopc_sufficiency                              # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from mechlib.models import model_device
from mechlib.readout import Prefix, activations, last_logits, prefix_cache, shared_prefix_length
from mechlib.types import Model
from mechlib.validate import choice, finite, layer_list, position_list, str_list, token_tensor, whole

__all__ = [
    "ERASER_KS",
    "KINDS",
    "Attribution",
    "Faithfulness",
    "Segmented",
    "Target",
    "answer_id",
    "attention_scores",
    "decision_targets",
    "faithfulness",
    "from_tokens",
    "gradient_x_input",
    "integrated_gradients",
    "occlusion",
    "random_attribution",
    "rank_correlation",
    "ranks",
    "score",
    "segment",
    "top_k_overlap",
]

KINDS = ("logit_diff", "logit", "prob")
#: ERASER's bins: the fractions of words removed or kept (DeYoung et al. 2020, section 4).
ERASER_KS = (0.01, 0.05, 0.1, 0.2, 0.5)


# --------------------------------------------------------------------------------------------------
# Inputs and targets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segmented:
    """One input, as tokens grouped into words.

    Attributes:
        tokens: ``[pos]`` token ids (``long``).
        word_index: ``[pos]`` the word each token belongs to, ``-1`` for tokens that are part of the
            template (never attributed, never removed).
        words: The words, in order; ``word_index`` takes values in ``range(len(words))``.
    """

    tokens: torch.Tensor
    word_index: torch.Tensor
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.ndim != 1 or self.tokens.numel() == 0:
            raise ValueError("Segmented.tokens must be a non-empty 1-D tensor of token ids")
        if self.tokens.is_floating_point() or self.tokens.dtype == torch.bool:
            raise TypeError(f"Segmented.tokens must hold integer token ids, got {self.tokens.dtype}")
        if not isinstance(self.word_index, torch.Tensor) or self.word_index.shape != self.tokens.shape:
            raise ValueError("Segmented.word_index must be a tensor with one entry per token")
        if not self.words:
            raise ValueError("Segmented.words is empty: an input needs at least one word to attribute")
        present = set(self.word_index[self.word_index >= 0].tolist())
        if present != set(range(len(self.words))) or int(self.word_index.min()) < -1:
            raise ValueError(
                "Segmented.word_index must give every word at least one token and use -1 for template tokens only"
            )

    @property
    def n_words(self) -> int:
        return len(self.words)

    def keep(self, words: Sequence[int]) -> torch.Tensor:
        """``[pos']``: the template tokens and the tokens of ``words`` only, in their order."""
        keep = torch.zeros(self.n_words + 1, dtype=torch.bool)
        keep[0] = True  # template tokens (word_index -1, shifted to 0)
        keep[torch.as_tensor(list(words), dtype=torch.long) + 1] = True
        return self.tokens[keep[self.word_index + 1]]

    def drop(self, words: Sequence[int]) -> torch.Tensor:
        """``[pos']``: the input with the tokens of ``words`` deleted."""
        gone = set(int(w) for w in words)
        return self.keep([w for w in range(self.n_words) if w not in gone])

    def to_words(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``[n_words]``: per-token scores summed over each word's tokens (template tokens left out)."""
        mask = self.word_index >= 0
        out = torch.zeros(self.n_words, dtype=torch.float64)
        return out.index_add_(0, self.word_index[mask], token_scores.detach().to(torch.float64).cpu()[mask])


def _encode(model: Model, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def segment(model: Model, words: Sequence[str], *, prefix: str = "", suffix: str = "") -> Segmented:
    """Tokenize ``prefix + " ".join(words) + suffix`` keeping track of which tokens form which word.

    Each word is tokenized on its own, with the space that precedes it (none for the first word
    when ``prefix`` is empty or ends in whitespace), so deleting a word deletes exactly its tokens.
    ``prefix`` and ``suffix`` are the template (e.g. a chat prompt): kept, never attributed.
    Special tokens written in the text (``<|im_start|>``) are parsed; no BOS is added.

    Args:
        model: A model with a tokenizer (``model.tokenizer``).
        words: The words to attribute, e.g. ``sentence.split()``.
        prefix: Text before the words.
        suffix: Text after the words (the next token after it is the decision explained).
    """
    words = str_list(words, "words")
    if any(not w or w != w.strip() for w in words):
        raise ValueError("words must be non-empty and hold no surrounding whitespace (use sentence.split())")
    if getattr(model, "tokenizer", None) is None:
        raise TypeError("model has no tokenizer: build the input from token ids with attribution.from_tokens")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise TypeError("prefix and suffix must be strings")
    ids = _encode(model, prefix) if prefix else []
    index = [-1] * len(ids)
    for i, w in enumerate(words):
        lead = "" if i == 0 and (not prefix or prefix[-1].isspace()) else " "
        t = _encode(model, lead + w)
        ids += t
        index += [i] * len(t)
    if suffix:
        t = _encode(model, suffix)
        ids += t
        index += [-1] * len(t)
    return Segmented(torch.tensor(ids, dtype=torch.long), torch.tensor(index, dtype=torch.long), tuple(words))


def from_tokens(tokens: Any, attributable: Optional[Sequence[int]] = None, model: Optional[Model] = None) -> Segmented:
    """A :class:`Segmented` from token ids where every attributable token is its own word.

    Args:
        tokens: ``[pos]`` (or ``[1, pos]``) token ids.
        attributable: Positions to attribute (default: all); the others are template.
        model: Optional; checks the ids against its vocabulary.
    """
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    tokens = token_tensor(tokens, model, "tokens")
    if tokens.shape[0] != 1:
        raise ValueError(f"tokens must hold one sequence, got {tokens.shape[0]}")
    tokens = tokens[0].cpu()
    pos = position_list(tokens.numel(), attributable, "attributable")
    index = torch.full_like(tokens, -1)
    index[torch.tensor(pos)] = torch.arange(len(pos))
    return Segmented(tokens, index, tuple(f"[{p}]" for p in pos))


@dataclass(frozen=True)
class Target:
    """The scalar an attribution explains, read from the last position's logits.

    Attributes:
        answer: Token id of the answer.
        other: Token id of the alternative (``kind="logit_diff"`` only).
        kind: ``"logit_diff"`` (answer minus other logit), ``"logit"`` or ``"prob"`` (of ``answer``).
    """

    answer: int
    other: Optional[int] = None
    kind: str = "logit_diff"

    def __post_init__(self) -> None:
        choice(self.kind, "kind", KINDS)
        whole(self.answer, "answer", minimum=0)
        if self.kind == "logit_diff":
            if self.other is None:
                raise ValueError("kind='logit_diff' needs other= (the alternative answer's token id)")
            whole(self.other, "other", minimum=0)
            if self.other == self.answer:
                raise ValueError("answer and other are the same token: their logit difference is always 0")

    def value(self, last_logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` target values from ``[batch, vocab]`` last-position logits (differentiable)."""
        if self.kind == "logit_diff":
            return last_logits[:, self.answer] - last_logits[:, self.other]
        if self.kind == "logit":
            return last_logits[:, self.answer]
        return last_logits.log_softmax(-1)[:, self.answer].exp()

    def decided(self, last_logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` bool: the model still prefers ``answer`` (over ``other``, or over all tokens)."""
        if self.kind == "logit_diff":
            return last_logits[:, self.answer] > last_logits[:, self.other]
        return last_logits.argmax(-1) == self.answer


def answer_id(model: Model, answer: Union[str, int], name: str = "answer") -> int:
    """The token id of a one-token answer (``" positive"``), or a checked token id; a string of
    several tokens is refused."""
    if isinstance(answer, str):
        if getattr(model, "tokenizer", None) is None:
            raise TypeError(f"{name} is a string but the model has no tokenizer; pass a token id")
        ids = _encode(model, answer)
        if len(ids) != 1:
            raise ValueError(f"{name}={answer!r} is {len(ids)} tokens; an answer must be a single token")
        return int(ids[0])
    return whole(answer, name, minimum=0, maximum=int(model.cfg.d_vocab) - 1)


def _check_inputs(segs: Any, targets: Any = None) -> tuple[list[Segmented], Optional[list[Target]]]:
    if isinstance(segs, Segmented):
        raise TypeError("segs must be a list of Segmented inputs; wrap a single one as [seg]")
    segs = list(segs)
    if not segs:
        raise ValueError("segs is empty: nothing to attribute")
    if any(not isinstance(s, Segmented) for s in segs):
        raise TypeError("segs must hold Segmented inputs (attribution.segment / from_tokens)")
    if targets is None:
        return segs, None
    if isinstance(targets, Target):
        targets = [targets] * len(segs)
    targets = list(targets)
    if len(targets) != len(segs):
        raise ValueError(f"targets has {len(targets)} entries for {len(segs)} inputs; give one per input or one Target")
    if any(not isinstance(t, Target) for t in targets):
        raise TypeError("targets must hold Target objects (see attribution.decision_targets)")
    return segs, targets


# --------------------------------------------------------------------------------------------------
# Batched forward passes
# --------------------------------------------------------------------------------------------------


def _groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length (exact: no padding), in chunks of ``batch_size``."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_len[n].append(i)
    return [
        idx[j : j + batch_size] for n in sorted(by_len) for idx in [by_len[n]] for j in range(0, len(idx), batch_size)
    ]


def _shared_prefix(model: Model, rows: Sequence[torch.Tensor], limit: Optional[int] = None) -> Optional[Prefix]:
    """The keys and values of the leading tokens every row shares (at most ``limit`` of them),
    computed once for every forward pass of a call (:func:`mechlib.readout.prefix_cache`); ``None``
    when the rows share nothing or the model takes no cache."""
    n = shared_prefix_length(rows)
    n = n if limit is None else min(n, limit)
    return prefix_cache(model, rows[0].reshape(-1)[:n]) if n > 0 else None


def _last_logits(
    model: Model, tokens: torch.Tensor, embeds: Optional[torch.Tensor] = None, prefix: Optional[Prefix] = None
) -> torch.Tensor:
    """``[batch, vocab]`` logits at the last position; ``embeds`` replaces the token embeddings (those
    of the prefix's positions must be the tokens' own: the prefix's cached keys and values stand for them)."""
    if embeds is None:
        return last_logits(model, tokens, prefix=prefix)
    start = len(prefix) if prefix is not None else 0

    def replace(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return embeds[:, start:].to(x.dtype)

    return last_logits(model, tokens, fwd_hooks=[("hook_embed", replace)], prefix=prefix)


def _embed(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_model]`` token embeddings as the model computes them (``hook_embed``)."""
    cache = activations(model, tokens, "hook_embed")
    return cache["hook_embed"].detach()


def score(
    model: Model, sequences: Sequence[torch.Tensor], targets: Sequence[Target], *, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target values and decisions for many token sequences of any lengths.

    Sequences of equal length share a forward pass (no padding, so the numbers are those of
    one-at-a-time runs), and the leading tokens all sequences share (a prompt template) are run once,
    their keys and values reused by every pass.

    Args:
        sequences: ``[pos_i]`` token tensors.
        targets: One :class:`Target` per sequence.

    Returns:
        ``([n] float64 values, [n] bool decisions)``.
    """
    batch_size = whole(batch_size, "batch_size", minimum=1)
    if len(sequences) != len(targets):
        raise ValueError(f"{len(sequences)} sequences but {len(targets)} targets")
    values = torch.empty(len(sequences), dtype=torch.float64)
    decided = torch.empty(len(sequences), dtype=torch.bool)
    if not sequences:
        return values, decided
    dev = model_device(model)
    with torch.no_grad():
        prefix = _shared_prefix(model, sequences)
        for idx in _groups([int(s.numel()) for s in sequences], batch_size):
            last = _last_logits(model, torch.stack([sequences[i] for i in idx]).to(dev), prefix=prefix).float()
            for row, i in enumerate(idx):
                values[i] = float(targets[i].value(last[row : row + 1])[0])
                decided[i] = bool(targets[i].decided(last[row : row + 1])[0])
    return values, decided


def decision_targets(
    model: Model, segs: Sequence[Segmented], answer: Union[str, int], other: Union[str, int], *, batch_size: int = 32
) -> list[Target]:
    """Logit-difference targets oriented to the model's own decision on each full input.

    For each input the answer the model prefers (``answer`` or ``other``) becomes the target's
    ``answer``, so a positive score always means "supports what the model decided".

    Returns:
        One :class:`Target` per input; ``t.answer`` is the model's choice.
    """
    segs, _ = _check_inputs(segs)
    a, b = answer_id(model, answer, "answer"), answer_id(model, other, "other")
    base = Target(a, b)
    values, _ = score(model, [s.tokens for s in segs], [base] * len(segs), batch_size=batch_size)
    return [Target(a, b) if v >= 0 else Target(b, a) for v in values.tolist()]


# --------------------------------------------------------------------------------------------------
# Attributions
# --------------------------------------------------------------------------------------------------


@dataclass
class Attribution:
    """Word scores for one input from one method.

    Attributes:
        method: Which method made them.
        words: The input's words.
        scores: ``[n_words]`` float64; higher means more support for the target's answer.
        token_scores: ``[pos]`` per-token scores where the method has them (else ``None``).
        target_value: The target on the full input, ``f(x)`` (``nan`` where not computed).
        info: Method-specific extras (integrated gradients: ``completeness_error`` etc.).
    """

    method: str
    words: tuple[str, ...]
    scores: torch.Tensor
    token_scores: Optional[torch.Tensor] = None
    target_value: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)

    def ranking(self, seed: int = 0) -> torch.Tensor:
        """``[n_words]`` word indices, most important first; ties are broken at random (seeded), so
        a method that cannot tell words apart ranks them like the random baseline."""
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(self.words), generator=g)
        order = torch.argsort(self.scores[perm], descending=True, stable=True)
        return perm[order]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` highest-scoring ``(word, score)`` pairs."""
        k = whole(k, "k", minimum=1)
        return [(self.words[i], float(self.scores[i])) for i in self.ranking()[:k].tolist()]


def occlusion(
    model: Model, segs: Sequence[Segmented], targets: Union[Target, Sequence[Target]], *, batch_size: int = 32
) -> list[Attribution]:
    """Leave-one-out: a word's score is ``f(x) - f(x without that word)`` (its tokens deleted).

    One forward pass per word (batched over words and inputs of equal length).
    """
    segs, targets = _check_inputs(segs, targets)
    seqs, tgts, owner = [], [], []
    for i, (s, t) in enumerate(zip(segs, targets)):
        seqs.append(s.tokens)
        tgts.append(t)
        owner.append((i, -1))
        for w in range(s.n_words):
            seqs.append(s.drop([w]))
            tgts.append(t)
            owner.append((i, w))
    values, _ = score(model, seqs, tgts, batch_size=batch_size)
    full = {i: float(v) for (i, w), v in zip(owner, values.tolist()) if w == -1}
    out = []
    for i, s in enumerate(segs):
        sc = torch.tensor(
            [full[i] - float(values[j]) for j, (o, w) in enumerate(owner) if o == i and w >= 0], dtype=torch.float64
        )
        out.append(Attribution("occlusion", s.words, sc, None, full[i]))
    return out


def _embedding_groups(model: Model, segs: list[Segmented], targets: list[Target], batch_size: int):
    """Yield ``(indices, tokens, embeds, forward)`` per group of equal-length inputs, where
    ``forward(embeds, tokens)`` returns the ``[batch]`` target values (Captum's forward function).
    The template tokens before the first attributed word of every input are run once (their
    embeddings never change along a path)."""
    dev = model_device(model)
    first_word = min(int((s.word_index >= 0).nonzero()[0, 0]) for s in segs)
    prefix = _shared_prefix(model, [s.tokens for s in segs], limit=first_word)
    for idx in _groups([int(s.tokens.numel()) for s in segs], batch_size):
        tokens = torch.stack([segs[i].tokens for i in idx]).to(dev)
        answers = torch.tensor([targets[i].answer for i in idx], device=dev)
        others = torch.tensor([targets[i].other if targets[i].other is not None else 0 for i in idx], device=dev)
        kinds = {targets[i].kind for i in idx}
        if len(kinds) != 1:
            raise ValueError("targets of one call must all have the same kind")
        kind = kinds.pop()

        def forward(
            embeds: torch.Tensor, toks: torch.Tensor, a: torch.Tensor, o: torch.Tensor, _kind: str = kind
        ) -> torch.Tensor:
            last = _last_logits(model, toks, embeds, prefix)
            rows = torch.arange(last.shape[0], device=last.device)
            if _kind == "logit_diff":
                return last[rows, a] - last[rows, o]
            if _kind == "logit":
                return last[rows, a]
            return last.log_softmax(-1)[rows, a].exp()

        yield idx, tokens, _embed(model, tokens), (answers, others), forward


def gradient_x_input(
    model: Model, segs: Sequence[Segmented], targets: Union[Target, Sequence[Target]], *, batch_size: int = 16
) -> list[Attribution]:
    """Gradient x input on the token embeddings (Captum's ``InputXGradient``), summed over
    ``d_model`` and over each word's tokens."""
    from captum.attr import InputXGradient

    segs, targets = _check_inputs(segs, targets)
    out: list[Optional[Attribution]] = [None] * len(segs)
    for idx, tokens, embeds, (a, o), forward in _embedding_groups(model, segs, targets, batch_size):
        with torch.enable_grad():
            attr = InputXGradient(forward).attribute(
                embeds.clone().requires_grad_(True), additional_forward_args=(tokens, a, o)
            )
        tok_scores = attr.detach().sum(-1).to(torch.float64).cpu()
        for row, i in enumerate(idx):
            ts = tok_scores[row].clone()
            ts[segs[i].word_index < 0] = 0.0
            out[i] = Attribution("gradient x input", segs[i].words, segs[i].to_words(ts), ts)
    return out  # type: ignore[return-value]


def integrated_gradients(
    model: Model,
    segs: Sequence[Segmented],
    targets: Union[Target, Sequence[Target]],
    *,
    steps: int = 32,
    method: str = "gausslegendre",
    baseline: str | int = "zero",
    rtol: Optional[float] = None,
    atol: float = 0.0,
    max_steps: int = 256,
    batch_size: int = 4,
    internal_batch_size: Optional[int] = None,
) -> list[Attribution]:
    """Integrated gradients (Sundararajan et al. 2017) on the token embeddings, through Captum.

    The path runs from a baseline where the embeddings of the attributed words are replaced (by zero,
    or by the embedding of one reference token) and the template's are unchanged, to the input;
    template tokens therefore get exactly zero.
    Completeness says the word scores sum to ``f(x) - f(baseline)``; the residual is reported, and
    with ``rtol`` each input is integrated with more points until it is small enough.

    How many points a path needs depends on the model: on SmolLM2 8 Gauss-Legendre points leave a
    residual of a few percent, while Gemma 3's target changes so sharply along the path that 32
    points can leave a residual larger than ``f(x) - f(baseline)`` itself and 128 bring it under 2%.
    A fixed ``steps`` is therefore only a starting point when ``rtol`` is given.

    Args:
        steps: Integration points (Captum's ``n_steps``); with ``rtol``, the first try.
        method: Captum's rule: ``"gausslegendre"`` (default), ``"riemann_trapezoid"``,
            ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``.
        baseline: ``"zero"`` (zero embeddings), or a token (id, or a one-token string such as ``" "``)
            whose embedding replaces every attributed token (a neutral token; with RMSNorm/LayerNorm
            models a zero baseline puts the whole change of ``f`` near the start of the path, and
            needs many more steps).
        rtol, atol: Completeness tolerance. An input is *converged* when its completeness error is at
            most ``atol + rtol * |f(x) - f(baseline)|``; an input that is not is integrated again with
            twice the points, up to ``max_steps``. ``rtol=None`` (default): one pass with ``steps``.
            Inputs still above the tolerance at ``max_steps`` are kept, flagged
            ``info["converged"] = False``, and a warning says how many.
        max_steps: The most points tried per input when ``rtol`` is given.
        batch_size: Inputs per group (each is run ``steps`` times).
        internal_batch_size: Rows per forward and backward pass inside Captum (default: all of a
            group's ``inputs x steps`` rows, at most 32).

    Returns:
        One :class:`Attribution` per input, with ``info``: ``baseline_value`` (``f(baseline)``),
        ``completeness_error`` (``|sum of scores - (f(x) - f(baseline))|``), ``relative_error``
        (that over ``|f(x) - f(baseline)|``), ``steps`` (the points used for this input),
        ``converged`` (``None`` without ``rtol``), ``method``, ``baseline``.
    """
    from captum.attr import IntegratedGradients

    steps = whole(steps, "steps", minimum=1)
    choice(method, "method", ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"))
    if rtol is not None:
        rtol = finite(rtol, "rtol", minimum=0.0)
        max_steps = whole(max_steps, "max_steps", minimum=steps)
    atol = finite(atol, "atol", minimum=0.0)
    if isinstance(baseline, str) and baseline != "zero":
        baseline = answer_id(model, baseline, "baseline")
    elif baseline != "zero":
        baseline = whole(baseline, "baseline", minimum=0, maximum=int(model.cfg.d_vocab) - 1)
    segs, targets = _check_inputs(segs, targets)
    out: list[Optional[Attribution]] = [None] * len(segs)
    for idx, tokens, embeds, (a, o), forward in _embedding_groups(model, segs, targets, batch_size):
        mask = torch.stack([segs[i].word_index >= 0 for i in idx]).to(embeds.device)
        if baseline == "zero":
            base = embeds * (~mask)[..., None]
        else:
            ref = _embed(model, torch.full_like(tokens[:1, :1], baseline))[0, 0]
            base = torch.where(mask[..., None], ref, embeds)
        with torch.no_grad():
            f_x = forward(embeds, tokens, a, o).double().cpu()
            f_b = forward(base, tokens, a, o).double().cpu()
        total = f_x - f_b
        rows, n = list(range(len(idx))), steps
        while rows:
            r = torch.tensor(rows, device=embeds.device)
            with torch.enable_grad():
                attr, delta = IntegratedGradients(forward).attribute(
                    embeds[r],
                    baselines=base[r],
                    additional_forward_args=(tokens[r], a[r], o[r]),
                    n_steps=n,
                    method=method,
                    internal_batch_size=internal_batch_size or min(len(rows) * n, 32),
                    return_convergence_delta=True,
                )
            tok_scores = attr.detach().sum(-1).to(torch.float64).cpu()
            retry = []
            for j, row in enumerate(rows):
                i, ts = idx[row], tok_scores[j]
                t = float(total[row])
                err = abs(float(ts.sum()) - t)
                converged = None if rtol is None else err <= atol + rtol * abs(t)
                if converged is False and 2 * n <= max_steps:
                    retry.append(row)
                    continue
                info = {
                    "baseline_value": float(f_b[row]),
                    "completeness_error": err,
                    "relative_error": err / abs(t) if t != 0 else float("inf"),
                    "captum_delta": float(delta[j]),
                    "steps": n,
                    "converged": converged,
                    "method": method,
                    "baseline": baseline,
                }
                out[i] = Attribution(
                    "integrated gradients", segs[i].words, segs[i].to_words(ts), ts, float(f_x[row]), info
                )
            rows, n = retry, 2 * n
    failed = sum(1 for x in out if x is not None and x.info["converged"] is False)
    if failed:
        warnings.warn(
            f"integrated_gradients: {failed} of {len(out)} inputs stay above the completeness tolerance "
            f"(atol={atol}, rtol={rtol}) at max_steps={max_steps}; they are kept with info['converged'] = False. "
            "Raise max_steps, or try another baseline.",
            stacklevel=2,
        )
    return out  # type: ignore[return-value]


def attention_scores(
    model: Model, segs: Sequence[Segmented], *, layers: Optional[Sequence[int]] = None, batch_size: int = 32
) -> list[Attribution]:
    """Attention paid by the last position to each token, averaged over heads and ``layers``
    (default all), summed over each word's tokens. Unsigned, and not a causal measure."""
    segs, _ = _check_inputs(segs)
    layers = layer_list(model, layers)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    dev = model_device(model)
    out: list[Optional[Attribution]] = [None] * len(segs)
    with torch.no_grad():
        for idx in _groups([int(s.tokens.numel()) for s in segs], batch_size):
            tokens = torch.stack([segs[i].tokens for i in idx]).to(dev)
            cache = activations(model, tokens, lambda n: n in names)
            att = torch.stack([cache[n][:, :, -1, :] for n in sorted(names)]).mean(dim=(0, 2))  # [batch, pos]
            for row, i in enumerate(idx):
                ts = att[row].to(torch.float64).cpu()
                out[i] = Attribution("attention", segs[i].words, segs[i].to_words(ts), ts, info={"layers": layers})
    return out  # type: ignore[return-value]


def random_attribution(segs: Sequence[Segmented], *, seed: int = 0) -> list[Attribution]:
    """The control: i.i.d. standard-normal word scores (a uniformly random ranking), seeded."""
    segs, _ = _check_inputs(segs)
    g = torch.Generator().manual_seed(whole(seed, "seed"))
    return [Attribution("random", s.words, torch.randn(s.n_words, generator=g, dtype=torch.float64)) for s in segs]


# --------------------------------------------------------------------------------------------------
# Faithfulness (ERASER) and agreement
# --------------------------------------------------------------------------------------------------


@dataclass
class Faithfulness:
    """ERASER faithfulness of one method's rankings on a set of inputs.

    Attributes:
        method: The method whose rankings were tested.
        ks: Fractions of words removed (comprehensiveness) or kept (sufficiency).
        n_top: ``[n, K]`` how many words each fraction meant (``ceil(k * n_words)``, at least 1).
        full: ``[n]`` ``f(x)`` on the full inputs.
        comprehensiveness: ``[n, K]`` ``f(x) - f(x without the top words)``; higher = more faithful.
        sufficiency: ``[n, K]`` ``f(x) - f(only the top words)``; lower = more faithful.
        flipped: ``[n, K]`` the decision changes once the top words are removed.
    """

    method: str
    ks: tuple[float, ...]
    n_top: torch.Tensor
    full: torch.Tensor
    comprehensiveness: torch.Tensor
    sufficiency: torch.Tensor
    flipped: torch.Tensor

    @property
    def aopc_comprehensiveness(self) -> torch.Tensor:
        """``[n]`` comprehensiveness averaged over ``ks`` (ERASER's AOPC)."""
        return self.comprehensiveness.mean(-1)

    @property
    def aopc_sufficiency(self) -> torch.Tensor:
        """``[n]`` sufficiency averaged over ``ks``."""
        return self.sufficiency.mean(-1)

    @property
    def flip_rate(self) -> torch.Tensor:
        """``[K]`` fraction of inputs whose decision flips when the top-k words are removed."""
        return self.flipped.double().mean(0)


def _ks(ks: Sequence[float]) -> tuple[float, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise TypeError("ks must be a non-empty list of fractions in (0, 1], e.g. (0.1, 0.2, 0.5)")
    out = tuple(float(k) for k in ks)
    if any(not (0 < k <= 1) for k in out):
        raise ValueError(f"ks must be fractions in (0, 1], got {out}")
    return out


def faithfulness(
    model: Model,
    segs: Sequence[Segmented],
    targets: Union[Target, Sequence[Target]],
    explanations: Sequence[Union[Attribution, torch.Tensor]],
    *,
    ks: Sequence[float] = ERASER_KS,
    seed: int = 0,
    batch_size: int = 32,
    method: Optional[str] = None,
) -> Faithfulness:
    """Comprehensiveness, sufficiency and decision flips of ``explanations`` (DeYoung et al. 2020).

    Args:
        explanations: One per input: an :class:`Attribution` (ranked by its scores, ties broken at
            random with ``seed``) or a ``[n_words]`` ranking (word indices, most important first).
        ks: Fractions of the words; each means ``ceil(k * n_words)`` words (at least one).
        method: Name to store (default: the attributions' method).
    """
    segs, targets = _check_inputs(segs, targets)
    ks = _ks(ks)
    if len(explanations) != len(segs):
        raise ValueError(f"explanations has {len(explanations)} entries for {len(segs)} inputs")
    orders = []
    for s, e in zip(segs, explanations):
        order = e.ranking(seed) if isinstance(e, Attribution) else torch.as_tensor(e, dtype=torch.long)
        if sorted(order.tolist()) != list(range(s.n_words)):
            raise ValueError("each ranking must be a permutation of the input's word indices")
        orders.append(order)
    n_top = torch.tensor([[max(1, min(s.n_words, math.ceil(k * s.n_words - 1e-9))) for k in ks] for s in segs])
    seqs, tgts = [], []
    for s, t, order, row in zip(segs, targets, orders, n_top.tolist()):
        seqs.append(s.tokens)
        tgts.append(t)
        for m in row:
            top = order[:m].tolist()
            seqs += [s.drop(top), s.keep(top)]
            tgts += [t, t]
    values, decided = score(model, seqs, tgts, batch_size=batch_size)
    stride = 1 + 2 * len(ks)
    values, decided = values.view(len(segs), stride), decided.view(len(segs), stride)
    full = values[:, 0]
    comp = full[:, None] - values[:, 1::2]
    suff = full[:, None] - values[:, 2::2]
    flipped = decided[:, :1] & ~decided[:, 1::2]
    name = method or (explanations[0].method if isinstance(explanations[0], Attribution) else "ranking")
    return Faithfulness(name, ks, n_top, full, comp, suff, flipped)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` ranks (1 = smallest) with ties given their average rank."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(v)
    r[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    out = r.clone()
    for u in torch.unique(v):
        tie = v == u
        if int(tie.sum()) > 1:
            out[tie] = r[tie].mean()
    return out


def _scores(e: Union[Attribution, torch.Tensor]) -> torch.Tensor:
    return e.scores if isinstance(e, Attribution) else torch.as_tensor(e, dtype=torch.float64)


def rank_correlation(a: Union[Attribution, torch.Tensor], b: Union[Attribution, torch.Tensor]) -> float:
    """Spearman's rank correlation of two word-score vectors (ties averaged); ``nan`` where either
    is constant (it ranks nothing) or there are fewer than two words."""
    x, y = ranks(_scores(a)), ranks(_scores(b))
    if x.shape != y.shape:
        raise ValueError(f"the two explanations score different numbers of words ({x.numel()} vs {y.numel()})")
    if x.numel() < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def top_k_overlap(
    a: Union[Attribution, torch.Tensor], b: Union[Attribution, torch.Tensor], k: int, *, seed: int = 0
) -> float:
    """Fraction of the ``k`` top-ranked words two explanations share (``k`` capped at the number of
    words; ties broken at random with ``seed``)."""
    k = whole(k, "k", minimum=1)
    sa, sb = _scores(a), _scores(b)
    if sa.shape != sb.shape:
        raise ValueError(f"the two explanations score different numbers of words ({sa.numel()} vs {sb.numel()})")
    ra = Attribution("a", tuple(str(i) for i in range(sa.numel())), sa).ranking(seed)
    rb = Attribution("b", tuple(str(i) for i in range(sb.numel())), sb).ranking(seed + 1)
    k = min(k, sa.numel())
    return len(set(ra[:k].tolist()) & set(rb[:k].tolist())) / k
