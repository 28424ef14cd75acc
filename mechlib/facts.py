"""Factual-recall prompts and subject-token bookkeeping for causal tracing (ROME).

Meng et al. (2022, "Locating and Editing Factual Associations in GPT", arXiv 2202.05262) trace
where a model recalls a fact such as *(Eiffel Tower, located in city, Paris)* by corrupting the
subject's tokens and restoring single hidden states. This module supplies everything that trace
needs apart from the patching itself:

* a dataset of facts written for mechlib (``mechlib/data/facts.json``), loaded by
  :func:`load_facts` as :class:`Fact` objects;
* the token positions of the subject inside a prompt (:func:`subject_token_span`), found from the
  tokenizer's character offsets, so a subject whose first token has merged with the preceding
  space (``" Eiffel"``) is found correctly;
* the token *roles* that ROME's figures average over (:data:`TOKEN_ROLES`, :func:`token_roles`,
  :func:`role_positions`, :func:`average_by_role`);
* :func:`known_facts`, which keeps the facts whose top-1 prediction is the attribute, batched;
* :func:`noise_scale`, the standard deviation of the subject tokens' embeddings, which sets the
  size of the corrupting noise (ROME adds Gaussian noise of 3 x this value).

Example:
    >>> from mechlib.facts import load_facts, tokenize_fact, known_facts, noise_scale
    >>> facts = load_facts(["landmark_city"])
    >>> facts[0].prompt
    'The Eiffel Tower is a famous landmark in the city of'
    >>> import mechlib
    >>> model = mechlib.load_model("smollm2-135m")                  # doctest: +SKIP
    >>> tf = tokenize_fact(model, facts[0])                           # doctest: +SKIP
    >>> tf.str_tokens[tf.subject_start:tf.subject_end]                # doctest: +SKIP
    [' E', 'iffel', ' Tower']
    >>> tf.roles                                                      # doctest: +SKIP
    ['before subject', 'first subject token', 'middle subject tokens', 'last subject token',
     'first subsequent token', 'further tokens', ..., 'last token']
    >>> known = known_facts(model, facts)                             # doctest: +SKIP
    >>> noise_scale(model, [k.fact for k in known]).std               # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

__all__ = [
    "BEFORE_SUBJECT",
    "TOKEN_ROLES",
    "Fact",
    "FactScore",
    "KnownFact",
    "NoiseScale",
    "TokenizedFact",
    "attribute_token",
    "average_by_role",
    "block0_outputs",
    "embedding_std",
    "embedding_vectors",
    "known_facts",
    "list_relations",
    "load_facts",
    "noise_scale",
    "role_positions",
    "score_facts",
    "subject_token_span",
    "tokenize_fact",
    "token_roles",
]

#: The token roles of ROME's averaged causal-trace figures, in the order they are plotted
#: (top to bottom). See :func:`role_positions` for which positions each role covers.
TOKEN_ROLES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)

#: The role :func:`token_roles` gives to tokens before the subject. ROME's figures do not
#: average these, so it is not one of :data:`TOKEN_ROLES`.
BEFORE_SUBJECT = "before subject"

_DATA_FILE = "facts.json"


# ----------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One factual association, as a cloze prompt.

    Attributes:
        subject: The entity the fact is about, exactly as it appears in the prompt,
            e.g. ``"Eiffel Tower"``.
        relation: The relation's name, e.g. ``"landmark_city"`` (see :func:`list_relations`).
        template: The prompt with ``"{}"`` where the subject goes, ending right before the
            attribute, e.g. ``"The {} is located in the city of"``.
        attribute: The answer as the model would write it next, with its leading space,
            e.g. ``" Paris"``.

    Example:
        >>> f = Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Paris")
        >>> f.prompt
        'The Eiffel Tower is located in the city of'
        >>> f.subject_char_span
        (4, 16)
    """

    subject: str
    relation: str
    template: str
    attribute: str

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(
                f"a fact's template needs exactly one '{{}}' where the subject goes; "
                f"{self.template!r} has {self.template.count('{}')}"
            )
        if not self.subject or self.subject != self.subject.strip():
            raise ValueError(f"subject {self.subject!r} must be non-empty with no surrounding spaces")
        if not self.attribute.strip():
            raise ValueError(f"attribute {self.attribute!r} of {self.subject!r} is empty")

    @property
    def prompt(self) -> str:
        """The template with the subject filled in (no trailing space)."""
        return self.template.replace("{}", self.subject)

    @property
    def subject_char_span(self) -> tuple[int, int]:
        """``(start, end)`` character offsets of the subject in :attr:`prompt`."""
        start = self.template.index("{}")
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "relation": self.relation,
            "template": self.template,
            "attribute": self.attribute,
        }


