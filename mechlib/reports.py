"""Findings records: what every notebook measured, beside the published figure, asserted.

Every notebook ends the same way::

    record = FindingsRecord("01_induction_heads", model=MODEL)
    record.add(
        claim="Top induction head scores above 0.5",
        measured=top_score, reference="GPT-2 small: 5.1, 5.5, 6.9, 7.2, 7.10",
        source="Olsson et al. 2022", holds=top_score > 0.5,
    )
    record.save()          # reports/findings/01_induction_heads--smollm2-135m.json
    record.assert_all()    # the notebook fails if a finding does not hold

``make reproduce`` then gathers every record into ``reports/findings.md`` and
``reports/findings.json`` (see :func:`gather`).

Run profiles: ``make test`` sets ``MECHLIB_PROFILE=quick`` so notebooks may take smaller
parameters (fewer prompts, facts, samples); ``make reproduce`` runs ``full``. A notebook's
assertions must hold on both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import mechlib.precision
from mechlib.stats import Estimate

__all__ = [
    "Finding",
    "FindingsRecord",
    "across_models",
    "compare_precisions",
    "gather",
    "profile",
    "quick",
    "record_stem",
    "render_across_models",
    "render_by_model",
    "render_table",
    "reports_dir",
]


def profile() -> str:
    """The run profile: ``$MECHLIB_PROFILE`` (``quick`` under ``make test``), else ``full``."""
    value = os.environ.get("MECHLIB_PROFILE", "full").strip().lower()
    if value not in ("quick", "full"):
        raise ValueError(f"MECHLIB_PROFILE must be 'quick' or 'full', got {value!r}")
    return value


def quick() -> bool:
    """True under ``make test`` (``MECHLIB_PROFILE=quick``)."""
    return profile() == "quick"


def reports_dir() -> Path:
    """``$MECHLIB_REPORTS``, else ``reports/`` at the repository root (found from the cwd)."""
    env = os.environ.get("MECHLIB_REPORTS")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "mechlib").is_dir():
            return folder / "reports"
    return here / "reports"


def record_stem(notebook: str, model: str, precision: Optional[str] = None) -> str:
    """``<notebook>--<model>``: the file stem of a findings record and of an executed notebook
    (a ``/`` in a model name becomes ``_``). A run at a precision other than float32 (the
    ``bfloat16`` opt-in, :mod:`mechlib.precision`; default the one in force) adds
    ``--<precision>``, so its records never overwrite float32's."""
    precision = mechlib.precision.resolve(precision)
    stem = f"{notebook}--{str(model).replace('/', '_')}"
    return stem if precision == mechlib.precision.REFERENCE else f"{stem}--{precision}"


