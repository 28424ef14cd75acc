"""Indirect object identification (IOI) prompts, after Wang et al. 2022 (arXiv 2211.00593).

An IOI prompt names two people, then repeats one of them (the subject, S) as the giver; the
indirect object (IO) is the other name and the correct next token::

    "When John and Mary had lunch at the park, John handed a ball to"  ->  " Mary"
          S1       IO                            S2                   END

``BABA`` prompts name S first (as above); ``ABBA`` prompts swap the first two names. The
corrupted ("ABC") counterpart of each prompt keeps the template, place and object but uses
three fresh, distinct names, so no name repeats and the task's signal is gone; clean and
corrupted prompts have the same token length and are aligned position by position, which is
what activation patching needs.

Every name, place and object is kept only if it is ONE token with a leading space in the
model's tokenizer, and every prompt in a dataset has the same token length (templates are
grouped by their tokenized length), so a dataset is one ``[n, pos]`` tensor with no padding.

Example:
    >>> from mechlib.ioi import make_ioi_dataset
    >>> ds = make_ioi_dataset(model, 50, seed=0)          # doctest: +SKIP
    >>> ds.prompts[0], ds.tokens.shape                     # doctest: +SKIP
    >>> logits = model(ds.tokens)                          # doctest: +SKIP
    >>> logit_diff(logits, ds).mean()                      # doctest: +SKIP
    >>> print(ds.report())                                 # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from jaxtyping import Float, Int

from mechlib.metrics import ioi_metric
from mechlib.models import model_device
from mechlib.stats import Estimate, mean_ci, rate_ci
from mechlib.types import Model
from mechlib.validate import choice, int_list, str_list, whole

__all__ = [
    "BABA_TEMPLATES",
    "ABBA_TEMPLATES",
    "NAMES",
    "PLACES",
    "OBJECTS",
    "POSITION_KEYS",
    "IOIDataset",
    "IOIBaseline",
    "make_ioi_dataset",
    "template_lengths",
    "logit_diff",
    "ioi_baseline",
]

# ---- the project's word lists ---------------------------------------------------------------
# Placeholders: {S} the subject (repeated), {IO} the indirect object (the answer), {PLACE},
# {OBJECT}. Written for this project in the paper's style; each template is 15 tokens with
# single-token names/places/objects in both the GPT-2 and the SmolLM2 tokenizer.

BABA_TEMPLATES: tuple[str, ...] = (
    "When {S} and {IO} finally arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "After {S} and {IO} had walked into the {PLACE}, {S} passed a {OBJECT} to",
    "While {S} and {IO} were waiting at the {PLACE}, {S} offered a {OBJECT} to",
    "Later {S} and {IO} met at the {PLACE}, and {S} gave a {OBJECT} to",
    "So {S} and {IO} went over to the {PLACE}. {S} brought a {OBJECT} to",
    "Once {S} and {IO} had finally reached the {PLACE}, {S} threw a {OBJECT} to",
    "Then {S} and {IO} spent time at the {PLACE}. {S} sent a {OBJECT} to",
    "As {S} and {IO} were leaving the {PLACE} together, {S} gave a {OBJECT} to",
    "Before {S} and {IO} left for the {PLACE} today, {S} lent a {OBJECT} to",
    "When {S} and {IO} got back from the {PLACE}, {S} showed a {OBJECT} to",
    "Today {S} and {IO} were cleaning the {PLACE}, so {S} gave a {OBJECT} to",
    "Since {S} and {IO} were both at the {PLACE}, {S} sold a {OBJECT} to",
    "After {S} and {IO} had lunch at the {PLACE}, {S} handed a {OBJECT} to",
    "When {S} and {IO} came home from the {PLACE}, {S} gave a {OBJECT} to",
    "Earlier {S} and {IO} were relaxing at the {PLACE}. {S} tossed a {OBJECT} to",
)


def _swap_first_two(template: str) -> str:
    i, j = template.index("{S}"), template.index("{IO}")
    assert i < j
    return template[:i] + "{IO}" + template[i + 3 : j] + "{S}" + template[j + 4 :]


#: The ABBA swaps: the same sentences with the first two names exchanged (IO named first).
ABBA_TEMPLATES: tuple[str, ...] = tuple(_swap_first_two(t) for t in BABA_TEMPLATES)

NAMES: tuple[str, ...] = tuple(
    "Mary John Alice Bob James Michael David Sarah Emma Olivia Daniel Thomas Paul Mark George "
    "Anna Laura Kevin Jessica Jennifer Lisa Karen Susan Nancy Betty Helen Sandra Donna Carol Ruth "
    "Sharon Michelle Amy Emily Rachel Kate Jack Henry Peter Andrew Steven Brian Edward Ryan Jason "
    "Justin Eric Adam Frank Scott Gary Tim Sam Max Ben Tom Joe Jim Dan Matt Chris Alex Lucy Grace "
    "Rose Sophie Chloe Hannah Julia Victoria Claire Diana Jane Martha Linda Maria Elena Simon "
    "Patrick Roger Arthur Oscar Victor Leo Ian Carl Neil Dean Ross Luke Nathan Aaron Kyle Sean "
    "Tyler Megan Amber Tiffany Crystal Heather Kelly Monica Angela Rebecca Samantha".split()
)

PLACES: tuple[str, ...] = tuple(
    "store park school beach office house garden station hospital library market restaurant "
    "church museum party bank farm hotel lake zoo airport theater".split()
)

OBJECTS: tuple[str, ...] = tuple(
    "drink ball book ring cake bag key pen hat box card gift phone shirt cup coin letter map "
    "basket towel candle necklace".split()
)

#: Keys of :attr:`IOIDataset.positions`.
POSITION_KEYS: tuple[str, ...] = ("IO", "S1", "S1+1", "S2", "END")

Order = Literal["BABA", "ABBA", "both"]


# ---- tokenizer access -----------------------------------------------------------------------


class _Tok:
    """One way to tokenize for a TransformerLens model or a bare Hugging Face tokenizer."""

    def __init__(self, model_or_tokenizer: Any, prepend_bos: Optional[bool]):
        if model_or_tokenizer is None:
            raise ValueError("make_ioi_dataset needs a model with a tokenizer or a Hugging Face tokenizer, got None")
        self.model = None
        tok = getattr(model_or_tokenizer, "tokenizer", "missing")
        if tok == "missing":  # a bare tokenizer
            if not callable(getattr(model_or_tokenizer, "encode", None)):
                raise ValueError(
                    f"expected a TransformerLens model or a Hugging Face tokenizer, got {type(model_or_tokenizer).__name__}"
                )
            self.tokenizer = model_or_tokenizer
            self.prepend_bos = bool(prepend_bos)
        else:
            if tok is None:
                raise ValueError(
                    "this model has no tokenizer (the tiny random models have none), so IOI prompts cannot be "
                    "tokenized; use a real model such as load_model('smollm2-135m') or pass a Hugging Face tokenizer"
                )
            self.model = model_or_tokenizer
            self.tokenizer = tok
            if prepend_bos is None:
                prepend_bos = bool(getattr(getattr(model_or_tokenizer, "cfg", None), "default_prepend_bos", True))
            self.prepend_bos = bool(prepend_bos)
        if self.prepend_bos and self.tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ([int(self.tokenizer.bos_token_id)] if self.prepend_bos else []) + ids

    def single(self, word: str) -> Optional[int]:
        """The id of ``" " + word`` if that is exactly one token, else None."""
        ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def str_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


def _filter_single(tok: _Tok, words: Sequence[str]) -> tuple[list[str], list[str]]:
    kept, dropped = [], []
    for w in dict.fromkeys(words):  # de-duplicate, keep order
        (kept if tok.single(w) is not None else dropped).append(w)
    return kept, dropped


def _fill(template: str, io: str, s: str, place: str, obj: str) -> str:
    return template.format(IO=io, S=s, PLACE=place, OBJECT=obj)


def template_lengths(
    model_or_tokenizer: Any, templates: Sequence[str] = BABA_TEMPLATES, *, prepend_bos: Optional[bool] = None
) -> list[int]:
    """Token length of each template, filled with single-token words (BOS counted if prepended)."""
    templates = str_list(templates, "templates")
    tok = _Tok(model_or_tokenizer, prepend_bos)
    io, s = (_filter_single(tok, NAMES)[0] + ["John", "Mary"])[:2]
    place = (_filter_single(tok, PLACES)[0] + ["store"])[0]
    obj = (_filter_single(tok, OBJECTS)[0] + ["drink"])[0]
    return [len(tok.encode(_fill(t, io, s, place, obj))) for t in templates]


# ---- the dataset ----------------------------------------------------------------------------


@dataclass
class IOIDataset:
    """IOI prompts, their ABC-corrupted twins, answer ids and key positions, all of one length.

    Attributes:
        prompts: Clean prompts, e.g. ``"When John and Mary ..., John handed a ball to"``.
        corrupted_prompts: The ABC counterpart of each prompt: same template, place and object,
            three fresh distinct names (none equal to the clean IO or S), so S does not repeat.
        tokens: Clean tokens ``[n, pos]`` (BOS included when the model prepends one).
        corrupted_tokens: Corrupted tokens ``[n, pos]``, aligned with ``tokens`` position by position.
        io_ids: The answer token (``" " + IO name``) per prompt ``[n]``.
        s_ids: The wrong answer (``" " + S name``) per prompt ``[n]``.
        io_names, s_names: The names, without the leading space.
        corrupted_names: ``(name at IO's slot, name at S1's slot, name at S2's slot)`` per prompt.
        places, objects: The place and object per prompt.
        template_ids: Index of each prompt's template in :data:`BABA_TEMPLATES` (the ABBA swap of
            template ``k`` has the same index) ``[n]``.
        orders: ``"BABA"`` or ``"ABBA"`` per prompt.
        positions: Token position per prompt ``[n]`` for each key of :data:`POSITION_KEYS`:
            ``"IO"``, ``"S1"`` (first S), ``"S1+1"`` (the token after it), ``"S2"`` (the repeated S)
            and ``"END"`` (the last token, where the answer is predicted). Identical for clean and
            corrupted prompts (the corrupted prompt has other names in the same slots).
        str_tokens: String tokens of each clean prompt, for plot labels.
        corrupted_str_tokens: String tokens of each corrupted prompt.
        templates: The BABA templates the dataset drew from (indices ``template_pool``).
        template_pool: Indices into :data:`BABA_TEMPLATES` of the templates in use.
        dropped_templates: Template indices left out because they tokenize to another length.
        names: The single-token names drawn from; ``dropped_names`` the multi-token candidates.
        place_pool, object_pool, dropped_places, dropped_objects: Likewise for places and objects.
        seed: The seed that generated the dataset.
        prepend_bos: Whether a BOS token starts every prompt.
    """

    prompts: list[str]
    corrupted_prompts: list[str]
    tokens: Int[torch.Tensor, "n pos"]
    corrupted_tokens: Int[torch.Tensor, "n pos"]
    io_ids: Int[torch.Tensor, " n"]
    s_ids: Int[torch.Tensor, " n"]
    io_names: list[str]
    s_names: list[str]
    corrupted_names: list[tuple[str, str, str]]
    places: list[str]
    objects: list[str]
    template_ids: Int[torch.Tensor, " n"]
    orders: list[str]
    positions: dict[str, Int[torch.Tensor, " n"]]
    str_tokens: list[list[str]]
    corrupted_str_tokens: list[list[str]]
    templates: list[str] = field(default_factory=list)
    template_pool: list[int] = field(default_factory=list)
    dropped_templates: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    dropped_names: list[str] = field(default_factory=list)
    place_pool: list[str] = field(default_factory=list)
    object_pool: list[str] = field(default_factory=list)
    dropped_places: list[str] = field(default_factory=list)
    dropped_objects: list[str] = field(default_factory=list)
    seed: int = 0
    prepend_bos: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def seq_len(self) -> int:
        """Token length of every prompt."""
        return int(self.tokens.shape[1])

    @property
    def answer_ids(self) -> Int[torch.Tensor, "n 2"]:
        """``[n, 2]``: column 0 the IO (correct) token, column 1 the S (wrong) token."""
        return torch.stack([self.io_ids, self.s_ids], dim=1)

    def pos(self, key: str) -> Int[torch.Tensor, " n"]:
        """Positions of one key token, e.g. ``ds.pos("S2")``; see :data:`POSITION_KEYS`."""
        if key not in self.positions:
            raise KeyError(f"no position {key!r}; keys are {list(self.positions)}")
        return self.positions[key]

    def labels(self, i: int = 0) -> list[str]:
        """Axis labels for prompt ``i``'s positions: the string token, with the key names
        marked, e.g. ``"S1: John"``, ``"END: to"``."""
        out = list(self.str_tokens[i])
        for key in POSITION_KEYS:
            p = int(self.positions[key][i])
            out[p] = f"{key}:{out[p]}" if ":" not in out[p] else out[p]
        return out

    def subset(self, index: Sequence[int] | torch.Tensor | slice) -> "IOIDataset":
        """The prompts at ``index`` (a slice, a list of ints or a bool/long tensor), as a dataset."""
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            t = torch.as_tensor(index)
            if t.dtype == torch.bool:
                if t.shape != (len(self),):
                    raise ValueError(f"index: a bool mask needs {len(self)} entries, got shape {tuple(t.shape)}")
                idx = t.nonzero().flatten().tolist()
            elif t.numel() == 0:
                idx = []
            else:
                idx = [whole(i, "index", minimum=-len(self), maximum=len(self) - 1) % len(self) for i in t.flatten()]
        if not idx:
            raise ValueError("subset is empty")
        ti = torch.tensor(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return IOIDataset(
            prompts=pick(self.prompts),
            corrupted_prompts=pick(self.corrupted_prompts),
            tokens=self.tokens[ti],
            corrupted_tokens=self.corrupted_tokens[ti],
            io_ids=self.io_ids[ti],
            s_ids=self.s_ids[ti],
            io_names=pick(self.io_names),
            s_names=pick(self.s_names),
            corrupted_names=pick(self.corrupted_names),
            places=pick(self.places),
            objects=pick(self.objects),
            template_ids=self.template_ids[ti],
            orders=pick(self.orders),
            positions={k: v[ti] for k, v in self.positions.items()},
            str_tokens=pick(self.str_tokens),
            corrupted_str_tokens=pick(self.corrupted_str_tokens),
            templates=self.templates,
            template_pool=self.template_pool,
            dropped_templates=self.dropped_templates,
            names=self.names,
            dropped_names=self.dropped_names,
            place_pool=self.place_pool,
            object_pool=self.object_pool,
            dropped_places=self.dropped_places,
            dropped_objects=self.dropped_objects,
            seed=self.seed,
            prepend_bos=self.prepend_bos,
        )

    def report(self) -> str:
        """A readable summary: sizes, templates used, names kept and dropped."""
        counts = Counter(self.orders)
        lines = [
            f"IOIDataset: {len(self)} prompts of {self.seq_len} tokens (seed {self.seed}, "
            f"BABA {counts.get('BABA', 0)}, ABBA {counts.get('ABBA', 0)}, BOS {'yes' if self.prepend_bos else 'no'})",
            f"templates ({len(self.template_pool)} used"
            + (f"; dropped for another token length: {self.dropped_templates}" if self.dropped_templates else "")
            + "):",
        ]
        lines += [f"  [{k}] {t}" for k, t in zip(self.template_pool, self.templates)]
        lines.append(
            f"names: {len(self.names)} single-token kept, {len(self.dropped_names)} candidates dropped as multi-token"
            + (f" ({', '.join(self.dropped_names)})" if self.dropped_names else "")
        )
        lines.append(f"  kept: {', '.join(self.names)}")
        lines.append(
            f"places: {len(self.place_pool)} kept"
            + (f", dropped {self.dropped_places}" if self.dropped_places else "")
            + f"; objects: {len(self.object_pool)} kept"
            + (f", dropped {self.dropped_objects}" if self.dropped_objects else "")
        )
        lines.append(f"example clean:     {self.prompts[0]!r} -> {self.io_names[0]!r} (not {self.s_names[0]!r})")
        lines.append(f"example corrupted: {self.corrupted_prompts[0]!r}")
        return "\n".join(lines)

    summary = report

    def __repr__(self) -> str:
        return f"IOIDataset(n={len(self)}, seq_len={self.seq_len}, templates={self.template_pool}, seed={self.seed})"


def make_ioi_dataset(
    model_or_tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    order: Order = "both",
    templates: Optional[Sequence[int]] = None,
    length: Optional[int] = None,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    min_names: int = 5,
    prepend_bos: Optional[bool] = None,
) -> IOIDataset:
    """Generate ``n`` IOI prompts and their ABC-corrupted twins, all of one token length.

    Args:
        model_or_tokenizer: A TransformerLens model with a tokenizer (its
            ``cfg.default_prepend_bos`` decides BOS, as ``model.to_tokens`` does) or a bare
            Hugging Face tokenizer (no BOS unless ``prepend_bos=True``).
        n: Number of prompts (at least 1).
        seed: Everything (templates, names, places, objects, corrupted names) follows from it.
        order: ``"BABA"``, ``"ABBA"`` or ``"both"`` (alternating, so balanced to within one).
        templates: Indices into :data:`BABA_TEMPLATES` to draw from (default all).
        length: Token length to keep. Default: the length shared by most of the chosen templates
            (ties go to the shorter); templates of other lengths are dropped and listed in
            :meth:`IOIDataset.report`.
        names: Candidate first names; only those that are one token with a leading space are used.
        places: Candidate places (filtered the same way, so every template has one length).
        objects: Candidate objects (filtered the same way).
        min_names: Fewest single-token names accepted (at least 5: a prompt and its corruption
            use five distinct names).
        prepend_bos: Override the model's BOS default.

    Returns:
        An :class:`IOIDataset`.

    Raises:
        ValueError: ``n < 1``; a model without a tokenizer; too few single-token names, places or
            objects; an unknown ``order``, template index or a ``length`` no template has.

    Example:
        >>> ds = make_ioi_dataset(model, 8, seed=1, order="BABA")   # doctest: +SKIP
        >>> ds.tokens.shape, ds.pos("S2")[:3]                       # doctest: +SKIP
    """
    n = whole(n, "n")
    if n < 1:
        raise ValueError(f"n must be a positive integer number of prompts, got {n!r}")
    seed = whole(seed, "seed")
    choice(order, "order", ("BABA", "ABBA", "both"))
    names, places, objects = str_list(names, "names"), str_list(places, "places"), str_list(objects, "objects")
    min_names = whole(min_names, "min_names", minimum=0)
    if length is not None:
        length = whole(length, "length", minimum=1)
    if templates is not None:  # checked, then kept in the given order (the draw follows it)
        int_list(
            templates, "templates", n=len(BABA_TEMPLATES), what="template indices", example="[0, 1]", owner="there are"
        )
        templates = list(
            dict.fromkeys(int(t) for t in (templates.tolist() if isinstance(templates, torch.Tensor) else templates))
        )
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True, False or None, got {prepend_bos!r}")
    tok = _Tok(model_or_tokenizer, prepend_bos)

    name_pool, dropped_names = _filter_single(tok, names)
    need = max(5, int(min_names))
    if len(name_pool) < need:
        raise ValueError(
            f"only {len(name_pool)} of {len(dict.fromkeys(names))} candidate names are one token with a leading "
            f"space in this tokenizer ({name_pool}); need at least {need} (a prompt and its ABC corruption use 5 "
            f"distinct names). Dropped as multi-token: {dropped_names[:20]}. Pass more common first names."
        )
    place_pool, dropped_places = _filter_single(tok, places)
    object_pool, dropped_objects = _filter_single(tok, objects)
    if not place_pool or not object_pool:
        raise ValueError(
            f"no single-token {'places' if not place_pool else 'objects'} left after filtering "
            f"(dropped places {dropped_places}, objects {dropped_objects}); pass common one-word nouns"
        )

    pool = list(range(len(BABA_TEMPLATES))) if templates is None else templates
    orders_wanted = ["BABA", "ABBA"] if order == "both" else [order]

    def fill(k: int, o: str, io: str, s: str, place: str, obj: str) -> str:
        t = BABA_TEMPLATES[k] if o == "BABA" else ABBA_TEMPLATES[k]
        return _fill(t, io, s, place, obj)

    # Length of each template (both orders must agree: with single-token words they do).
    ref = (name_pool[0], name_pool[1], place_pool[0], object_pool[0])
    lens: dict[int, int] = {}
    for k in pool:
        ls = {len(tok.encode(fill(k, o, *ref))) for o in orders_wanted}
        lens[k] = ls.pop() if len(ls) == 1 else -1
    if length is None:
        counts = Counter(v for v in lens.values() if v > 0)
        if not counts:
            raise ValueError("no template tokenizes to one length in both orders with this tokenizer")
        length = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    chosen = [k for k in pool if lens[k] == length]
    dropped_templates = [k for k in pool if lens[k] != length]
    if not chosen:
        raise ValueError(f"no template has {length} tokens; template lengths are {lens}")

    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {
        k: []
        for k in ("prompts", "corrupted", "tokens", "ctokens", "io", "s", "cn", "place", "obj", "tid", "order", "pos")
    }
    attempts = 0
    while len(rows["prompts"]) < n:
        attempts += 1
        if attempts > 20 * n + 100:
            raise ValueError(
                "could not build prompts whose names sit on single tokens at a fixed length; the tokenizer merges "
                "names with neighbouring text. Try other templates or names."
            )
        i = len(rows["prompts"])
        o = orders_wanted[i % len(orders_wanted)]
        k = rng.choice(chosen)
        io, s = rng.sample(name_pool, 2)
        c_io, c_s1, c_s2 = rng.sample([x for x in name_pool if x not in (io, s)], 3)
        place, obj = rng.choice(place_pool), rng.choice(object_pool)
        clean = fill(k, o, io, s, place, obj)
        template = BABA_TEMPLATES[k] if o == "BABA" else ABBA_TEMPLATES[k]
        corrupted = _corrupt(template, c_io, c_s1, c_s2, place, obj)
        ids, cids = tok.encode(clean), tok.encode(corrupted)
        if len(ids) != length or len(cids) != length:
            continue
        pos = _key_positions(tok, template, io, s, place, obj)
        io_id, s_id = tok.single(io), tok.single(s)
        if pos is None or ids[pos["IO"]] != io_id or ids[pos["S1"]] != s_id or ids[pos["S2"]] != s_id:
            continue
        if (
            cids[pos["IO"]] != tok.single(c_io)
            or cids[pos["S1"]] != tok.single(c_s1)
            or cids[pos["S2"]] != tok.single(c_s2)
        ):
            continue
        for key, val in (
            ("prompts", clean),
            ("corrupted", corrupted),
            ("tokens", ids),
            ("ctokens", cids),
            ("io", io),
            ("s", s),
            ("cn", (c_io, c_s1, c_s2)),
            ("place", place),
            ("obj", obj),
            ("tid", k),
            ("order", o),
            ("pos", pos),
        ):
            rows[key].append(val)

    tokens = torch.tensor(rows["tokens"], dtype=torch.long)
    ctokens = torch.tensor(rows["ctokens"], dtype=torch.long)
    return IOIDataset(
        prompts=rows["prompts"],
        corrupted_prompts=rows["corrupted"],
        tokens=tokens,
        corrupted_tokens=ctokens,
        io_ids=torch.tensor([tok.single(x) for x in rows["io"]], dtype=torch.long),
        s_ids=torch.tensor([tok.single(x) for x in rows["s"]], dtype=torch.long),
        io_names=rows["io"],
        s_names=rows["s"],
        corrupted_names=rows["cn"],
        places=rows["place"],
        objects=rows["obj"],
        template_ids=torch.tensor(rows["tid"], dtype=torch.long),
        orders=rows["order"],
        positions={key: torch.tensor([p[key] for p in rows["pos"]], dtype=torch.long) for key in POSITION_KEYS},
        str_tokens=[tok.str_tokens(r) for r in rows["tokens"]],
        corrupted_str_tokens=[tok.str_tokens(r) for r in rows["ctokens"]],
        templates=[BABA_TEMPLATES[k] for k in chosen],
        template_pool=chosen,
        dropped_templates=dropped_templates,
        names=name_pool,
        dropped_names=dropped_names,
        place_pool=place_pool,
        object_pool=object_pool,
        dropped_places=dropped_places,
        dropped_objects=dropped_objects,
        seed=seed,
        prepend_bos=tok.prepend_bos,
    )


def _corrupt(template: str, c_io: str, c_s1: str, c_s2: str, place: str, obj: str) -> str:
    """Fill ``template`` with three distinct names: c_io at IO's slot, c_s1/c_s2 at S's two slots."""
    first = template.index("{S}")
    second = template.index("{S}", first + 3)
    t = template[:second] + "{S2}" + template[second + 3 :]
    return t.format(IO=c_io, S=c_s1, S2=c_s2, PLACE=place, OBJECT=obj)


def _key_positions(tok: _Tok, template: str, io: str, s: str, place: str, obj: str) -> Optional[dict[str, int]]:
    """Token index of each key word, from the token count of the prompt up to and including it."""
    filled = _fill(template, io, s, place, obj)
    full = len(tok.encode(filled))
    i_io = template.index("{IO}")
    i_s1 = template.index("{S}")
    i_s2 = template.index("{S}", i_s1 + 3)

    def end_of(slot_start: int, slot_len: int) -> int:
        prefix = _fill(template[: slot_start + slot_len], io, s, place, obj)
        return len(tok.encode(prefix)) - 1

    pos = {"IO": end_of(i_io, 4), "S1": end_of(i_s1, 3), "S2": end_of(i_s2, 3), "END": full - 1}
    pos["S1+1"] = pos["S1"] + 1
    return pos


# ---- metrics --------------------------------------------------------------------------------


def logit_diff(
    logits: Float[torch.Tensor, "n pos d_vocab"], dataset: IOIDataset, *, per_prompt: bool = True
) -> Float[torch.Tensor, " n"] | Float[torch.Tensor, ""]:
    """Logit of IO minus logit of S at each prompt's END position.

    Args:
        logits: Model output on ``dataset.tokens`` (or ``corrupted_tokens``), ``[n, pos, d_vocab]``.
        dataset: The dataset the logits come from.
        per_prompt: Return ``[n]`` (default) or the mean.
    """
    if logits.ndim != 3 or logits.shape[0] != len(dataset):
        raise ValueError(f"logits must be [n={len(dataset)}, pos, d_vocab], got {tuple(logits.shape)}")
    ld = ioi_metric(dataset)(logits)  # the one IO - S at END computation (mechlib.metrics)
    return ld if per_prompt else ld.mean()


@dataclass
class IOIBaseline:
    """How well a model does IOI on a dataset.

    Attributes:
        logit_diff: Mean logit(IO) - logit(S) at END on clean prompts.
        accuracy: Fraction of prompts with logit(IO) > logit(S).
        p_io: Mean probability of IO.
        top1: Fraction of prompts where IO is the top prediction.
        corrupted_logit_diff: Mean IO - S logit difference on the ABC prompts (near 0 expected).
        per_prompt: Clean logit differences ``[n]``.
        corrupted_per_prompt: Corrupted logit differences ``[n]``.
        top1_per_prompt: Whether IO is the top prediction, per prompt ``[n]``.

    ``logit_diff_ci()``, ``accuracy_ci()``, ``top1_ci()`` and ``corrupted_ci()`` give each with its
    interval over prompts (:mod:`mechlib.stats`).
    """

    logit_diff: float
    accuracy: float
    p_io: float
    top1: float
    corrupted_logit_diff: float
    per_prompt: torch.Tensor
    corrupted_per_prompt: torch.Tensor
    top1_per_prompt: Optional[torch.Tensor] = None

    def top1_ci(self, confidence: float = 0.95) -> Estimate:
        """Share of prompts whose top prediction is IO, with its exact (Clopper-Pearson) interval."""
        if self.top1_per_prompt is None:
            raise ValueError("this baseline has no per-prompt top-1 record; rebuild it with ioi_baseline()")
        return rate_ci(self.top1_per_prompt.bool().tolist(), confidence=confidence, name="IO top-1 per prompt")

    def logit_diff_ci(self, confidence: float = 0.95) -> Estimate:
        """Mean clean logit difference with its bootstrap interval over prompts."""
        return mean_ci(self.per_prompt, confidence=confidence, name="clean logit differences")

    def accuracy_ci(self, confidence: float = 0.95) -> Estimate:
        """Share of prompts with logit(IO) > logit(S), with its exact (Clopper-Pearson) interval."""
        return rate_ci((self.per_prompt > 0).tolist(), confidence=confidence, name="IO > S per prompt")

    def corrupted_ci(self, confidence: float = 0.95) -> Estimate:
        """Mean logit difference on the ABC prompts with its bootstrap interval over prompts."""
        return mean_ci(self.corrupted_per_prompt, confidence=confidence, name="corrupted logit differences")

    def __str__(self) -> str:
        return (
            f"IOI on {len(self.per_prompt)} prompts: logit diff {self.logit_diff:.3f} "
            f"(corrupted {self.corrupted_logit_diff:.3f}), IO > S in {100 * self.accuracy:.1f}%, "
            f"p(IO) {self.p_io:.3f}, IO top-1 {100 * self.top1:.1f}%"
        )


@torch.no_grad()
def ioi_baseline(model: Model, dataset: IOIDataset, *, batch_size: int = 64) -> IOIBaseline:
    """Run the model on clean and corrupted prompts and measure IOI performance.

    Example:
        >>> print(ioi_baseline(model, make_ioi_dataset(model, 50)))   # doctest: +SKIP
    """
    if not isinstance(dataset, IOIDataset):
        raise TypeError(f"dataset must be an IOIDataset (make_ioi_dataset), got {type(dataset).__name__}")
    batch_size = whole(batch_size, "batch_size", minimum=1)
    clean, corr, p_io, top1 = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        part = dataset.subset(slice(start, start + batch_size))
        both = torch.cat([part.tokens, part.corrupted_tokens]).to(model_device(model))
        logits = model(both).float().cpu()
        m = len(part)
        clean.append(logit_diff(logits[:m], part))
        corr.append(logit_diff(logits[m:], part))
        end = logits[torch.arange(m), part.pos("END")]
        p_io.append(end.softmax(-1)[torch.arange(m), part.io_ids])
        top1.append((end.argmax(-1) == part.io_ids).float())
    c, k = torch.cat(clean), torch.cat(corr)
    return IOIBaseline(
        logit_diff=float(c.mean()),
        accuracy=float((c > 0).float().mean()),
        p_io=float(torch.cat(p_io).mean()),
        top1=float(torch.cat(top1).mean()),
        corrupted_logit_diff=float(k.mean()),
        per_prompt=c,
        corrupted_per_prompt=k,
        top1_per_prompt=torch.cat(top1).bool(),
    )