def _read_raw(path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    if path is None:
        where = f"mechlib/data/{_DATA_FILE}"
        text = resources.files("mechlib").joinpath("data", _DATA_FILE).read_text(encoding="utf-8")
    else:
        where = str(path)
        text = Path(path).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    fields = {"subject", "relation", "template", "attribute"}
    shape = '{"relations": {name: description}, "facts": [{"subject", "relation", "template", "attribute"}, ...]}'
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("relations"), dict)
        or not isinstance(raw.get("facts"), list)
    ):
        got = type(raw).__name__ if not isinstance(raw, dict) else f"an object with keys {sorted(raw)}"
        raise ValueError(f"{where}: a facts file is {shape}; got {got}")
    for i, entry in enumerate(raw["facts"]):
        if not isinstance(entry, dict) or set(entry) != fields or not all(isinstance(v, str) for v in entry.values()):
            raise ValueError(
                f"{where}: facts[{i}] must be an object with the string fields {sorted(fields)}; got {entry!r}"
            )
    return raw


def list_relations(path: Optional[Union[str, Path]] = None) -> dict[str, str]:
    """The dataset's relations, each with a one-line description.

    Example:
        >>> "country_capital" in list_relations()
        True
    """
    return dict(_read_raw(path)["relations"])


def load_facts(
    relations: Optional[Union[str, Iterable[str]]] = None,
    *,
    path: Optional[Union[str, Path]] = None,
) -> list[Fact]:
    """Load mechlib's facts dataset (or another file in the same format).

    The file is JSON: ``{"relations": {name: description}, "facts": [{"subject", "relation",
    "template", "attribute"}, ...]}``. Facts come back in file order.

    Args:
        relations: Keep only these relations (a name or a list of names); ``None`` keeps all.
        path: A JSON file in the same format; defaults to the packaged
            ``mechlib/data/facts.json``.

    Returns:
        The facts, as :class:`Fact` objects.

    Raises:
        KeyError: A requested relation is not in the dataset (the message lists those that are).

    Example:
        >>> capitals = load_facts("country_capital")
        >>> capitals[0].prompt, capitals[0].attribute
        ('The capital of France is the city of', ' Paris')
    """
    raw = _read_raw(path)
    facts = [Fact(**entry) for entry in raw["facts"]]
    if relations is None:
        return facts
    wanted = [relations] if isinstance(relations, str) else list(relations)
    known = list(raw["relations"])
    missing = [r for r in wanted if r not in raw["relations"]]
    if missing:
        raise KeyError(f"unknown relation(s) {missing}; the dataset has: {', '.join(known)}")
    keep = set(wanted)
    return [f for f in facts if f.relation in keep]


# ----------------------------------------------------------------------------------------
# Subject tokens
# ----------------------------------------------------------------------------------------


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