def _jsonable(value: Any) -> Any:
    """Plain JSON for numbers, tensors, numpy scalars, tuples and nested containers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class Finding:
    """One claim a notebook checks.

    Attributes:
        claim: The statement, in words, e.g. "ablating the top-5 induction heads raises
            second-repeat loss at least 5x more than 5 random heads".
        measured: What this run measured (a number, or a small dict / list of labels).
        reference: The published figure to set beside it (or "" where none applies).
        source: Where the reference comes from (paper, section).
        holds: Whether the measurement supports the claim.
        details: Anything else worth keeping (thresholds, parameters, per-item values).
        interval: The measured value's :class:`~mechlib.stats.Estimate` as a dict (value, low,
            high, n, confidence, method), where the claim rests on one.
    """

    claim: str
    measured: Any
    reference: Any = ""
    source: str = ""
    holds: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    interval: Optional[dict[str, Any]] = None


@dataclass
class FindingsRecord:
    """The findings of one notebook run on one model."""

    notebook: str
    model: str
    findings: list[Finding] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        claim: str,
        measured: Any,
        *,
        holds: bool,
        reference: Any = "",
        source: str = "",
        **details: Any,
    ) -> Finding:
        """Record one finding; ``holds`` is the notebook's own test of its measurement."""
        finding = Finding(claim, measured, reference, source, bool(holds), dict(details))
        self.findings.append(finding)
        return finding

    def check(
        self,
        claim: str,
        estimate: Estimate,
        *,
        above: Optional[float] = None,
        below: Optional[float] = None,
        reference: Any = "",
        source: str = "",
        **details: Any,
    ) -> Finding:
        """Record a claim about an interval: it holds only where the *whole* interval clears
        ``above`` (its low end is greater) and/or ``below`` (its high end is smaller).

        Args:
            claim: The statement, in words.
            estimate: The measured :class:`~mechlib.stats.Estimate` (``mean_ci``, ``rate_ci``).
            above: The claim is "the value exceeds this".
            below: The claim is "the value is under this".

        Example:
            >>> from mechlib.stats import mean_ci                                   # doctest: +SKIP
            >>> record.check("IO beats S on average", mean_ci(logit_diffs), above=0.0)  # doctest: +SKIP
        """
        if not isinstance(estimate, Estimate):
            raise TypeError(
                f"estimate must be a mechlib.stats.Estimate (mean_ci, rate_ci), got {type(estimate).__name__}"
            )
        if above is None and below is None:
            raise ValueError("check needs a threshold: pass above=, below= or both")
        holds = (above is None or estimate.above(above)) and (below is None or estimate.below(below))
        thresholds = {k: v for k, v in (("above", above), ("below", below)) if v is not None}
        finding = Finding(
            claim, estimate.value, reference, source, bool(holds), {**thresholds, **details}, estimate.to_dict()
        )
        self.findings.append(finding)
        return finding

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "notebook": self.notebook,
                "model": self.model,
                "profile": profile(),
                "precision": mechlib.precision.current(),
                "parameters": self.parameters,
                "findings": [asdict(f) for f in self.findings],
            }
        )

    def save(self, folder: Optional[Path] = None) -> Path:
        """Write ``<reports>/findings/<notebook>--<model>.json`` (one record per notebook and
        model, see :func:`record_stem`) and return its path."""
        out = Path(folder) if folder is not None else reports_dir() / "findings"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{record_stem(self.notebook, self.model)}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, notebook: str, model: str, folder: Optional[Path] = None) -> Optional["FindingsRecord"]:
        """The record a run of ``notebook`` on ``model`` saved (``None`` where there is none yet):
        records are the notebooks' API, so one notebook can build on another's findings."""
        root = Path(folder) if folder is not None else reports_dir() / "findings"
        path = root / f"{record_stem(notebook, model)}.json"
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            findings = [Finding(**f) for f in d["findings"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a findings record ({type(e).__name__}: {e}); delete it and re-run {notebook}"
            ) from e
        return cls(d["notebook"], d["model"], findings, d.get("parameters", {}))

    def detail(self, name: str) -> Any:
        """The detail ``name`` of the first finding that records it (e.g. notebook 02's ``circuit``).

        Raises:
            KeyError: No finding records it; the message lists the details there are.
        """
        for f in self.findings:
            if name in f.details:
                return f.details[name]
        known = sorted({k for f in self.findings for k in f.details})
        raise KeyError(f"{self.notebook} on {self.model} records no detail {name!r}; it records {known}")

    def table(self) -> "Table":
        """The findings as a Markdown table (a ``str``); Jupyter renders it as a table."""
        return Table(
            render_table([{"notebook": self.notebook, "model": self.model, **asdict(f)} for f in self.findings])
        )

    def conclude(self, folder: Optional[Path] = None) -> Path:
        """A notebook's last step: :meth:`save` the record, print its :meth:`table`, then
        :meth:`assert_all` (so a finding that does not hold fails the run after it is saved).

        Returns:
            The path of the saved JSON.
        """
        path = self.save(folder)
        print(self.table())
        self.assert_all()
        return path

    def assert_all(self) -> None:
        """Raise ``AssertionError`` listing every finding that does not hold."""
        if not self.findings:
            raise AssertionError(f"{self.notebook}: no findings were recorded")
        failed = [f for f in self.findings if not f.holds]
        if failed:
            lines = "\n".join(f"- {f.claim}: measured {f.measured!r} (reference {f.reference!r})" for f in failed)
            raise AssertionError(f"{self.notebook} on {self.model}: {len(failed)} finding(s) do not hold:\n{lines}")


class Table(str):
    """A Markdown table that Jupyter displays rendered (``print`` still shows the text)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def render_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of findings rows (notebook, model, claim, measured, reference, holds)."""
    header = "| notebook | model | claim | measured | reference (source) | holds |\n|---|---|---|---|---|---|\n"
    body = []
    for r in rows:
        ref = _fmt(r.get("reference", ""))
        if r.get("source"):
            ref = f"{ref} ({r['source']})" if ref else f"({r['source']})"
        measured = _fmt(r["measured"])
        iv = r.get("interval")
        if isinstance(iv, dict) and "low" in iv:
            measured = f"{measured} [{_fmt(iv['low'])}, {_fmt(iv['high'])}] (n={iv.get('n')})"
        cells = [r["notebook"], r["model"], r["claim"], measured, ref, "yes" if r["holds"] else "NO"]
        body.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return header + "\n".join(body) + "\n"


def _measured_cell(row: dict[str, Any]) -> str:
    measured = _fmt(row["measured"])
    iv = row.get("interval")
    if isinstance(iv, dict) and "low" in iv:
        measured = f"{measured} [{_fmt(iv['low'])}, {_fmt(iv['high'])}] (n={iv.get('n')})"
    return f"{'yes' if row['holds'] else 'NO'}: {measured}"


def by_model(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Findings rows regrouped with one entry per (notebook, claim) and a cell per model.

    Returns:
        The models (in order of appearance) and the entries: ``notebook``, ``claim``, ``reference``
        (with its source) and ``cells`` (model -> "yes/NO: measured [low, high] (n=...)").
    """
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        ref = _fmt(r.get("reference", ""))
        if r.get("source"):
            ref = f"{ref} ({r['source']})" if ref else f"({r['source']})"
        entry = entries.setdefault(
            (r["notebook"], r["claim"]), {"notebook": r["notebook"], "claim": r["claim"], "reference": ref, "cells": {}}
        )
        entry["cells"][str(r["model"])] = _measured_cell(r)
    return models, list(entries.values())


def render_by_model(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of findings with a column per model (what each measured; holds or NO)."""
    models, entries = by_model(rows)
    header = "| notebook | claim | " + " | ".join(models) + " | reference (source) |\n"
    header += "|---|---|" + "---|" * len(models) + "---|\n"
    body = []
    for e in entries:
        cells = [e["notebook"], e["claim"], *(e["cells"].get(m, "not run") for m in models), e["reference"]]
        body.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return header + "\n".join(body) + "\n"


def across_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What holds across models, per notebook, from findings rows (several models' records).

    Returns:
        One entry per notebook, in order of appearance: ``notebook``, ``models`` (every model of
        ``rows``), ``claims`` (how many), ``everywhere`` (claims that hold on every model),
        ``some`` (``(claim, holds_on, fails_on)`` for claims that hold on some models and not on
        others), ``nowhere`` (claims that hold on no model that ran them), ``missing``
        (``(claim, models)`` for claims some model has no record of: not run there, or a claim
        only one model's run makes) and ``not_applicable`` (``(claim, models)`` where a record
        marks the claim ``applicable=False``, e.g. self-explanations on a base model; such a claim
        counts as not holding there). A claim is counted in ``everywhere`` only where every model
        ran it and it holds on each.
    """
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    status: dict[str, dict[str, dict[str, bool]]] = {}
    inapplicable: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        status.setdefault(r["notebook"], {}).setdefault(r["claim"], {})[str(r["model"])] = bool(r["holds"])
        if not r["holds"] and (r.get("details") or {}).get("applicable") is False:
            inapplicable.setdefault((r["notebook"], r["claim"]), []).append(str(r["model"]))
    out = []
    for notebook, claims in status.items():
        entry: dict[str, Any] = {
            "notebook": notebook,
            "models": models,
            "claims": len(claims),
            "everywhere": [],
            "some": [],
            "nowhere": [],
            "missing": [],
            "not_applicable": [],
        }
        for claim, per_model in claims.items():
            held = [m for m in models if per_model.get(m) is True]
            failed = [m for m in models if per_model.get(m) is False]
            absent = [m for m in models if m not in per_model]
            if absent:
                entry["missing"].append((claim, absent))
            if (notebook, claim) in inapplicable:
                entry["not_applicable"].append((claim, inapplicable[(notebook, claim)]))
            if held and failed:
                entry["some"].append((claim, held, failed))
            elif held and not absent:
                entry["everywhere"].append(claim)
            elif failed and not held:
                entry["nowhere"].append(claim)
        out.append(entry)
    return out


def render_across_models(rows: list[dict[str, Any]]) -> str:
    """A Markdown summary of :func:`across_models`: per notebook, how many claims hold on every
    model, and the claims that hold on some models but not on others (named, grouped by where they
    hold), on none, are not applicable on a model, or lack a model's record. Empty where ``rows``
    hold fewer than two models."""
    entries = across_models(rows)
    if not entries or len(entries[0]["models"]) < 2:
        return ""
    models = entries[0]["models"]

    def listed(claims: list[str]) -> str:
        return "; ".join(f"“{c}”" for c in claims)

    lines = [
        f"Models: {', '.join(models)}. Per notebook: how many claims hold on every model, then, named, the claims "
        "that hold on some models and not on others, or on none.",
        "",
    ]
    for e in entries:
        parts = [f"**{e['notebook']}**: {len(e['everywhere'])} of {e['claims']} claims hold on every model."]
        na = {claim: ms for claim, ms in e["not_applicable"]}
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
        for claim, held, failed in e["some"]:
            groups.setdefault((tuple(held), tuple(failed)), []).append(claim)
        for (held, failed), claims in groups.items():
            applicable = [c for c in claims if not set(failed) & set(na.get(c, ()))]
            if applicable:
                parts.append(f"Holds on {', '.join(held)} but not on {', '.join(failed)}: {listed(applicable)}.")
        by_models: dict[tuple[str, ...], list[str]] = {}
        for claim, ms in e["not_applicable"]:
            by_models.setdefault(tuple(ms), []).append(claim)
        for ms, claims in by_models.items():
            parts.append(f"Not applicable on {', '.join(ms)} (counted as not holding): {listed(claims)}.")
        nowhere = [c for c in e["nowhere"] if c not in na]
        if nowhere:
            parts.append(f"Holds on no model: {listed(nowhere)}.")
        absent: dict[tuple[str, ...], list[str]] = {}
        for claim, ms in e["missing"]:
            absent.setdefault(tuple(ms), []).append(claim)
        for ms, claims in absent.items():
            parts.append(f"No record on {', '.join(ms)}: {listed(claims)}.")
        lines.append("* " + " ".join(parts))
    return "\n".join(lines) + "\n"


def _precision_of(record: dict[str, Any]) -> str:
    return record.get("precision") or mechlib.precision.REFERENCE  # records from before the setting: float32


def gather(folder: Optional[Path] = None) -> tuple[list[dict[str, Any]], str]:
    """Collect ``<reports>/findings/*.json`` into ``findings.json`` and ``findings.md`` (where
    several models ran, the table with a column per model comes first). Only the records of the
    precision in force are gathered (float32 by default; :mod:`mechlib.precision`).

    Returns:
        The flat list of findings rows and the Markdown table.
    """
    root = Path(folder) if folder is not None else reports_dir()
    rows: list[dict[str, Any]] = []
    precision = mechlib.precision.current()
    for path in sorted((root / "findings").glob("*.json")):
        record = json.loads(path.read_text())
        if _precision_of(record) != precision:
            continue
        for f in record["findings"]:
            rows.append(
                {
                    "notebook": record["notebook"],
                    "model": record["model"],
                    "profile": record.get("profile"),
                    "precision": precision,
                    **f,
                }
            )
    table = render_table(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "findings.json").write_text(json.dumps(rows, indent=2) + "\n")
    several = len({r["model"] for r in rows}) > 1
    per_model = render_by_model(rows) + "\n" if several else ""
    across = "## What holds across models\n\n" + render_across_models(rows) + "\n" if several else ""
    (root / "findings.md").write_text("# Findings\n\n" + across + per_model + table)
    return rows, table


def _numbers_apart(a: Any, b: Any) -> tuple[Optional[float], bool]:
    """The largest absolute difference between the numbers of two measurements of the same
    shape, and whether everything else (labels, shapes) is equal. ``(None, equal)`` where
    neither holds a number."""
    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(v, (int, float)) for v in (a, b)):
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            parts = [_numbers_apart(a[k], b[k]) for k in a]
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            parts = [_numbers_apart(x, y) for x, y in zip(a, b)]
        else:
            return None, a == b
        diffs = [d for d, _ in parts if d is not None]
        return (max(diffs) if diffs else None), all(same for _, same in parts)
    return abs(float(a) - float(b)), True


def compare_precisions(
    folder: Optional[Path] = None, names: Optional[list[str]] = None, precision: Optional[str] = None
) -> tuple[list[dict[str, Any]], str]:
    """Every finding of a run at ``precision`` (default: the one in force) beside the float32
    record of the same notebook and model in ``<folder>/findings``: the largest difference
    between their measured values (and interval ends), and whether the claim's verdict moved.

    Args:
        folder: The reports folder (default :func:`reports_dir`).
        names: Only these records (``record_stem(notebook, model)`` stems without the
            precision); default every record at ``precision``.
        precision: The precision compared with float32.

    Returns:
        One row per finding (``notebook``, ``model``, ``claim``, ``float32``, ``<precision>``,
        ``max_abs_diff``, ``same_labels``, ``holds_float32``, ``holds``; ``reference`` is
        ``None`` where no float32 record has the claim) and the rows as text, ending with the
        largest difference seen.
    """
    precision = mechlib.precision.resolve(precision)
    root = Path(folder) if folder is not None else reports_dir()
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for path in sorted((root / "findings").glob("*.json")):
        record = json.loads(path.read_text())
        if _precision_of(record) != precision or precision == mechlib.precision.REFERENCE:
            continue
        stem = record_stem(record["notebook"], record["model"], mechlib.precision.REFERENCE)
        if names is not None and stem not in names:
            continue
        ref_path = root / "findings" / f"{stem}.json"
        ref = json.loads(ref_path.read_text()) if ref_path.is_file() else None
        if ref is not None and _precision_of(ref) != mechlib.precision.REFERENCE:
            ref = None
        if ref is None:
            missing.append(stem)
        by_claim = {f["claim"]: f for f in (ref or {}).get("findings", [])}
        for f in record["findings"]:
            r = by_claim.get(f["claim"])
            row = {"notebook": record["notebook"], "model": record["model"], "claim": f["claim"]}
            row.update({precision: f["measured"], "holds": f["holds"]})
            if r is None:
                row.update({"float32": None, "max_abs_diff": None, "same_labels": None, "holds_float32": None})
            else:
                diff, same = _numbers_apart(r["measured"], f["measured"])
                if r.get("interval") and f.get("interval"):
                    ends = [_numbers_apart(r["interval"][k], f["interval"][k])[0] for k in ("low", "high")]
                    diff = max([d for d in [diff, *ends] if d is not None], default=None)
                row.update({"float32": r["measured"], "max_abs_diff": diff, "same_labels": same})
                row["holds_float32"] = r["holds"]
            rows.append(row)
    lines = [f"{precision} against float32 (largest absolute difference per finding; verdicts that moved marked !)"]
    for row in rows:
        if row["holds_float32"] is None:
            lines.append(f"  {row['notebook']} / {row['model']} / {row['claim']}: no float32 record")
            continue
        d = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.3g}"
        labels = "" if row["same_labels"] else ", labels differ"
        moved = "" if row["holds"] == row["holds_float32"] else f" ! holds {row['holds_float32']} -> {row['holds']}"
        lines.append(f"  {row['notebook']} / {row['model']} / {row['claim']}: {d}{labels}{moved}")
    diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    moved = sum(r["holds_float32"] is not None and r["holds"] != r["holds_float32"] for r in rows)
    lines.append(
        f"largest difference {max(diffs):.3g} over {len(diffs)} numeric findings; {moved} verdict(s) moved"
        if diffs
        else "no finding to compare"
    )
    if missing:
        lines.append(
            f"no float32 record for {', '.join(missing)} in {root / 'findings'}: run the same notebooks at float32 "
            "into this reports folder (make reproduce) to compare"
        )
    return rows, "\n".join(lines)
