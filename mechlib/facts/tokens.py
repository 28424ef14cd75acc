"""A fact's prompt as a model tokenizes it: subject positions and the attribute token.

* :func:`prompt_tokens`: token ids and character spans of a prompt, as ``model.to_tokens`` gives them;
* :func:`subject_token_span`: the subject's token positions, found from character offsets, so a
  subject whose first token merged with the preceding space (``" Eiffel"``) is found correctly;
* :func:`attribute_token`: the single token of the answer;
* :func:`tokenize_fact` / :class:`TokenizedFact`: all of it for one fact and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Int

from mechlib.facts.dataset import Fact
from mechlib.facts.roles import role_positions, token_roles
from mechlib.types import Model

__all__ = ["TokenizedFact", "attribute_token", "prompt_tokens", "subject_token_span", "tokenize_fact"]


def _tokenizer_and_bos(model_or_tokenizer: Any, prepend_bos: Optional[bool]) -> tuple[Any, bool, Any]:
    """(tokenizer, prepend_bos, model or None) from a TransformerBridge or a HF tokenizer.

    For a model without a tokenizer (the tiny random models) the tokenizer is ``None``."""
    if hasattr(model_or_tokenizer, "cfg"):  # a model: TransformerBridge / HookedTransformer
        model = model_or_tokenizer
        if prepend_bos is None:
            prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
        return getattr(model, "tokenizer", None), prepend_bos, model
    if not callable(model_or_tokenizer) or not hasattr(model_or_tokenizer, "decode"):
        raise ValueError(
            f"expected a TransformerBridge with a tokenizer or a Hugging Face tokenizer, got "
            f"{type(model_or_tokenizer).__name__}"
        )
    return model_or_tokenizer, bool(prepend_bos), None


def _no_tokenizer_error(model_or_tokenizer: Any) -> ValueError:
    return ValueError(
        f"{type(model_or_tokenizer).__name__} has no tokenizer (the tiny random models have none); subject "
        "positions need one. Use a real model such as load_model('smollm2-135m'), or pass a "
        "Hugging Face tokenizer."
    )


def _char_offsets(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of every token of ``text``: from the fast tokenizer's offsets when it
    has them, else by decoding ever longer prefixes (slow tokenizers)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(map(int, o)) for o in enc["offset_mapping"]]
        if list(enc["input_ids"]) == ids:
            return offsets  # type: ignore[return-value]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass
    spans, prev = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1]))
        spans.append((prev, end))
        prev = end
    if prev != len(text):
        raise ValueError(
            f"cannot map tokens back to characters for {text!r}: decoding the tokens gives "
            f"{tokenizer.decode(ids)!r}. Use a fast tokenizer (one with offset mappings)."
        )
    return spans


def prompt_tokens(
    model_or_tokenizer: Any, prompt: str, prepend_bos: Optional[bool]
) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids of ``prompt`` as the model sees them (checked against ``model.to_tokens``), each
    token's ``(start, end)`` character span, and the number of leading special tokens (the BOS, if any).

    Args:
        model_or_tokenizer: A TransformerBridge or a Hugging Face tokenizer.
        prompt: The prompt.
        prepend_bos: Override the model's BOS setting (``None``: the model's default).
    """
    tokenizer, bos, model = _tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    if tokenizer is None:
        raise _no_tokenizer_error(model_or_tokenizer)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    offsets = _char_offsets(tokenizer, prompt, ids)
    shift = 0
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [int(tokenizer.bos_token_id)] + ids
        offsets = [(0, 0)] + offsets
        shift = 1
    if model is not None:
        expect = model.to_tokens(prompt, prepend_bos=bos)[0].tolist()
        if expect != ids:
            raise RuntimeError(
                f"mechlib.facts tokenized {prompt!r} as {ids} but model.to_tokens gives {expect}; "
                "subject positions would be wrong. Please report this."
            )
    return ids, offsets, shift