def _no_tokenizer_error(model: Any) -> ValueError:
    return ValueError(
        f"{type(model).__name__} has no tokenizer (the tiny random models have none); subject "
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


def _tokenize(
    model_or_tokenizer: Any, prompt: str, prepend_bos: Optional[bool]
) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids of ``prompt`` as the model sees them, each token's character span, and the
    number of leading special tokens (the BOS, if any)."""
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
    _, offsets, shift = _tokenize(model_or_tokenizer, prompt, prepend_bos)
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


# ----------------------------------------------------------------------------------------
# Token roles
# ----------------------------------------------------------------------------------------


def _check_span(n_tokens: int, subject_start: int, subject_end: int) -> None:
    if not (0 <= subject_start < subject_end <= n_tokens):
        raise ValueError(
            f"subject span [{subject_start}, {subject_end}) does not fit a prompt of {n_tokens} tokens; "
            "need 0 <= start < end <= n_tokens"
        )


def role_positions(n_tokens: int, subject_start: int, subject_end: int) -> dict[str, list[int]]:
    """The positions each of ROME's token roles averages over (roles may share a position).

    With the subject at ``[s, e)`` in a prompt of ``n`` tokens:

    * ``first subject token``: ``[s]``
    * ``middle subject tokens``: ``s+1 .. e-2`` (empty for subjects of one or two tokens)
    * ``last subject token``: ``[e-1]``; for a one-token subject this is also the first subject
      token, as in ROME, where both rows read the same position
    * ``first subsequent token``: ``[e]`` (empty when the prompt ends with the subject)
    * ``further tokens``: ``e+1 .. n-2``
    * ``last token``: ``[n-1]``; it may coincide with the first subsequent token (subject
      just before the last token) or with the last subject token (prompt ends with the subject)

    Tokens before the subject belong to no role (ROME's figures leave them out).

    Example:
        >>> role_positions(8, 1, 4)["middle subject tokens"]
        [2]
        >>> role_positions(8, 1, 4)["further tokens"]
        [5, 6]
    """
    _check_span(n_tokens, subject_start, subject_end)
    s, e, n = subject_start, subject_end, n_tokens
    return {
        "first subject token": [s],
        "middle subject tokens": list(range(s + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e < n else [],
        "further tokens": list(range(e + 1, n - 1)),
        "last token": [n - 1],
    }


def token_roles(n_tokens: int, subject_start: int, subject_end: int) -> list[str]:
    """One role name per position, for labelling plots.

    Where :func:`role_positions` lets roles share a position, this gives each position one name,
    by precedence: ``last token`` > ``last subject token`` > ``first subject token`` >
    ``first subsequent token`` > ``middle subject tokens`` / ``further tokens``. So a one-token
    subject is the ``last subject token``; the prompt's final position is always the
    ``last token`` (even when it is the first token after the subject or, if the prompt ends
    with the subject, the last subject token). Positions before the subject are
    :data:`BEFORE_SUBJECT`.

    Example:
        >>> token_roles(6, 1, 3)
        ['before subject', 'first subject token', 'last subject token', 'first subsequent token', 'further tokens', 'last token']
    """
    _check_span(n_tokens, subject_start, subject_end)
    roles = [BEFORE_SUBJECT] * subject_start
    for p in range(subject_start, n_tokens):
        if p == n_tokens - 1:
            roles.append("last token")
        elif p == subject_end - 1:
            roles.append("last subject token")
        elif p == subject_start:
            roles.append("first subject token")
        elif p < subject_end:
            roles.append("middle subject tokens")
        elif p == subject_end:
            roles.append("first subsequent token")
        else:
            roles.append("further tokens")
    return roles


def average_by_role(
    values: Float[torch.Tensor, "... pos"],
    subject_start: int,
    subject_end: int,
) -> Float[torch.Tensor, "... 6"]:
    """Average a per-position quantity over each of :data:`TOKEN_ROLES`.

    The last axis of ``values`` is the position axis of one prompt (e.g. a causal trace
    ``[layer, pos]``). Returns the mean over :func:`role_positions` for each role, in
    :data:`TOKEN_ROLES` order; a role with no positions in this prompt is ``nan`` (average over
    prompts with ``torch.nanmean``).

    Example:
        >>> average_by_role(torch.tensor([0., 1., 2., 3., 4., 5.]), 1, 4)
        tensor([1., 2., 3., 4., nan, 5.])
    """
    values = torch.as_tensor(values)
    n = values.shape[-1]
    positions = role_positions(n, subject_start, subject_end)
    out = []
    for role in TOKEN_ROLES:
        pos = positions[role]
        if pos:
            out.append(values[..., pos].float().mean(dim=-1))
        else:
            out.append(torch.full(values.shape[:-1], math.nan, device=values.device))
    return torch.stack(out, dim=-1)


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


def tokenize_fact(model: Any, fact: Fact, *, prepend_bos: Optional[bool] = None) -> TokenizedFact:
    """Tokenize ``fact.prompt`` for ``model`` and locate its subject and attribute tokens.

    Raises:
        ValueError: The attribute is not a single token for this tokenizer.

    Example:
        >>> tf = tokenize_fact(model, load_facts("landmark_city")[0])   # doctest: +SKIP
        >>> tf.subject_start, tf.subject_end, model.to_string([tf.attribute_token])  # doctest: +SKIP
        (1, 4, ' Paris')
    """
    ids, _, _ = _tokenize(model, fact.prompt, prepend_bos)
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


# ----------------------------------------------------------------------------------------
# Which facts the model knows
# ----------------------------------------------------------------------------------------


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
    model: Any,
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
        ids, _, _ = _tokenize(model, fact.prompt, None)
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
            tokens = torch.stack([item[0] for _, item in batch]).to(model.cfg.device)
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
    model: Any,
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


# ----------------------------------------------------------------------------------------
# Noise scale
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseScale:
    """The spread of token embeddings that sets causal tracing's noise level.

    Attributes:
        std: Standard deviation of all coordinates of the embedding vectors measured.
        n_tokens: How many token occurrences were pooled.
        n_vectors_unique: How many distinct tokens those were.
        measured_on: What the vectors were, in words.
    """

    std: float
    n_tokens: int
    n_vectors_unique: int
    measured_on: str

    def noise(self, multiplier: float = 3.0) -> float:
        """The noise standard deviation to use: ``multiplier x std`` (ROME uses 3)."""
        return multiplier * self.std


def embedding_vectors(
    model: Any, token_ids: Union[Sequence[int], Int[torch.Tensor, " n"]]
) -> Float[torch.Tensor, "n d_model"]:
    """The token embeddings ``hook_embed`` sees for ``token_ids``: rows of ``W_E``, times the
    embedding scale where the model has one (Gemma multiplies by ``sqrt(d_model)``), before any
    positional embedding."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("no token ids given to measure the embedding spread on")
    d_vocab = model.W_E.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= d_vocab:
        raise ValueError(f"token ids must lie in [0, {d_vocab}); got min {int(ids.min())}, max {int(ids.max())}")
    with torch.no_grad():
        vectors = model.W_E.detach()[ids.to(model.W_E.device)].float()
        scale = getattr(getattr(getattr(model, "embed", None), "original_component", None), "embed_scale", None)
        if scale is not None:
            vectors = vectors * torch.as_tensor(scale, dtype=vectors.dtype, device=vectors.device)
    return vectors


def embedding_std(model: Any, token_ids: Union[Sequence[int], Int[torch.Tensor, " n"]]) -> float:
    """Standard deviation over all coordinates of the token embeddings of ``token_ids``.

    Duplicates count as often as they occur (ROME pools every subject-token occurrence). These
    are the vectors the ``hook_embed`` hook sees, where causal tracing adds its noise: rows of
    ``W_E``, scaled as the model scales them (:func:`embedding_vectors`).

    Example:
        >>> embedding_std(tiny_model, [1, 2, 3])   # doctest: +SKIP
    """
    return float(embedding_vectors(model, token_ids).std())


def block0_outputs(
    model: Any, token_lists: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, batch_size: int = 64
) -> Float[torch.Tensor, "n d_model"]:
    """The residual stream after block 0 (``blocks.0.hook_resid_post``) at chosen positions.

    Prompt ``i`` is ``token_lists[i]``; its rows ``spans[i][0] .. spans[i][1] - 1`` are returned,
    all prompts' rows stacked in order. Prompts are batched, right-padded (attention is causal,
    so padding after a position cannot change it), and run through block 0 only. This is the
    "extended embedding" (token embedding + block 0's attention and MLP) that causal tracing
    corrupts with ``corrupt="block0"``.

    Example:
        >>> block0_outputs(tiny_model, [[1, 2, 3]], [(1, 3)]).shape      # doctest: +SKIP
        torch.Size([2, 64])
    """
    if len(token_lists) != len(spans):
        raise ValueError(f"token_lists has {len(token_lists)} prompts but spans has {len(spans)} spans")
    if not token_lists:
        raise ValueError("no prompts given to measure block-0 outputs on")
    name = "blocks.0.hook_resid_post"
    out = []
    for a in range(0, len(token_lists), batch_size):
        chunk = [list(map(int, t)) for t in token_lists[a : a + batch_size]]
        width = max(len(t) for t in chunk)
        batch = torch.tensor([t + [t[-1]] * (width - len(t)) for t in chunk], dtype=torch.long)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.to(model.cfg.device), names_filter=[name], stop_at_layer=1)
        acts = cache[name].detach().float().cpu()
        for i, (s0, s1) in enumerate(spans[a : a + batch_size]):
            if not 0 <= s0 < s1 <= len(chunk[i]):
                raise ValueError(f"span {(s0, s1)} does not fit prompt {a + i} of {len(chunk[i])} tokens")
            out.append(acts[i, s0:s1])
    return torch.cat(out)


def noise_scale(model: Any, facts: Sequence[Fact], *, at: str = "embed") -> NoiseScale:
    """ROME's noise reference: the std of the embeddings of every subject token of ``facts``.

    Each fact's subject tokens are taken as they occur in its prompt (so with the leading space
    the prompt gives them), every occurrence counted. ROME measured the same statistic over the
    subjects of its known facts; causal tracing then adds noise of ``3 x std``.

    Args:
        model: A TransformerBridge with a tokenizer.
        facts: The reference facts (ROME: the known facts).
        at: Which vectors: ``"embed"``, the token embeddings (ROME); ``"block0"``, the residual
            stream after block 0 at the subject tokens (:func:`block0_outputs`), the vectors
            causal tracing corrupts with ``corrupt="block0"``.

    Returns:
        A :class:`NoiseScale` with the value and what it was measured on.

    Example:
        >>> scale = noise_scale(model, [k.fact for k in known])   # doctest: +SKIP
        >>> scale.noise()                                          # 3 x scale.std  # doctest: +SKIP
    """
    if at not in ("embed", "block0"):
        raise ValueError(f"at must be 'embed' (token embeddings) or 'block0' (the residual after block 0), got {at!r}")
    if isinstance(facts, (str, Fact)) or not facts:
        raise ValueError("noise_scale needs at least one fact (a non-empty list) to measure subject embeddings on")
    ids: list[int] = []
    prompts: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for fact in facts:
        toks, _, _ = _tokenize(model, fact.prompt, None)
        start, end = subject_token_span(model, fact.prompt, fact.subject, char_start=fact.subject_char_span[0])
        ids += toks[start:end]
        prompts.append(toks)
        spans.append((start, end))
    n_subjects = len({f.subject for f in facts})
    where = f"all {len(ids)} subject-token occurrences in {len(facts)} fact prompts ({n_subjects} distinct subjects)"
    if at == "embed":
        std, what = embedding_std(model, ids), "token embeddings (hook_embed)"
    else:
        std, what = float(block0_outputs(model, prompts, spans).std()), "block-0 outputs (blocks.0.hook_resid_post)"
    return NoiseScale(std=std, n_tokens=len(ids), n_vectors_unique=len(set(ids)), measured_on=f"{what} of {where}")
