"""Answers to token ids: the one conversion every metric and attribution uses.

An answer is what a prompt should be continued with, one token: a string (``" Mary"``, which
must be ONE token for the model's tokenizer), a token id, or a sequence / 1-D tensor of them, one
per prompt. :func:`to_answer_ids` turns any of these into a ``[batch]`` tensor of ids, with
errors that name the argument and say how to fix it (a multi-token string lists its pieces and
suggests a leading space).

Example:
    >>> import torch
    >>> to_answer_ids(None, torch.tensor([3, 4]))
    tensor([3, 4])
    >>> to_answer_ids(None, 5, 3)
    tensor([5, 5, 5])
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Int

from mechlib.types import Model
from mechlib.validate import whole

__all__ = ["AnswerLike", "single_token_id", "to_answer_ids"]

#: Answers as strings (``" Mary"``), token ids, or a 1-D tensor of ids; one or one per prompt.
AnswerLike = Union[str, int, Sequence[Union[str, int]], torch.Tensor]


def single_token_id(model: Optional[Model], answer: str, name: str = "answers") -> int:
    """The one token id of the string ``answer`` (e.g. ``" Mary"``) for the model's tokenizer.

    Raises:
        ValueError: No model or no tokenizer, or the string is several tokens (the message lists
            them and suggests a leading space where there is none).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        why = "pass a model with a tokenizer" if model is None else "this model has no tokenizer"
        raise ValueError(f"{name}: cannot turn the string {answer!r} into a token: {why}, or pass token ids instead")
    ids = tok.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        hint = f" Did you mean {(' ' + answer)!r} (with a leading space)?" if not answer.startswith(" ") else ""
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens, {pieces}, but an answer must be one token.{hint}")
    return int(ids[0])


def _is_id(x: Any) -> bool:
    try:
        whole(x, "x")
        return True
    except TypeError:
        return False


def to_answer_ids(
    model: Optional[Model], answers: AnswerLike, n: Optional[int] = None, *, name: str = "answers"
) -> Int[torch.Tensor, " batch"]:
    """Token ids of the answers, one per prompt.

    Args:
        model: The model (its tokenizer turns strings into ids; its vocab bounds ids), or
            ``None`` when ``answers`` are ids already.
        answers: A string (``" Mary"``, which must be ONE token), an id, or a sequence/1-D tensor
            of them, one per prompt.
        n: The number of prompts; a single answer is repeated ``n`` times, a sequence must have
            exactly ``n`` entries. ``None`` keeps as many as given.
        name: The argument's name, for error messages.

    Raises:
        TypeError: Something that is neither one-token strings nor integer ids.
        ValueError: A multi-token string (the message lists its pieces and suggests a leading
            space), an id outside the vocabulary, an empty list, or a count that is not ``n``.
    """
    if n is not None:
        n = whole(n, "n", minimum=1)
    if not isinstance(answers, (torch.Tensor, str)) and hasattr(answers, "__array__"):  # numpy
        answers = torch.as_tensor(answers)
    if isinstance(answers, torch.Tensor):
        if answers.ndim > 1:
            raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(answers.shape)}")
        if answers.is_floating_point() or answers.is_complex() or answers.dtype == torch.bool:
            raise TypeError(f"{name} must be token ids (integers), got a {answers.dtype} tensor")
        ids = answers.flatten().long().cpu()
    elif isinstance(answers, str) or _is_id(answers):
        one = single_token_id(model, answers, name) if isinstance(answers, str) else whole(answers, name)
        ids = torch.tensor([one] * (n if n is not None else 1), dtype=torch.long)
    elif isinstance(answers, Sequence):
        ids = torch.tensor(
            [
                single_token_id(model, a, name) if isinstance(a, str) else whole(a, f"{name} (a token id)")
                for a in answers
            ],
            dtype=torch.long,
        )
    else:
        raise TypeError(f"{name} must be one-token strings or token ids, got {answers!r} ({type(answers).__name__})")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty; give one answer, or one per prompt")
    if n is not None and ids.numel() == 1 and n > 1:
        ids = ids.repeat(n)
    if n is not None and ids.numel() != n:
        raise ValueError(
            f"{name}: got {ids.numel()} answers for {n} prompts; give one answer, or exactly one per prompt"
        )
    if model is None:
        if int(ids.min()) < 0:
            raise ValueError(f"{name} must be token ids >= 0, got {ids.tolist()}")
        return ids
    d_vocab = int(model.cfg.d_vocab)
    if ids.min() < 0 or ids.max() >= d_vocab:
        raise ValueError(f"{name} ids must lie in [0, {d_vocab}), got min {int(ids.min())} max {int(ids.max())}")
    return ids
