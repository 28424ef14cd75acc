"""Minimal pairs: ask the model itself which of two sentences is grammatical (parameter-free probing).

Marvin & Linzen (2018, "Targeted Syntactic Evaluation of Language Models") and BLiMP (Warstadt et
al. 2020) test syntax without training anything: a pair of sentences differs in one place, one is
grammatical, and the model passes the pair when it gives the grammatical one the higher
log-probability. The pairs here are written for mechlib from templates and word lists, seeded:

=============================  ==================================================================
phenomenon                     example (grammatical / ungrammatical)
=============================  ==================================================================
``agreement_simple``           The key is old. / The key are old.
``agreement_attractor``        The key near the cabinets is old. / ... are old.
``agreement_relative_clause``  The author that the guards liked is old. / ... are old.
``anaphor_number``             The boys hurt themselves. / The boys hurt himself.
``determiner_noun``            Anna bought this picture. / Anna bought this pictures.
=============================  ==================================================================

In the agreement phenomena the intervening noun (attractor) always has the other number than the
subject, and half the pairs have a singular subject. :func:`score_pairs` compares whole-sentence
log-probabilities (BLiMP's measure); :func:`accuracy` gives each phenomenon's rate with its
Clopper-Pearson interval; :func:`without_attractor` gives each agreement pair's twin with the
intervening phrase removed, for a paired measure of what an attractor costs.
:func:`agreement_prompts` builds what activation patching needs: prompts that differ *only* in the
subject's number, token by token, ending where the verb comes, with the two verb forms as the
answers.

Example:
    >>> pairs = make_pairs("agreement_attractor", 4, seed=0)
    >>> len(pairs), pairs[0].phenomenon
    (4, 'agreement_attractor')
    >>> all(p.good != p.bad for p in pairs)
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from mechlib.metrics import logit_diff
from mechlib.models import model_device
from mechlib.stats import Estimate, rate_ci
from mechlib.types import Model

__all__ = [
    "PHENOMENA",
    "AGREEMENT",
    "MinimalPair",
    "make_pairs",
    "make_all",
    "without_attractor",
    "PairScores",
    "score_pairs",
    "accuracy",
    "AgreementPrompts",
    "agreement_prompts",
    "NOUNS",
]

AGREEMENT = ("agreement_simple", "agreement_attractor", "agreement_relative_clause")
PHENOMENA = AGREEMENT + ("anaphor_number", "determiner_noun")

# (singular, plural): regular and irregular count nouns that can be subjects of "is old" etc.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"),
    ("book", "books"),
    ("dog", "dogs"),
    ("car", "cars"),
    ("door", "doors"),
    ("student", "students"),
    ("teacher", "teachers"),
    ("doctor", "doctors"),
    ("farmer", "farmers"),
    ("painting", "paintings"),
    ("window", "windows"),
    ("letter", "letters"),
    ("picture", "pictures"),
    ("road", "roads"),
    ("bird", "birds"),
    ("house", "houses"),
    ("report", "reports"),
    ("plan", "plans"),
    ("bottle", "bottles"),
    ("table", "tables"),
    ("chair", "chairs"),
    ("horse", "horses"),
    ("friend", "friends"),
    ("officer", "officers"),
    ("lawyer", "lawyers"),
    ("pilot", "pilots"),
    ("author", "authors"),
    ("guard", "guards"),
    ("manager", "managers"),
    ("player", "players"),
    ("boat", "boats"),
    ("tree", "trees"),
    ("lamp", "lamps"),
    ("song", "songs"),
    ("map", "maps"),
    ("box", "boxes"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("cabinet", "cabinets"),
    ("bridge", "bridges"),
    ("garden", "gardens"),
)
PEOPLE: tuple[tuple[str, str], ...] = (
    ("student", "students"),
    ("teacher", "teachers"),
    ("doctor", "doctors"),
    ("farmer", "farmers"),
    ("officer", "officers"),
    ("lawyer", "lawyers"),
    ("pilot", "pilots"),
    ("author", "authors"),
    ("guard", "guards"),
    ("manager", "managers"),
    ("player", "players"),
    ("friend", "friends"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
)
# (singular, plural, reflexive of the singular) for anaphor agreement: nouns with a clear gender.
GENDERED: tuple[tuple[str, str, str], ...] = (
    ("boy", "boys", "himself"),
    ("girl", "girls", "herself"),
    ("man", "men", "himself"),
    ("woman", "women", "herself"),
    ("king", "kings", "himself"),
    ("queen", "queens", "herself"),
    ("actor", "actors", "himself"),
    ("actress", "actresses", "herself"),
    ("father", "fathers", "himself"),
    ("mother", "mothers", "herself"),
    ("brother", "brothers", "himself"),
    ("sister", "sisters", "herself"),
    ("waiter", "waiters", "himself"),
    ("waitress", "waitresses", "herself"),
    ("uncle", "uncles", "himself"),
    ("aunt", "aunts", "herself"),
    ("son", "sons", "himself"),
    ("daughter", "daughters", "herself"),
)
PREDICATES = (
    "old",
    "new",
    "ready",
    "here",
    "broken",
    "small",
    "large",
    "missing",
    "famous",
    "important",
    "nearby",
    "gone",
    "fine",
    "quiet",
    "useful",
    "clean",
    "safe",
    "expensive",
)
PREPOSITIONS = ("near", "behind", "beside", "next to", "with", "above", "below", "under", "on")
RC_VERBS = ("liked", "saw", "visited", "met", "called", "helped", "trusted", "described", "remembered")
REFLEXIVE_VERBS = (
    "hurt",
    "saw",
    "praised",
    "blamed",
    "helped",
    "criticized",
    "described",
    "trusted",
    "admired",
    "distracted",
    "washed",
    "introduced",
)
NAMES = ("Anna", "Mark", "Clara", "Peter", "Ruth", "Daniel", "Laura", "David", "Sarah", "James", "Emma", "Paul")
OBJECT_VERBS = ("bought", "found", "saw", "liked", "sold", "cleaned", "moved", "noticed", "took", "painted")
OBJECTS: tuple[tuple[str, str], ...] = (
    ("picture", "pictures"),
    ("book", "books"),
    ("chair", "chairs"),
    ("lamp", "lamps"),
    ("car", "cars"),
    ("bottle", "bottles"),
    ("box", "boxes"),
    ("table", "tables"),
    ("map", "maps"),
    ("painting", "paintings"),
    ("letter", "letters"),
    ("key", "keys"),
    ("boat", "boats"),
    ("horse", "horses"),
    ("window", "windows"),
    ("photograph", "photographs"),
    ("cup", "cups"),
    ("glass", "glasses"),
    ("dress", "dresses"),
    ("shoe", "shoes"),
)
COPULA = {"sg": "is", "pl": "are"}
COPULA_PAST = {"sg": "was", "pl": "were"}


@dataclass(frozen=True)
class MinimalPair:
    """One grammatical and one ungrammatical sentence that differ in one place.

    Attributes:
        phenomenon: One of :data:`PHENOMENA`.
        good: The grammatical sentence.
        bad: The ungrammatical one.
        number: The controller's number, ``"sg"`` or ``"pl"``.
        prefix: The shared text before the critical word (for agreement: up to the verb).
        good_word, bad_word: The critical words (each with its leading space).
        parts: The template's slots (subject, attractor, ...), for bookkeeping.
    """

    phenomenon: str
    good: str
    bad: str
    number: str
    prefix: str
    good_word: str
    bad_word: str
    parts: dict[str, str] = field(default_factory=dict, compare=False)


def _other(number: str) -> str:
    return "pl" if number == "sg" else "sg"


def _agreement(kind: str, rng: random.Random, number: str) -> MinimalPair:
    idx = 0 if number == "sg" else 1
    subj = rng.choice(NOUNS)
    copula = rng.choice((COPULA, COPULA_PAST))
    pred = rng.choice(PREDICATES)
    parts = {"subject": subj[idx], "predicate": pred}
    if kind == "agreement_simple":
        prefix = f"The {subj[idx]}"
    elif kind == "agreement_attractor":
        attr = rng.choice([n for n in NOUNS if n != subj])
        prep = rng.choice(PREPOSITIONS)
        parts.update(attractor=attr[1 - idx], preposition=prep)
        prefix = f"The {subj[idx]} {prep} the {attr[1 - idx]}"
    elif kind == "agreement_relative_clause":
        attr = rng.choice([n for n in PEOPLE if n != subj])
        verb = rng.choice(RC_VERBS)
        parts.update(attractor=attr[1 - idx], verb=verb)
        prefix = f"The {subj[idx]} that the {attr[1 - idx]} {verb}"
    else:  # pragma: no cover - guarded by make_pairs
        raise ValueError(kind)
    good, bad = " " + copula[number], " " + copula[_other(number)]
    return MinimalPair(kind, f"{prefix}{good} {pred}.", f"{prefix}{bad} {pred}.", number, prefix, good, bad, parts)


def _anaphor(rng: random.Random, number: str) -> MinimalPair:
    sg, pl, refl = rng.choice(GENDERED)
    verb = rng.choice(REFLEXIVE_VERBS)
    noun = sg if number == "sg" else pl
    good, bad = (refl, "themselves") if number == "sg" else ("themselves", refl)
    prefix = f"The {noun} {verb}"
    return MinimalPair(
        "anaphor_number",
        f"{prefix} {good}.",
        f"{prefix} {bad}.",
        number,
        prefix,
        " " + good,
        " " + bad,
        {"subject": noun, "verb": verb},
    )


def _determiner(rng: random.Random, number: str) -> MinimalPair:
    name, verb = rng.choice(NAMES), rng.choice(OBJECT_VERBS)
    obj = rng.choice(OBJECTS)
    det = rng.choice(("this", "that")) if number == "sg" else rng.choice(("these", "those"))
    idx = 0 if number == "sg" else 1
    prefix = f"{name} {verb} {det}"
    return MinimalPair(
        "determiner_noun",
        f"{prefix} {obj[idx]}.",
        f"{prefix} {obj[1 - idx]}.",
        number,
        prefix,
        " " + obj[idx],
        " " + obj[1 - idx],
        {"determiner": det, "verb": verb},
    )


def make_pairs(phenomenon: str, n: int = 60, seed: int = 0) -> list[MinimalPair]:
    """``n`` distinct pairs of one phenomenon, half with a singular controller (seeded).

    Raises:
        ValueError: An unknown phenomenon, or more pairs than the word lists can make distinct.
    """
    if phenomenon not in PHENOMENA:
        raise ValueError(f"phenomenon must be one of {PHENOMENA}, got {phenomenon!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(f"{phenomenon}:{seed}")
    out: list[MinimalPair] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"could only make {len(out)} distinct {phenomenon} pairs; ask for fewer")
        number = "sg" if len(out) % 2 == 0 else "pl"
        if phenomenon in AGREEMENT:
            pair = _agreement(phenomenon, rng, number)
        elif phenomenon == "anaphor_number":
            pair = _anaphor(rng, number)
        else:
            pair = _determiner(rng, number)
        if pair.good not in seen:
            seen.add(pair.good)
            out.append(pair)
    return out


def make_all(n: int = 60, seed: int = 0, phenomena: Sequence[str] = PHENOMENA) -> list[MinimalPair]:
    """``n`` pairs of every phenomenon, concatenated."""
    return [p for ph in phenomena for p in make_pairs(ph, n, seed)]


def without_attractor(pairs: Sequence[MinimalPair]) -> list[MinimalPair]:
    """The ``agreement_simple`` twin of each agreement pair: the same subject, verb forms and
    predicate with the intervening phrase removed (``The key near the cabinets is old.`` ->
    ``The key is old.``), for a paired measure of what the attractor costs."""
    out = []
    for p in pairs:
        if p.phenomenon not in AGREEMENT:
            raise ValueError(f"without_attractor takes agreement pairs, got a {p.phenomenon!r} pair")
        prefix = f"The {p.parts['subject']}"
        pred = p.parts["predicate"]
        out.append(
            MinimalPair(
                "agreement_simple",
                f"{prefix}{p.good_word} {pred}.",
                f"{prefix}{p.bad_word} {pred}.",
                p.number,
                prefix,
                p.good_word,
                p.bad_word,
                {"subject": p.parts["subject"], "predicate": pred},
            )
        )
    return out


# ---- scoring ---------------------------------------------------------------------------------


@dataclass
class PairScores:
    """Log-probabilities of both sentences of every pair.

    Attributes:
        pairs: The pairs, in order.
        good, bad: ``[n]`` total log-probability (nats) of each sentence, every token after the first.
    """

    pairs: list[MinimalPair]
    good: torch.Tensor
    bad: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        """``good - bad`` per pair: positive where the model prefers the grammatical sentence."""
        return self.good - self.bad

    @property
    def correct(self) -> torch.Tensor:
        return self.margin > 0

    def phenomena(self) -> list[str]:
        return list(dict.fromkeys(p.phenomenon for p in self.pairs))

    def select(self, phenomenon: Optional[str] = None, number: Optional[str] = None) -> torch.Tensor:
        """Boolean mask of the pairs of one phenomenon and/or controller number."""
        return torch.tensor(
            [
                (phenomenon is None or p.phenomenon == phenomenon) and (number is None or p.number == number)
                for p in self.pairs
            ]
        )


def _sentence_logprobs(model: Model, texts: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    tok = model.tokenizer
    bos = (
        [int(tok.bos_token_id)]
        if getattr(model.cfg, "default_prepend_bos", False) and tok.bos_token_id is not None
        else []
    )
    ids = [bos + tok.encode(t, add_special_tokens=False) for t in texts]
    out = torch.zeros(len(texts), dtype=torch.float64)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = model_device(model)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="minimal pairs", disable=not progress, leave=False):
        T = max(len(ids[i]) for i in batch)
        toks = torch.zeros(len(batch), T, dtype=torch.long)
        for r, i in enumerate(batch):
            toks[r, : len(ids[i])] = torch.tensor(ids[i])
        with torch.no_grad():
            logp = model(toks.to(device)).float().log_softmax(-1).cpu()
        for r, i in enumerate(batch):
            n = len(ids[i])
            tgt = toks[r, 1:n]
            out[i] = logp[r, torch.arange(n - 1), tgt].double().sum()
    return out


def score_pairs(
    model: Model, pairs: Sequence[MinimalPair], *, batch_size: int = 32, progress: bool = True
) -> PairScores:
    """Whole-sentence log-probability of both members of every pair (BLiMP's comparison).

    Args:
        model: A model with a tokenizer.
        pairs: :class:`MinimalPair` objects (:func:`make_pairs`, :func:`make_all`).

    Returns:
        :class:`PairScores`.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty")
    if not all(isinstance(p, MinimalPair) for p in pairs):
        raise TypeError("pairs must be MinimalPair objects (make_pairs, make_all)")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("model has no tokenizer; minimal pairs are text")
    lp = _sentence_logprobs(model, [p.good for p in pairs] + [p.bad for p in pairs], batch_size, progress)
    n = len(pairs)
    return PairScores(pairs, lp[:n], lp[n:])


def accuracy(scores: PairScores, by_number: bool = False) -> dict[str, Estimate]:
    """Share of pairs where the grammatical sentence scores higher, per phenomenon (and per
    controller number with ``by_number``: keys ``"phenomenon/sg"``), with Clopper-Pearson intervals."""
    out = {}
    for ph in scores.phenomena():
        for num in ("sg", "pl") if by_number else (None,):
            mask = scores.select(ph, num)
            if mask.any():
                out[ph if num is None else f"{ph}/{num}"] = rate_ci(scores.correct[mask].tolist())
    return out


# ---- prompts for activation patching ----------------------------------------------------------


@dataclass
class AgreementPrompts:
    """Prompts that differ only in the subject's number, cut where the verb comes.

    Row ``i`` of ``clean`` and ``corrupted`` are the same prompt with the subject singular in one and
    plural in the other (alternating which), token for token. ``correct`` is the clean prompt's verb
    form (`` is``/`` are`` or `` was``/`` were``), ``wrong`` the other.

    Attributes:
        clean, corrupted: ``[n, pos]`` token ids.
        correct, wrong: ``[n]`` token ids of the verb forms.
        number: ``[n]`` 1 where the clean subject is plural.
        subject_pos: The subject's position (the same in every row).
        pos_labels: A label per position (``The``, ``SUBJ``, ...) for plots.
        pairs: The clean prompts' :class:`MinimalPair` objects.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    number: torch.Tensor
    subject_pos: int
    pos_labels: list[str]
    pairs: list[MinimalPair]

    def __len__(self) -> int:
        return self.clean.shape[0]

    def metric(self):
        """Logit of the clean verb form minus the other, at the last position (a ``last_only`` metric)."""
        return logit_diff(None, self.correct, self.wrong)

    def subset(self, index: Any) -> "AgreementPrompts":
        """The prompts at ``index`` (an int, slice or list), e.g. one prompt for a per-prompt patch."""
        idx = (
            [index]
            if isinstance(index, int)
            else list(range(len(self)))[index]
            if isinstance(index, slice)
            else list(index)
        )
        if not idx:
            raise ValueError("index selects no prompts")
        t = torch.tensor(idx)
        return AgreementPrompts(
            self.clean[t],
            self.corrupted[t],
            self.correct[t],
            self.wrong[t],
            self.number[t],
            self.subject_pos,
            self.pos_labels,
            [self.pairs[i] for i in idx],
        )


def _single(tok: Any, word: str) -> Optional[int]:
    ids = tok.encode(" " + word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def agreement_prompts(
    model: Model, n: int = 40, seed: int = 0, phenomenon: str = "agreement_attractor"
) -> AgreementPrompts:
    """``n`` agreement prompts for activation patching, using only nouns and verbs that are single
    tokens for ``model`` so the singular and plural prompts align position by position.

    The template is fixed per phenomenon (``The SUBJ PREP the ATTR`` with a one-word preposition, or
    ``The SUBJ that the ATTR VERB``), so every prompt has the same length and the position labels hold
    for all rows.

    Raises:
        ValueError: An agreement phenomenon is not given, or too few single-token words.
    """
    if phenomenon not in AGREEMENT:
        raise ValueError(f"phenomenon must be one of {AGREEMENT}, got {phenomenon!r}")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer")
    nouns = [n_ for n_ in NOUNS if _single(tok, n_[0]) is not None and _single(tok, n_[1]) is not None]
    people = [n_ for n_ in PEOPLE if n_ in nouns]
    preps = [p for p in PREPOSITIONS if " " not in p and _single(tok, p) is not None]
    verbs = [v for v in RC_VERBS if _single(tok, v) is not None]
    if len(nouns) < 4 or len(people) < 4 or not preps or not verbs:
        raise ValueError("too few single-token nouns, prepositions or verbs for this tokenizer")
    rng = random.Random(f"patch:{phenomenon}:{seed}")
    clean, corrupted, correct, wrong, number, pairs = [], [], [], [], [], []
    seen: set[str] = set()
    tries = 0
    while len(clean) < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"could only make {len(clean)} distinct prompts; ask for fewer")
        num = "sg" if len(clean) % 2 == 0 else "pl"
        idx = 0 if num == "sg" else 1
        subj = rng.choice(nouns)
        copula = rng.choice((COPULA, COPULA_PAST))
        if phenomenon == "agreement_simple":
            words = ["The", "{S}"]
        elif phenomenon == "agreement_attractor":
            attr = rng.choice([x for x in nouns if x != subj])
            words = ["The", "{S}", rng.choice(preps), "the", attr[1 - idx]]
        else:
            attr = rng.choice([x for x in people if x != subj])
            words = ["The", "{S}", "that", "the", attr[1 - idx], rng.choice(verbs)]
        text_c = " ".join(w.replace("{S}", subj[idx]) for w in words)
        text_k = " ".join(w.replace("{S}", subj[1 - idx]) for w in words)
        if text_c in seen:
            continue
        ids_c = tok.encode(text_c, add_special_tokens=False)
        ids_k = tok.encode(text_k, add_special_tokens=False)
        if len(ids_c) != len(words) or len(ids_k) != len(words):
            continue
        seen.add(text_c)
        clean.append(ids_c)
        corrupted.append(ids_k)
        correct.append(_single(tok, copula[num]))
        wrong.append(_single(tok, copula[_other(num)]))
        number.append(idx)
        good, bad = " " + copula[num], " " + copula[_other(num)]
        pairs.append(
            MinimalPair(phenomenon, text_c + good, text_c + bad, num, text_c, good, bad, {"subject": subj[idx]})
        )
    labels = {
        "agreement_simple": ["The", "SUBJ"],
        "agreement_attractor": ["The", "SUBJ", "PREP", "the", "ATTR"],
        "agreement_relative_clause": ["The", "SUBJ", "that", "the", "ATTR", "VERB"],
    }[phenomenon]
    return AgreementPrompts(
        torch.tensor(clean),
        torch.tensor(corrupted),
        torch.tensor(correct),
        torch.tensor(wrong),
        torch.tensor(number),
        1,
        labels,
        pairs,
    )
