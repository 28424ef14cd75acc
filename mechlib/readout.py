"""The next-token logits at the last position, without unembedding every other position.

Most metrics read one position (the last). A plain ``model(tokens)[:, -1]`` unembeds every position
first, which on a large vocabulary is most of the forward pass: Gemma 3's 262,144-token unembedding
costs more FLOPs per position than its 18 blocks together. :func:`last_logits` asks the Hugging Face
model for the last position's logits only (its ``logits_to_keep=1``) where the model takes that
argument, and slices the full logits where it does not; both give the same numbers (tested bitwise
on SmolLM2, Gemma 3 and a GPT-2-shaped model). Gradients flow through it as through ``model(tokens)``.

Example:
    >>> from mechlib.models import load_model                                # doctest: +SKIP
    >>> model = load_model("gemma3-270m")                                    # doctest: +SKIP
    >>> tokens = model.to_tokens("The Eiffel Tower is in the city of")       # doctest: +SKIP
    >>> last_logits(model, tokens).shape                                     # doctest: +SKIP
    torch.Size([1, 262144])

Inputs that all begin with the same tokens (a chat template, a question) need that beginning's keys
and values once: :func:`prefix_cache` computes them for one row, and ``last_logits(..., prefix=)``
runs only the rest of every row on top of them, through the model's own key-value cache. The
numbers equal a full forward, gradients included (tested on a small Gemma 3 whose sliding window is
shorter than the prefix; attribution's scores with and without the prefix are compared on SmolLM2
and Gemma 3 by ``benchmarks/attribution.py``); hooks then see the positions after the prefix only.

    >>> rows = model.to_tokens(["Review: great. Sentiment:", "Review: awful. Sentiment:"])  # doctest: +SKIP
    >>> pre = prefix_cache(model, rows[0, :shared_prefix_length(rows)])      # doctest: +SKIP
    >>> last_logits(model, rows, prefix=pre)                                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float, Int

from mechlib.types import Model

__all__ = ["Prefix", "activations", "keeps_last_logits", "last_logits", "prefix_cache", "shared_prefix_length"]


def _hf_takes(model: Model, argument: str) -> bool:
    """Whether the Hugging Face model under ``model`` takes ``argument`` in its forward."""
    forward = getattr(getattr(model, "original_model", None), "forward", None)
    if forward is None:
        return False
    try:
        return argument in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def keeps_last_logits(model: Model) -> bool:
    """``True`` if the model's Hugging Face forward takes ``logits_to_keep`` (unembeds only the last
    positions); ``False`` for models that compute every position's logits regardless."""
    return _hf_takes(model, "logits_to_keep")


def activations(model: Model, tokens: Int[torch.Tensor, "batch pos"], names_filter: Any, **kwargs: Any) -> Any:
    """``model.run_with_cache(tokens, names_filter=...)``'s cache alone, for callers that discard the
    logits: where the model takes ``logits_to_keep``, only the last position is unembedded (on
    Gemma 3, a collection forward then takes about half the time). ``kwargs`` go to
    ``run_with_cache``."""
    if keeps_last_logits(model):
        kwargs.setdefault("logits_to_keep", 1)
    _, cache = model.run_with_cache(tokens, names_filter=names_filter, **kwargs)
    return cache


@dataclass(frozen=True)
class Prefix:
    """The keys and values of ``tokens`` (one row), to be shared by every row that begins with them.

    Built by :func:`prefix_cache`; ``last_logits(model, rows, prefix=...)`` copies the cache for
    each call (the model appends to it), so one ``Prefix`` serves any number of calls."""

    tokens: torch.Tensor  # [n] token ids
    cache: Any = field(repr=False)

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def for_batch(self, batch: int) -> Any:
        """A fresh copy of the cache with ``batch`` rows."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


def shared_prefix_length(rows: Sequence[torch.Tensor] | torch.Tensor) -> int:
    """How many leading tokens every row shares, leaving at least one token of the shortest row
    after it (the position that is read)."""
    rows = list(rows)
    if not rows:
        return 0
    n = min(int(r.numel()) for r in rows) - 1
    first = rows[0].reshape(-1)
    for r in rows[1:]:
        r = r.reshape(-1)
        differ = (r[:n] != first[:n]).nonzero()
        if len(differ):
            n = int(differ[0, 0])
    return max(n, 0)


def prefix_cache(model: Model, tokens: Int[torch.Tensor, " pos"]) -> Optional[Prefix]:
    """The keys and values of the ``[pos]`` token ids ``tokens``, computed once (no hooks, no
    gradient), for :func:`last_logits` calls on rows that begin with them; ``None`` where the model
    cannot take a key-value cache (no Hugging Face model under it) or ``tokens`` is empty, and the
    callers then run every row in full."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be [pos] (one row), got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0 or not _hf_takes(model, "past_key_values"):
        return None
    hf = model.original_model
    device = next(hf.parameters()).device
    with torch.no_grad():
        out = hf(input_ids=tokens[None].to(device), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return Prefix(tokens.detach().clone(), cache)


def last_logits(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    fwd_hooks: Optional[Sequence[tuple[str, Any]]] = None,
    *,
    prefix: Optional[Prefix] = None,
) -> Float[torch.Tensor, "batch vocab"]:
    """``[batch, vocab]`` logits at the last position of ``tokens``, with ``fwd_hooks`` (TransformerLens
    ``(hook_name, fn)`` pairs) applied; equal to ``model.run_with_hooks(tokens, fwd_hooks)[:, -1]``.

    With ``prefix`` (:func:`prefix_cache` of the rows' shared beginning), only the positions after it
    are run, on its cached keys and values, and the hooks see those positions only."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if keeps_last_logits(model) else {}
    if prefix is not None:
        n = len(prefix)
        if tokens.shape[1] <= n or not torch.equal(
            tokens[:, :n].cpu(), prefix.tokens.cpu()[None].expand(len(tokens), -1)
        ):
            raise ValueError(
                f"prefix: every row of tokens must begin with the prefix's {n} tokens and go on after them; "
                "build the prefix from rows[0, :shared_prefix_length(rows)]"
            )
        kwargs["past_key_values"] = prefix.for_batch(len(tokens))
        tokens = tokens[:, n:]
    if fwd_hooks:
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
    else:
        logits = model(tokens, **kwargs)
    return logits[:, -1]
