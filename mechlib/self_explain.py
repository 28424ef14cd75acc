"""Self-explanations: ask an instruct model to classify a review and say which words mattered.

Huang et al. 2023 ("Can Large Language Models Explain Themselves? A Study of LLM-Generated
Self-Explanations", arXiv 2310.11207) prompt a chat model for a sentiment label, a confidence and the
most important words with importance scores, either *predict-then-explain* (P-E) or
*explain-then-predict* (E-P), and compare the listed words with classical attributions
(:mod:`mechlib.attribution`) on faithfulness and agreement. This module holds that protocol:

* :func:`reviews` / :func:`balanced`: the sentiment sentences written for mechlib
  (``mechlib/data/sentiment_reviews.json``: 240 reviews, 120 per label, a ``dev`` and a held-out
  ``test`` split that keeps contrast pairs together).
* :func:`chat_prompt`: the ``"plain"``, ``"P-E"`` and ``"E-P"`` prompts through the tokenizer's
  chat template; :func:`classification_input`: the plain question with the assistant's answer
  started (``"Sentiment:"``), as an :class:`mechlib.attribution.Segmented` whose next token the
  attribution methods explain (`` positive`` vs `` negative``).
* :func:`generate`: greedy, seeded, batched (left padding) generation with the underlying Hugging
  Face model.
* :func:`parse`: a tolerant parser of the answers; what it cannot read is reported
  (:attr:`SelfExplanation.problems`), never dropped. :func:`summarize` counts them.
* :func:`as_attribution`: the listed words as word scores (ranks), for
  :func:`mechlib.attribution.faithfulness` and the agreement measures.

Example:
    >>> from mechlib import self_explain as se
    >>> e = se.parse("Sentiment: positive\\nConfidence: 0.9\\nWords: great (0.8), food (0.3)")
    >>> e.label, e.confidence, e.words
    ('positive', 0.9, (('great', 0.8), ('food', 0.3)))
    >>> se.parse("I cannot tell.").problems
    ('no label', 'no confidence', 'no words')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import torch

from mechlib import attribution as attr
from mechlib.types import Model
from mechlib.validate import choice, str_list, whole

__all__ = [
    "ANSWERS",
    "LABELS",
    "SCHEMES",
    "Review",
    "SelfExplanation",
    "as_attribution",
    "balanced",
    "chat_prompt",
    "classification_input",
    "explain",
    "generate",
    "has_chat_template",
    "match_words",
    "parse",
    "predicted_labels",
    "reviews",
    "summarize",
]

LABELS = ("positive", "negative")
#: The two answer tokens the attributions explain (after ``"Sentiment:"``).
ANSWERS = (" positive", " negative")
SCHEMES = ("plain", "P-E", "E-P")
DATA_FILE = "sentiment_reviews.json"
SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Review:
    """One labelled review sentence."""

    id: str
    text: str
    label: str
    split: str
    pair: int

    @property
    def words(self) -> list[str]:
        """The sentence split on whitespace (the unit every explanation scores)."""
        return self.text.split()


def reviews(split: str | None = None) -> list[Review]:
    """The review sentences written for mechlib, in file order.

    Args:
        split: ``"dev"`` (80), ``"test"`` (160, held out for the notebook's claims) or ``None`` (all 240).
    """
    if split is not None:
        choice(split, "split", ("dev", "test"))
    doc = json.loads(resources.files("mechlib").joinpath("data", DATA_FILE).read_text())
    items = [Review(**{k: d[k] for k in ("id", "text", "label", "split", "pair")}) for d in doc["items"]]
    return [r for r in items if split is None or r.split == split]


def balanced(items: Sequence[Review], n: int, *, seed: int = 0) -> list[Review]:
    """``n`` reviews, half of each label, drawn with a seeded shuffle (``n`` must be even)."""
    n = whole(n, "n", minimum=2)
    if n % 2:
        raise ValueError(f"n must be even (half per label), got {n}")
    g = torch.Generator().manual_seed(whole(seed, "seed"))
    out: list[Review] = []
    for label in LABELS:
        pool = [r for r in items if r.label == label]
        if len(pool) < n // 2:
            raise ValueError(f"only {len(pool)} {label} reviews, {n // 2} asked for")
        out += [pool[i] for i in torch.randperm(len(pool), generator=g)[: n // 2].tolist()]
    order = torch.randperm(n, generator=g).tolist()
    return [out[i] for i in order]


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

_QUESTION = "Is the sentiment of this review positive or negative?"
_FORMAT_LABEL = "Sentiment: <positive or negative>\nConfidence: <a number between 0 and 1>"
_FORMAT_WORDS = "Words: <word> (<importance>), <word> (<importance>), ..."
_USER = {
    # No trailing instruction: with "Answer with one word: positive or negative." appended, SmolLM2's
    # two-answer decision on the dev split is " positive" for nearly every review.
    "plain": "{question}\nReview: {review}",
    "P-E": (
        "{question}\nReview: {review}\nFirst give the sentiment and your confidence, then list the {k} words of "
        "the review that mattered most for your answer, each with an importance between 0 and 1. "
        "Answer in this format:\n" + _FORMAT_LABEL + "\n" + _FORMAT_WORDS
    ),
    "E-P": (
        "{question}\nReview: {review}\nFirst list the {k} words of the review that matter most for its "
        "sentiment, each with an importance between 0 and 1, then give the sentiment and your confidence. "
        "Answer in this format:\n" + _FORMAT_WORDS + "\n" + _FORMAT_LABEL
    ),
}


def has_chat_template(model: Model) -> bool:
    """Whether ``model``'s tokenizer has a chat template (an instruct model: the self-explanation
    prompts need one; a base model such as ``gemma3-270m`` has none)."""
    tok = getattr(model, "tokenizer", None)
    return tok is not None and bool(getattr(tok, "chat_template", None))


def _tokenizer(model: Model) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        raise TypeError("model needs a tokenizer with a chat template (an instruct model such as smollm2-135m)")
    return tok


def chat_prompt(model: Model, review: str, scheme: str = "plain", *, k: int = 3) -> str:
    """The full chat-formatted prompt (system, user turn, assistant header) for one review.

    Args:
        scheme: ``"plain"`` (label only), ``"P-E"`` (predict, then explain) or ``"E-P"``.
        k: How many important words to ask for.
    """
    choice(scheme, "scheme", SCHEMES)
    if not isinstance(review, str) or not review.strip():
        raise TypeError("review must be a non-empty string")
    k = whole(k, "k", minimum=1)
    user = _USER[scheme].format(question=_QUESTION, review=review, k=k)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return _tokenizer(model).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def classification_input(model: Model, review: str | Review) -> attr.Segmented:
    """The plain prompt with the assistant's reply begun as ``"Sentiment:"``: the next token is the
    decision (`` positive`` vs `` negative``) that :mod:`mechlib.attribution` explains. The review's
    words are the attributed segment; the chat template around them is kept fixed.

    A base model (no chat template, :func:`has_chat_template` is false) gets the same question as
    plain text to complete, ``"<question>\\nReview: <review>\\nSentiment:"`` (after its BOS token
    where the model expects one): the decision and its attributions need no chat template, only the
    self-explanations (:func:`chat_prompt`) do."""
    text = review.text if isinstance(review, Review) else review
    if not has_chat_template(model):
        if getattr(model, "tokenizer", None) is None:
            raise TypeError("model has no tokenizer: build the input from token ids with attribution.from_tokens")
        tok = model.tokenizer
        bos = tok.bos_token if getattr(model.cfg, "default_prepend_bos", False) and tok.bos_token else ""
        return attr.segment(model, text.split(), prefix=f"{bos}{_QUESTION}\nReview: ", suffix="\nSentiment:")
    marker = "\x00REVIEW\x00"
    full = chat_prompt(model, marker, "plain")
    prefix, suffix = full.split(marker)
    return attr.segment(model, text.split(), prefix=prefix, suffix=suffix + "Sentiment:")


def predicted_labels(model: Model, targets: Sequence[attr.Target]) -> list[str]:
    """The label each decision target stands for (its ``answer`` is one of :data:`ANSWERS`)."""
    ids = {attr.answer_id(model, a): label for a, label in zip(ANSWERS, LABELS)}
    unknown = [t.answer for t in targets if t.answer not in ids]
    if unknown:
        raise ValueError(
            f"targets answer token {unknown[0]}, not one of {ANSWERS}; build them with "
            "attribution.decision_targets(model, segs, *self_explain.ANSWERS)"
        )
    return [ids[t.answer] for t in targets]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate(
    model: Model, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0
) -> list[str]:
    """Greedy continuations of ``prompts`` (chat-formatted strings), batched with left padding.

    Runs the bridge's underlying Hugging Face model (``model.original_model.generate``), whose
    logits equal the bridge's; decoding stops at the end-of-turn token or ``max_new_tokens``.

    Returns:
        The generated text of each prompt (special tokens removed).
    """
    prompts = str_list(prompts, "prompts")
    max_new_tokens = whole(max_new_tokens, "max_new_tokens", minimum=1)
    batch_size = whole(batch_size, "batch_size", minimum=1)
    tok = _tokenizer(model)
    hf = getattr(model, "original_model", model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = next(hf.parameters()).device
    torch.manual_seed(whole(seed, "seed"))
    out: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = hf.generate(
                    input_ids=enc["input_ids"].to(dev),
                    attention_mask=enc["attention_mask"].to(dev),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=tok.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return out


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfExplanation:
    """What could be read from one answer.

    Attributes:
        text: The raw answer.
        label: ``"positive"``, ``"negative"`` or ``None`` (unreadable or both without a field).
        confidence: In ``[0, 1]`` (percentages divided by 100) or ``None``.
        words: ``(word, importance)`` pairs in the order given; where the answer names words (in
            quotes) without scores, each importance is ``None``.
        problems: What could not be read: ``"no label"``, ``"no confidence"``, ``"no words"``,
            ``"no importances"`` (words named without scores), ``"confidence out of range"``.
    """

    text: str
    label: str | None
    confidence: float | None
    words: tuple[tuple[str, float | None], ...]
    problems: tuple[str, ...] = field(default=())


_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_NOT_CHOICE = r"(?!\s*(?:or|/)\s*(?:positive|negative))"  # "<positive or negative>" is the template echoed
_LABEL_FIELD = re.compile(
    r"(?:sentiment|classification|label|prediction|answer)[^\w<]{0,6}(positive|negative)\b" + _NOT_CHOICE, re.I
)
_LABEL_ANY = re.compile(r"\b(positive|negative)\b", re.I)
_CONF = re.compile(r"confidence\W{0,6}" + _NUM + r"\s*(%?)", re.I)
_FIELD_WORDS = {
    "sentiment",
    "confidence",
    "classification",
    "label",
    "prediction",
    "answer",
    "importance",
    "score",
    "words",
    "word",
    "positive",
    "negative",
}
_PAIR = re.compile(r"[\"'`*]*([A-Za-z][A-Za-z'\-]*)[\"'`*]*\s*(?:\(|:|=|,|-)\s*" + _NUM + r"\s*(%?)\s*\)?")
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201c\u201d\n]{1,60})[\"\u201d]")


def _words_part(text: str) -> str:
    """The part of the answer that lists words: after a ``Words:``/``important words`` header if any."""
    m = re.search(r"(?:important\s+)?words?\s*[:\-]", text, re.I)
    if not m:
        return text
    rest = text[m.end() :]
    stop = re.search(r"\n\s*(?:sentiment|confidence|classification|label|prediction)\b", rest, re.I)
    return rest[: stop.start()] if stop else rest


def parse(text: str) -> SelfExplanation:
    """Read the label, confidence and ``(word, importance)`` pairs from one answer.

    Tolerant of order, case, Markdown emphasis, ``word (0.8)`` / ``word: 0.8`` / ``"word", 0.8``
    pairs, percentages, and words named in quotes without scores. Nothing unreadable is guessed: a missing piece is ``None`` / empty and
    named in ``problems``. A label is read from a ``Sentiment:``-like field, else from the text
    only where exactly one of the two labels occurs.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    problems = []
    m = _LABEL_FIELD.search(text)
    if m:
        label: str | None = m.group(1).lower()
    else:
        found = {x.lower() for x in _LABEL_ANY.findall(text)}
        label = found.pop() if len(found) == 1 else None
    if label is None:
        problems.append("no label")
    confidence = None
    c = _CONF.search(text)
    if c:
        v = float(c.group(1))
        if c.group(2) or (v > 1 and v == int(v)):  # "85%" or "85": a percentage
            v /= 100.0
        if 0.0 <= v <= 1.0:
            confidence = v
        else:
            problems.append("confidence out of range")
    else:
        problems.append("no confidence")
    part = _words_part(text)
    pairs: list[tuple[str, float | None]] = [
        (w, float(v) / (100.0 if pct else 1.0)) for w, v, pct in _PAIR.findall(part) if w.lower() not in _FIELD_WORDS
    ]
    if not pairs:  # no scores given: quoted words or phrases, in the order listed, without importance
        pairs = [(w, None) for q in _QUOTED.findall(part) for w in q.split() if w.lower() not in _FIELD_WORDS]
    if not pairs:
        problems.append("no words")
    elif pairs[0][1] is None:
        problems.append("no importances")
    return SelfExplanation(text, label, confidence, tuple(pairs), tuple(problems))


