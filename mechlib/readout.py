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
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float, Int

from mechlib.types import Model

__all__ = ["keeps_last_logits", "last_logits"]


def keeps_last_logits(model: Model) -> bool:
    """``True`` if the model's Hugging Face forward takes ``logits_to_keep`` (unembeds only the last
    positions); ``False`` for models that compute every position's logits regardless."""
    hf = getattr(model, "original_model", None)
    forward = getattr(hf, "forward", None)
    if forward is None:
        return False
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def last_logits(
    model: Model, tokens: Int[torch.Tensor, "batch pos"], fwd_hooks: Optional[Sequence[tuple[str, Any]]] = None
) -> Float[torch.Tensor, "batch vocab"]:
    """``[batch, vocab]`` logits at the last position of ``tokens``, with ``fwd_hooks`` (TransformerLens
    ``(hook_name, fn)`` pairs) applied; equal to ``model.run_with_hooks(tokens, fwd_hooks)[:, -1]``."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    kwargs = {"logits_to_keep": 1} if keeps_last_logits(model) else {}
    if fwd_hooks:
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
    else:
        logits = model(tokens, **kwargs)
    return logits[:, -1]
