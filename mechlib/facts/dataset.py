"""mechlib's facts dataset: :class:`Fact` and the loaders :func:`load_facts`, :func:`list_relations`.

The facts are written for mechlib (``mechlib/data/facts.json``): ``{"relations": {name:
description}, "facts": [{"subject", "relation", "template", "attribute"}, ...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["Fact", "list_relations", "load_facts"]

_DATA_FILE = "facts.json"


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