def _norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


def match_words(explanation: SelfExplanation, words: Sequence[str]) -> tuple[dict[int, float | None], list[str]]:
    """Which of the sentence's words the explanation names (case and punctuation ignored).

    Returns:
        ``({word index: importance}, [listed words not in the sentence])``; a word listed twice keeps
        its first importance; a listed word matches every occurrence in the sentence.
    """
    norms = [_norm(w) for w in words]
    found: dict[int, float | None] = {}
    missing = []
    for w, v in explanation.words:
        hits = [i for i, n in enumerate(norms) if n and n == _norm(w)]
        if not hits:
            missing.append(w)
        for i in hits:
            found.setdefault(i, v)
    return found, missing


def as_attribution(
    explanation: SelfExplanation, words: Sequence[str], *, method: str = "self-explanation"
) -> attr.Attribution:
    """The listed words as word scores: listed words ranked by their stated importance (words named
    without one after those with one; then by the order given) above every unlisted word; unlisted words tie at 0 (broken at random by
    :meth:`~mechlib.attribution.Attribution.ranking`). ``info`` keeps the stated importances, the
    listed words not in the sentence, and the label and confidence."""
    words = str_list(words, "words")
    found, missing = match_words(explanation, words)
    # one rank per distinct listed word (all its occurrences share it)
    keys = list(dict.fromkeys(_norm(words[i]) for i in found))
    first = {key: next(v for i, v in found.items() if _norm(words[i]) == key) for key in keys}
    order = sorted(keys, key=lambda key: (first[key] is None, -(first[key] or 0.0), keys.index(key)))
    scores = torch.zeros(len(words), dtype=torch.float64)
    for i in found:
        scores[i] = float(len(order) - order.index(_norm(words[i])))
    info = {
        "importance": {words[i]: v for i, v in found.items()},
        "not_in_sentence": missing,
        "label": explanation.label,
        "confidence": explanation.confidence,
        "problems": explanation.problems,
    }
    return attr.Attribution(method, tuple(words), scores, info=info)