def subject_token_span(
    model_or_tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    char_start: Optional[int] = None,
    prepend_bos: Optional[bool] = None,
) -> tuple[int, int]:
    """Token positions ``[start, end)`` of ``subject`` inside ``prompt``.

    A token belongs to the subject when its characters overlap the subject's characters. Byte-
    level BPE tokens carry their leading space (``" Eiffel"``), so the subject's first token
    usually starts one character before the subject; the overlap rule handles this, and also a
    token merged across the subject's end. Positions index ``model.to_tokens(prompt)``, so a
    BOS token (when the model prepends one) shifts them by one.

    Args:
        model_or_tokenizer: A TransformerBridge (its tokenizer and ``default_prepend_bos`` are
            used) or a Hugging Face tokenizer (no BOS unless ``prepend_bos=True``).
        prompt: The full prompt.
        subject: The subject string; it must occur in ``prompt`` verbatim.
        char_start: Character offset of the subject in ``prompt`` when it occurs more than once
            (default: its first occurrence).
        prepend_bos: Override the model's BOS setting.

    Returns:
        ``(start, end)`` token positions, ``end`` exclusive, ``end - start >= 1``.

    Raises:
        ValueError: The subject is not in the prompt (or not at ``char_start``), or the model
            has no tokenizer.

    Example:
        >>> start, end = subject_token_span(model, "The Eiffel Tower is in", "Eiffel Tower")  # doctest: +SKIP
        >>> model.to_str_tokens("The Eiffel Tower is in")[start:end]                          # doctest: +SKIP
        [' E', 'iffel', ' Tower']
    """
    if not subject:
        raise ValueError("the subject is empty")
    if char_start is None:
        char_start = prompt.find(subject)
        if char_start < 0:
            raise ValueError(
                f"subject {subject!r} does not occur in prompt {prompt!r}; the subject must appear "
                "in the prompt verbatim (same case and spelling)"
            )
    elif prompt[char_start : char_start + len(subject)] != subject:
        raise ValueError(
            f"subject {subject!r} is not at character {char_start} of prompt {prompt!r} "
            f"(found {prompt[char_start : char_start + len(subject)]!r} there)"
        )
    char_end = char_start + len(subject)
    _, offsets, shift = prompt_tokens(model_or_tokenizer, prompt, prepend_bos)
    inside = [i for i, (s, e) in enumerate(offsets) if i >= shift and e > s and s < char_end and e > char_start]
    if not inside:  # cannot happen for a non-empty subject, but never return a wrong span
        raise ValueError(f"no token of {prompt!r} overlaps subject {subject!r}")
    return inside[0], inside[-1] + 1


def attribute_token(model_or_tokenizer: Any, attribute: str) -> int:
    """The single token id of ``attribute`` (e.g. ``" Paris"``).

    Raises:
        ValueError: The attribute is more than one token (the message shows the pieces), or the
            model has no tokenizer.

    Example:
        >>> model.to_string([attribute_token(model, " Paris")])   # doctest: +SKIP
        ' Paris'
    """
    tokenizer, _, _ = _tokenizer_and_bos(model_or_tokenizer, False)
    if tokenizer is None:
        raise _no_tokenizer_error(model_or_tokenizer)
    ids = list(tokenizer(attribute, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"attribute {attribute!r} is {len(ids)} tokens, {pieces}, but causal tracing measures "
            "the probability of a single next token. Use a one-token attribute (often the first "
            "word, with its leading space) or drop the fact."
        )
    return int(ids[0])


@dataclass
class TokenizedFact:
    """A fact tokenized for one model: what causal tracing needs to corrupt and to score.

    Attributes:
        fact: The fact.
        tokens: The prompt's token ids, shape ``[pos]`` (as ``model.to_tokens(prompt)[0]``).
        str_tokens: The tokens as strings.
        subject_start: First subject position.
        subject_end: One past the last subject position.
        attribute_token: The attribute's token id.
    """

    fact: Fact
    tokens: Int[torch.Tensor, " pos"]
    str_tokens: list[str]
    subject_start: int
    subject_end: int
    attribute_token: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def subject_positions(self) -> list[int]:
        return list(range(self.subject_start, self.subject_end))

    @property
    def roles(self) -> list[str]:
        """One role per position (:func:`token_roles`)."""
        return token_roles(self.n_tokens, self.subject_start, self.subject_end)

    @property
    def role_positions(self) -> dict[str, list[int]]:
        """Positions per role, possibly shared (:func:`role_positions`)."""
        return role_positions(self.n_tokens, self.subject_start, self.subject_end)


def tokenize_fact(model: Model, fact: Fact, *, prepend_bos: Optional[bool] = None) -> TokenizedFact:
    """Tokenize ``fact.prompt`` for ``model`` and locate its subject and attribute tokens.

    Raises:
        ValueError: The attribute is not a single token for this tokenizer.

    Example:
        >>> tf = tokenize_fact(model, load_facts("landmark_city")[0])   # doctest: +SKIP
        >>> tf.subject_start, tf.subject_end, model.to_string([tf.attribute_token])  # doctest: +SKIP
        (1, 4, ' Paris')
    """
    ids, _, _ = prompt_tokens(model, fact.prompt, prepend_bos)
    start, end = subject_token_span(
        model, fact.prompt, fact.subject, char_start=fact.subject_char_span[0], prepend_bos=prepend_bos
    )
    tokenizer = getattr(model, "tokenizer", model)
    return TokenizedFact(
        fact=fact,
        tokens=torch.tensor(ids, dtype=torch.long),
        str_tokens=[tokenizer.decode([i]) for i in ids],
        subject_start=start,
        subject_end=end,
        attribute_token=attribute_token(model, fact.attribute),
    )
