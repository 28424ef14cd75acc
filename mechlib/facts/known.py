"""Which facts a model knows: ROME's filter (the top-1 next token after the prompt is the attribute).

:func:`score_facts` scores every fact's prompt in batches of equal token length (no padding);
:func:`known_facts` keeps those predicted top-1.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mechlib.facts.dataset import Fact
from mechlib.facts.tokens import attribute_token, prompt_tokens
from mechlib.models import model_device
from mechlib.types import Model

__all__ = ["FactScore", "KnownFact", "known_facts", "score_facts"]


@dataclass(frozen=True)
class FactScore:
    """The model's next-token prediction on one fact's prompt.

    Attributes:
        fact: The fact.
        probability: Probability of the attribute token after the prompt.
        rank: The attribute's rank among all tokens (0 = top-1).
        top_token: The model's top-1 next token, as a string.
    """

    fact: Fact
    probability: float
    rank: int
    top_token: str

    @property
    def known(self) -> bool:
        """True when the attribute is the model's top-1 prediction."""
        return self.rank == 0


@dataclass(frozen=True)
class KnownFact:
    """A fact the model knows, with the clean probability of its attribute.

    Attributes:
        fact: The fact.
        probability: The attribute's probability on the clean prompt.
    """

    fact: Fact
    probability: float


def score_facts(
    model: Model,
    facts: Sequence[Fact],
    *,
    batch_size: int = 64,
    progress: bool = True,
    on_multi_token: str = "skip",
) -> list[FactScore]:
    """Run every fact's prompt and score the attribute as the next token.

    Prompts are grouped by token length and run in batches of equal length, so no padding is
    ever needed (and position-dependent models see exactly the unbatched input).

    Args:
        model: A TransformerBridge with a tokenizer.
        facts: The facts.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm bar.
        on_multi_token: ``"skip"`` leaves out facts whose attribute is several tokens for this
            tokenizer (with a warning that counts them), ``"raise"`` raises the ValueError.

    Returns:
        One :class:`FactScore` per scored fact, in the order of ``facts``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if on_multi_token not in ("skip", "raise"):
        raise ValueError(f"on_multi_token must be 'skip' or 'raise', got {on_multi_token!r}")
    tokenized: list[tuple[int, tuple[torch.Tensor, int]]] = []  # (index in facts, (ids, attribute id))
    skipped = []
    for i, fact in enumerate(facts):
        try:
            attr = attribute_token(model, fact.attribute)
        except ValueError:
            if on_multi_token == "raise":
                raise
            skipped.append(fact)
            continue
        ids, _, _ = prompt_tokens(model, fact.prompt, None)
        tokenized.append((i, (torch.tensor(ids, dtype=torch.long), attr)))
    if skipped:
        warnings.warn(
            f"score_facts skipped {len(skipped)} fact(s) whose attribute is more than one token for "
            f"this tokenizer, e.g. {skipped[0].attribute!r} ({skipped[0].subject})",
            stacklevel=2,
        )
    by_len: dict[int, list[tuple[int, tuple[torch.Tensor, int]]]] = defaultdict(list)
    for i, item in tokenized:
        by_len[item[0].shape[0]].append((i, item))
    batches = []
    for length in sorted(by_len):
        group = by_len[length]
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]

    results: dict[int, FactScore] = {}
    tokenizer = model.tokenizer
    with torch.no_grad():
        for batch in tqdm(batches, desc="scoring facts", disable=not progress, leave=False):
            tokens = torch.stack([item[0] for _, item in batch]).to(model_device(model))
            attrs = torch.tensor([item[1] for _, item in batch], device=tokens.device)
            logits = model(tokens)[:, -1, :].float()
            probs = logits.softmax(dim=-1)
            p_attr = probs.gather(1, attrs[:, None])[:, 0]
            ranks = (logits > logits.gather(1, attrs[:, None])).sum(dim=-1)
            top = logits.argmax(dim=-1)
            for row, (i, _) in enumerate(batch):
                results[i] = FactScore(
                    fact=facts[i],
                    probability=float(p_attr[row]),
                    rank=int(ranks[row]),
                    top_token=tokenizer.decode([int(top[row])]),
                )
    return [results[i] for i in sorted(results)]


def known_facts(
    model: Model,
    facts: Sequence[Fact],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> list[KnownFact]:
    """The facts the model knows: its top-1 next token after the prompt is the attribute.

    This is ROME's filter for causal tracing. Facts whose attribute is more than one token for
    the model's tokenizer cannot be known in this sense and are skipped with a warning.

    Args:
        model: A TransformerBridge with a tokenizer.
        facts: Candidate facts, e.g. ``load_facts()``.
        batch_size: Prompts per forward pass (prompts are grouped by token length: no padding).
        progress: Show a tqdm bar.

    Returns:
        :class:`KnownFact` objects (fact and clean attribute probability), in input order.

    Example:
        >>> known = known_facts(model, load_facts("country_capital"))   # doctest: +SKIP
        >>> known[0].fact.attribute, round(known[0].probability, 2)      # doctest: +SKIP
    """
    scores = score_facts(model, facts, batch_size=batch_size, progress=progress)
    return [KnownFact(s.fact, s.probability) for s in scores if s.known]