def explain(
    model: Model,
    items: Sequence[Review | str],
    scheme: str,
    *,
    k: int = 3,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
) -> list[SelfExplanation]:
    """Prompt, generate (greedy) and parse one answer per review under ``scheme``."""
    choice(scheme, "scheme", SCHEMES)
    texts = [r.text if isinstance(r, Review) else r for r in items]
    prompts = [chat_prompt(model, t, scheme, k=k) for t in texts]
    return [parse(a) for a in generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)]


def summarize(explanations: Sequence[SelfExplanation], items: Sequence[Review] | None = None) -> dict[str, Any]:
    """Counts over a run: answers, unparsed labels / confidences / word lists, and, given the
    reviews, correct labels and listed words absent from the sentence."""
    out: dict[str, Any] = {"n": len(explanations)}
    for p in ("no label", "no confidence", "no words", "no importances", "confidence out of range"):
        out[p.replace(" ", "_")] = sum(p in e.problems for e in explanations)
    if items is not None:
        if len(items) != len(explanations):
            raise ValueError(f"{len(items)} reviews for {len(explanations)} explanations")
        out["correct"] = sum(e.label == r.label for e, r in zip(explanations, items))
        listed = [match_words(e, r.words) for e, r in zip(explanations, items)]
        out["listed_in_sentence"] = sum(len(f) for f, _ in listed)
        out["listed_not_in_sentence"] = sum(len(m) for _, m in listed)
    return out
