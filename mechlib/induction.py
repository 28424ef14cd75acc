"""Induction heads: repeated-token batches, per-head attention scores, loss on repeats.

Olsson et al. 2022 ("In-context Learning and Induction Heads") find heads that attend from the
second occurrence of a token ``A`` to the token right after its first occurrence and copy it,
built from a previous-token head in an earlier layer (K-composition). This module measures that
on any model:

* :func:`repeated_tokens`: ``[batch, (bos) + 2*seg_len]`` random tokens whose second half repeats
  the first, drawn from the model's vocabulary minus its special tokens.
* :func:`head_scores`: induction, previous-token and duplicate-token scores of every head from ONE
  cached forward pass, as :class:`~mechlib.results.PromptGrid` objects with dims ``("layer",
  "head")`` that keep each sequence's scores and give intervals over sequences.
  The target positions are found from the tokens themselves, so any sequence works, not only
  exact repeats.
* :func:`repeat_loss`: per-position loss on the two repeats and the in-context-learning score.

Score definitions (``reduce="matched"``, the default): for every query position ``q`` that has at
least one target key, the attention mass the head puts on its target keys, averaged over those
queries, per sequence; the grid is the mean over sequences and keeps the per-sequence scores
(``per_prompt``) for error bars (``ci()``, ``stderr()``, ``estimate()``). Targets of query ``q`` (token ``t[q]``):

* previous-token: key ``q - 1``;
* duplicate-token: every earlier key ``k < q`` with ``t[k] == t[q]``;
* induction: every key ``k + 1 <= q`` where ``k < q`` and ``t[k] == t[q]`` (the token after an
  earlier occurrence).

``reduce="all"`` divides the same attention mass by the attention of *every* query instead,
which is exactly what ``transformer_lens.head_detector.detect_head(..., error_measure="mul")``
computes (its scores are diluted by queries that have no target; e.g. on a pure repeat at most
about one half for an induction head).

Example:
    >>> from mechlib.models import load_model
    >>> model = load_model("tiny-attn-2l")
    >>> tokens = repeated_tokens(model, batch=2, seg_len=10, seed=0)
    >>> tokens.shape
    torch.Size([2, 20])
    >>> scores = head_scores(model, tokens)
    >>> scores["induction"].dims
    ('layer', 'head')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int

from mechlib.metrics import Metric
from mechlib.readout import activations
from mechlib.results import PromptGrid
from mechlib.stats import Estimate, mean_ci
from mechlib.validate import str_list, token_tensor, whole

__all__ = [
    "HEAD_KINDS",
    "RepeatLoss",
    "RepeatPair",
    "check_context",
    "duplicate_token_targets",
    "head_scores",
    "in_context_learning_score",
    "induction_scores",
    "induction_targets",
    "previous_token_targets",
    "repeat_loss",
    "repeat_pair",
    "repeated_tokens",
    "token_loss",
]

HEAD_KINDS = ("induction", "previous_token", "duplicate_token")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def _tokenizer(model: Any) -> Any:
    try:
        return getattr(model, "tokenizer", None)
    except Exception:  # some bridges raise when no tokenizer is attached
        return None


def _bos_id(model: Any) -> Optional[int]:
    tok = _tokenizer(model)
    if tok is not None and getattr(tok, "bos_token_id", None) is not None:
        return int(tok.bos_token_id)
    return None


def repeated_tokens(
    model: Any,
    batch: int = 8,
    seg_len: int = 50,
    *,
    seed: int = 0,
    bos: Optional[bool] = None,
    device: Optional[torch.device | str] = None,
) -> Int[torch.Tensor, "batch pos"]:
    """Random tokens repeated once: ``[batch, (bos) + 2 * seg_len]``.

    Tokens are drawn uniformly from the model's vocabulary (``model.cfg.d_vocab``), skipping the
    tokenizer's ``all_special_ids`` when the model has a tokenizer (tokenizer-less models draw
    from every id).

    Args:
        model: A TransformerBridge (anything with ``cfg.d_vocab``).
        batch: Number of sequences.
        seg_len: Length of the random segment; the sequence holds it twice.
        seed: Seed of a private generator (the global torch RNG is untouched).
        bos: Prepend the tokenizer's BOS token. ``None``: follow ``model.cfg.default_prepend_bos``
            when the model has a tokenizer with a BOS token, else no BOS.
        device: Where the tokens go (default: the model's ``cfg.device``, else CPU).

    Returns:
        Long tensor ``[batch, (1 if bos) + 2 * seg_len]``; ``tokens[:, off + seg_len + i] ==
        tokens[:, off + i]`` with ``off`` 1 if a BOS was prepended, else 0.

    Raises:
        ValueError: ``batch`` or ``seg_len`` below 1, BOS requested but the model has none, the
            sequence longer than the model's context, or no non-special token to draw.

    Example:
        >>> from mechlib.models import load_model
        >>> repeated_tokens(load_model("tiny-attn-2l"), batch=1, seg_len=3, seed=1).shape
        torch.Size([1, 6])
    """
    batch = whole(batch, "batch", minimum=1)
    seg_len = whole(seg_len, "seg_len", minimum=1)
    seed = whole(seed, "seed")
    if bos is not None and not isinstance(bos, bool):
        raise TypeError(f"bos must be True, False or None, got {bos!r}")
    bos_id = _bos_id(model)
    if bos is None:
        bos = bool(getattr(model.cfg, "default_prepend_bos", False)) and bos_id is not None
    if bos and bos_id is None:
        raise ValueError("bos=True but the model has no tokenizer with a bos_token_id; pass bos=False")
    d_vocab = int(model.cfg.d_vocab)
    allowed = torch.ones(d_vocab, dtype=torch.bool)
    tok = _tokenizer(model)
    if tok is not None:
        special = [i for i in getattr(tok, "all_special_ids", []) or [] if 0 <= i < d_vocab]
        allowed[special] = False
    ids = allowed.nonzero().flatten()
    if ids.numel() == 0:
        raise ValueError("the vocabulary holds no non-special token to draw")
    n = (1 if bos else 0) + 2 * seg_len
    check_context(model, n)
    gen = torch.Generator().manual_seed(int(seed))
    seg = ids[torch.randint(0, ids.numel(), (batch, seg_len), generator=gen)]
    parts = [seg, seg]
    if bos:
        parts.insert(0, torch.full((batch, 1), bos_id, dtype=torch.long))
    out = torch.cat(parts, dim=1)
    dev = device if device is not None else getattr(model.cfg, "device", None)
    return out.to(dev) if dev is not None else out


@dataclass
class RepeatPair:
    """Repeated random tokens and a corrupted copy for patching or attribution.

    ``corrupted`` has a *different* first segment, so its second repeat cannot be copied by
    induction; ``clean`` is :func:`repeated_tokens`. ``metric`` is the mean log-probability of the
    correct next token over the second repeat, per sequence (a :class:`~mechlib.metrics.Metric`).
    """

    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    seg_len: int
    offset: int
    metric: Metric

    @property
    def second(self) -> Int[torch.Tensor, " n"]:
        """Positions whose next token is in the second repeat (the ones the metric reads)."""
        return torch.arange(self.offset + self.seg_len, self.clean.shape[1] - 1)


def repeat_pair(model: Any, batch: int = 8, seg_len: int = 50, *, seed: int = 0) -> RepeatPair:
    """:func:`repeated_tokens` (seed ``seed``) and a corrupted copy whose first segment comes from
    seed ``seed + 1``, with the second-repeat log-probability metric.

    Example:
        >>> from mechlib.models import load_model
        >>> pair = repeat_pair(load_model("tiny-attn-2l"), batch=2, seg_len=4)
        >>> pair.clean.shape == pair.corrupted.shape, pair.second.tolist()
        (True, [4, 5, 6])
    """
    clean = repeated_tokens(model, batch, seg_len, seed=seed)
    offset = clean.shape[1] - 2 * seg_len
    corrupted = clean.clone()
    other = repeated_tokens(model, batch, seg_len, seed=seed + 1)
    corrupted[:, offset : offset + seg_len] = other[:, offset : offset + seg_len]
    second = torch.arange(offset + seg_len, clean.shape[1] - 1)
    targets = clean[:, second + 1]

    def second_repeat_logprob(logits: torch.Tensor) -> torch.Tensor:
        lp = logits[:, second].float().log_softmax(-1)
        return lp.gather(-1, targets[..., None].to(lp.device))[..., 0].mean(-1)

    return RepeatPair(clean, corrupted, seg_len, offset, Metric(second_repeat_logprob, "second-repeat log-prob"))


def check_context(model: Any, seq_len: int) -> None:
    """Raise a clear ``ValueError`` if ``seq_len`` tokens do not fit the model's context."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and seq_len > int(n_ctx):
        raise ValueError(
            f"sequence of {seq_len} tokens is longer than the model's context (n_ctx={n_ctx}); "
            "use a shorter seg_len or fewer tokens"
        )


def _as_tokens(model: Any, tokens: torch.Tensor) -> Int[torch.Tensor, "batch pos"]:
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    tokens = token_tensor(tokens, model)
    if tokens.shape[1] < 2:
        raise ValueError("tokens need at least 2 positions")
    return tokens.to(getattr(model.cfg, "device", None) or tokens.device)


# ----------------------------------------------------------------------------------------
# Target positions, from the tokens
# ----------------------------------------------------------------------------------------


def previous_token_targets(tokens: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch q k"]:
    """``[b, q, k]`` True where ``k == q - 1``."""
    b, n = tokens.shape
    eye = torch.zeros(n, n, dtype=torch.bool, device=tokens.device)
    eye[1:, :-1] = torch.eye(n - 1, dtype=torch.bool, device=tokens.device)
    return eye.expand(b, n, n)


def duplicate_token_targets(tokens: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch q k"]:
    """``[b, q, k]`` True where ``k < q`` and ``tokens[k] == tokens[q]``."""
    same = tokens[:, :, None] == tokens[:, None, :]
    return same & torch.ones_like(same[0]).tril(-1)


def induction_targets(tokens: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch q k"]:
    """``[b, q, k]`` True where key ``k`` follows an earlier occurrence of query ``q``'s token.

    That is, ``k >= 1``, ``k <= q`` and ``tokens[k - 1] == tokens[q]`` with ``k - 1 < q``.
    """
    dup = duplicate_token_targets(tokens)
    out = torch.zeros_like(dup)
    out[:, :, 1:] = dup[:, :, :-1]
    return out & torch.ones_like(out[0]).tril()


_TARGETS = {
    "induction": induction_targets,
    "previous_token": previous_token_targets,
    "duplicate_token": duplicate_token_targets,
}


# ----------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------


def head_scores(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    kinds: Sequence[str] = HEAD_KINDS,
    *,
    reduce: str = "matched",
) -> dict[str, PromptGrid]:
    """Score every head of every layer as an induction / previous-token / duplicate-token head.

    One forward pass (``run_with_cache`` keeping only the attention patterns). Hooks already on
    the model (e.g. inside :func:`mechlib.ablation.ablate_heads`) stay active, so scores can be
    measured under an ablation.

    Args:
        model: A TransformerBridge.
        tokens: ``[batch, pos]`` token ids (any sequence: targets come from the tokens).
        kinds: Which scores, from ``"induction"``, ``"previous_token"``, ``"duplicate_token"``.
        reduce: ``"matched"`` (mean over queries that have a target; see the module docstring) or
            ``"all"`` (TransformerLens ``detect_head``'s ``"mul"`` score, averaged over the batch).

    Returns:
        ``{kind: PromptGrid}`` with dims ``("layer", "head")``, values in [0, 1]: the mean over
        sequences of each sequence's score, which ``per_prompt`` ``[sequence, layer, head]`` keeps
        (``stderr()``, ``ci()`` and ``estimate(layer=, head=)`` give error bars over sequences).
        A sequence with no target for a kind (e.g. duplicates in a sequence without repeats) is
        NaN there and left out of the mean; a kind with no target in any sequence is all NaN.

    Raises:
        ValueError: Unknown kind or reduce, tokens not ``[batch, pos]`` ids, or longer than
            ``n_ctx``.

    Example:
        >>> from mechlib.models import load_model
        >>> m = load_model("tiny-attn-2l")
        >>> g = head_scores(m, repeated_tokens(m, 2, 8), kinds=["previous_token"])["previous_token"]
        >>> tuple(g.shape)
        (2, 4)
    """
    kinds = [kinds] if isinstance(kinds, str) else str_list(kinds, "kinds")
    bad = [k for k in kinds if k not in _TARGETS]
    if bad or not kinds:
        raise ValueError(f"unknown head kind(s) {bad}; choose from {HEAD_KINDS}")
    if reduce not in ("matched", "all"):
        raise ValueError(f"reduce must be 'matched' or 'all', got {reduce!r}")
    tokens = _as_tokens(model, tokens)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    with torch.no_grad():
        cache = activations(model, tokens, lambda name: name.endswith("attn.hook_pattern"))
    targets = {k: _TARGETS[k](tokens).float() for k in kinds}
    out: dict[str, PromptGrid] = {}
    for kind in kinds:
        mask = targets[kind]  # [b, q, k]
        eligible = mask.amax(-1)  # [b, q]
        n = eligible.sum(-1)  # [b]: queries with a target, per sequence
        per = torch.full((tokens.shape[0], n_layers, n_heads), float("nan"))
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [b, h, q, k]
            mass = torch.einsum("bhqk,bqk->bhq", pattern, mask)
            if reduce == "matched":  # NaN for a sequence with no target (left out of the mean)
                score = (mass * eligible[:, None]).sum(2) / n[:, None]
                per[:, layer] = torch.where(n[:, None] > 0, score, float("nan")).cpu()
            else:
                per[:, layer] = (mass.sum(-1) / pattern.sum((-1, -2))).cpu()
        out[kind] = PromptGrid.from_prompts(
            per,
            ("layer", "head"),
            title=f"{kind.replace('_', '-')} score",
            metric="attention to target" if reduce == "matched" else "detect_head 'mul' score",
            meta={"kind": kind, "reduce": reduce, "n_sequences": tokens.shape[0], "seq_len": tokens.shape[1]},
        )
    return out


def induction_scores(model: Any, tokens: Int[torch.Tensor, "batch pos"], **kw: Any) -> PromptGrid:
    """Just the induction scores of :func:`head_scores`."""
    return head_scores(model, tokens, ["induction"], **kw)["induction"]


# ----------------------------------------------------------------------------------------
# Loss on repeats
# ----------------------------------------------------------------------------------------


def token_loss(model: Any, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position: ``out[b, t - 1]`` is the loss on ``tokens[b, t]``.

    Runs under the hooks already on the model, so it works inside an ablation context.
    """
    tokens = _as_tokens(model, tokens)
    with torch.no_grad():
        logits = model(tokens)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


def in_context_learning_score(loss: Float[torch.Tensor, "... pos"], early: int, late: int) -> float:
    """Olsson et al.'s in-context-learning score: loss at a late token minus loss at an early one.

    Args:
        loss: Per-position loss (last axis = target token index minus one, as :func:`token_loss`
            returns); leading axes are averaged.
        early: Target token index of the early position (Olsson et al.: 50).
        late: Target token index of the late position (Olsson et al.: 500).

    Returns:
        ``mean(loss[..., late - 1]) - mean(loss[..., early - 1])``; negative when later tokens
        are predicted better (the paper reports about -0.4 nats after the phase change).
    """
    n = loss.shape[-1]
    early, late = whole(early, "early"), whole(late, "late")
    for name, t in (("early", early), ("late", late)):
        if not 1 <= t <= n:
            raise ValueError(f"{name}={t} is not a target position; choose 1..{n}")
    return float(loss[..., late - 1].mean() - loss[..., early - 1].mean())


@dataclass
class RepeatLoss:
    """Per-position loss on a batch of repeated random tokens.

    Positions: with ``off`` = 1 if a BOS leads else 0, the first repeat is tokens
    ``off .. off+L-1`` and the second ``off+L .. off+2L-1``. The first token of each repeat is
    left out of its mean (nothing before it can predict it), so ``first`` averages the losses on
    tokens ``off+1 .. off+L-1`` and ``second`` on tokens ``off+L+1 .. off+2L-1``.

    The in-context-learning score (:attr:`icl_score`) follows Olsson et al. (loss at token 500
    minus loss at token 50 of natural text) on these sequences: loss at the middle token of the
    second repeat (``off + L + L//2``) minus loss at the middle token of the first repeat
    (``off + L//2``); averaged over the batch.

    Attributes:
        per_position: ``[batch, pos - 1]`` loss on token ``t`` at index ``t - 1``.
        seg_len: ``L``.
        offset: ``off``.
        vocab: Number of tokens drawn from (for the chance line ``ln(vocab)``).
    """

    per_position: torch.Tensor
    seg_len: int
    offset: int
    vocab: Optional[int] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> float:
        """Mean loss on the first repeat (tokens ``off+1 .. off+L-1``)."""
        o, L = self.offset, self.seg_len
        return float(self.per_position[:, o : o + L - 1].mean())

    @property
    def second(self) -> float:
        """Mean loss on the second repeat (tokens ``off+L+1 .. off+2L-1``)."""
        o, L = self.offset, self.seg_len
        return float(self.per_position[:, o + L : o + 2 * L - 1].mean())

    def first_per_sequence(self) -> torch.Tensor:
        """Mean loss on the first repeat, per sequence ``[batch]`` (their mean is :attr:`first`)."""
        o, L = self.offset, self.seg_len
        return self.per_position[:, o : o + L - 1].mean(-1)

    def second_per_sequence(self) -> torch.Tensor:
        """Mean loss on the second repeat, per sequence ``[batch]`` (their mean is :attr:`second`)."""
        o, L = self.offset, self.seg_len
        return self.per_position[:, o + L : o + 2 * L - 1].mean(-1)

    def first_ci(self, confidence: float = 0.95) -> Estimate:
        """:attr:`first` with its bootstrap interval over sequences (:func:`mechlib.stats.mean_ci`)."""
        return mean_ci(self.first_per_sequence(), confidence=confidence, name="first-repeat loss per sequence")

    def second_ci(self, confidence: float = 0.95) -> Estimate:
        """:attr:`second` with its bootstrap interval over sequences (:func:`mechlib.stats.mean_ci`)."""
        return mean_ci(self.second_per_sequence(), confidence=confidence, name="second-repeat loss per sequence")

    @property
    def icl_score(self) -> float:
        """Loss at the middle of the second repeat minus at the middle of the first (nats)."""
        o, L = self.offset, self.seg_len
        return in_context_learning_score(self.per_position, early=o + L // 2, late=o + L + L // 2)

    @property
    def chance(self) -> Optional[float]:
        """``ln(vocab)``: the loss of a uniform guess."""
        import math

        return math.log(self.vocab) if self.vocab else None

    def mean_curve(self) -> torch.Tensor:
        """Loss per target token index, averaged over the batch (index 0 is token 1)."""
        return self.per_position.mean(0)

    def plot(self, ax: Any = None, *, label: Optional[str] = None):
        """Per-position loss with the repeat boundary and chance line (pass ``ax`` to overlay). Returns the figure."""
        import matplotlib.pyplot as plt

        fresh = ax is None
        if fresh:
            _, ax = plt.subplots(figsize=(7, 3.2))
        curve = self.mean_curve().numpy()
        ax.plot(range(1, len(curve) + 1), curve, label=label or "loss")
        if fresh:  # draw the guides once, not again for every curve overlaid on the same axes
            ax.axvline(self.offset + self.seg_len - 0.5, color="gray", ls=":", label="second repeat starts")
            if self.chance:
                ax.axhline(self.chance, color="k", ls="--", lw=0.8, label=f"chance ln({self.vocab})")
        ax.set_xlabel("token position")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"first repeat {self.first:.2f}, second {self.second:.2f}")
        ax.legend(fontsize=7)
        return ax.figure

    def __repr__(self) -> str:
        return f"RepeatLoss(first={self.first:.3f}, second={self.second:.3f}, icl={self.icl_score:.3f}, seg_len={self.seg_len})"


def repeat_loss(model: Any, tokens: Int[torch.Tensor, "batch pos"], seg_len: Optional[int] = None) -> RepeatLoss:
    """Loss on both repeats of :func:`repeated_tokens` output (under any hooks on the model).

    Args:
        model: A TransformerBridge.
        tokens: ``[batch, (bos) + 2 * seg_len]``.
        seg_len: Segment length; default ``pos // 2`` (a leading BOS is then inferred from an odd
            length).

    Raises:
        ValueError: The length is neither ``2 * seg_len`` nor ``2 * seg_len + 1``, or the second
            half does not repeat the first.
    """
    tokens = _as_tokens(model, tokens)
    n = tokens.shape[1]
    L = n // 2 if seg_len is None else whole(seg_len, "seg_len", minimum=1)
    off = n - 2 * L
    if off not in (0, 1) or L < 2:
        raise ValueError(f"{n} tokens do not hold two repeats of seg_len={L} (plus at most one BOS)")
    if not torch.equal(tokens[:, off : off + L], tokens[:, off + L :]):
        raise ValueError("the second half of the tokens does not repeat the first; build them with repeated_tokens()")
    loss = token_loss(model, tokens).cpu()
    tok = _tokenizer(model)
    vocab = int(model.cfg.d_vocab) - (len(set(getattr(tok, "all_special_ids", []) or [])) if tok is not None else 0)
    return RepeatLoss(loss, L, off, vocab)
