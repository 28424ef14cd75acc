"""What ``make reproduce`` publishes from the executed notebooks and their findings records.

* :func:`gather_all`: ``<reports>/findings.md`` and ``findings.json`` (via :func:`mechlib.reports.gather`);
* :func:`write_index`: ``<reports>/index.html``, the findings table (a column per model) and every
  executed notebook converted to HTML (``<reports>/executed/<notebook>--<model>.html``), linked.
  Every page works offline: nbconvert's lab template is used without the parts that load from a
  CDN (require.js, MathJax, Mermaid, widget managers), and CircuitsVis views embed their bundle
  (:mod:`mechlib.views`);
* :func:`update_readme`: the README's findings section, between ``<!-- findings:start -->`` and
  ``<!-- findings:end -->``, rendered from the records (never typed by hand): where the records
  hold several models, first what holds across models
  (:func:`mechlib.reports.render_across_models`), then the table with a column per model.

``python -m mechlib.publish [--readme] [--reports DIR]`` does all three from what ``reports/``
already holds, without executing anything.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import mechlib.precision
from mechlib.reports import by_model, gather, record_stem, render_across_models, render_by_model, reports_dir

__all__ = ["README_END", "README_START", "gather_all", "notebook_html", "update_readme", "write_index"]

REPO = Path(__file__).resolve().parent.parent
README_START = "<!-- findings:start -->"
README_END = "<!-- findings:end -->"

# nbconvert's lab template, minus every block that loads a script from a CDN.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
"""


def gather_all(
    reports: Optional[Path] = None, names: Optional[Iterable[str]] = None
) -> tuple[list[dict[str, Any]], str]:
    """Gather the findings records under ``reports`` (into ``findings.md``/``.json``); returns the
    rows and the per-model table, both restricted to the records ``names``
    (``<notebook>--<model>``) where given."""
    rows, _ = gather(reports)
    if names is not None:
        keep = set(names)
        rows = [r for r in rows if record_stem(r["notebook"], r["model"], r.get("precision")) in keep]
    return rows, render_by_model(rows)


def notebook_html(executed: Path, out: Optional[Path] = None) -> Path:
    """Convert an executed notebook to a standalone HTML page that loads nothing remote.

    Returns:
        The page's path (``out``, default: beside ``executed`` with ``.html``).
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    executed = Path(executed)
    out = Path(out) if out is not None else executed.with_suffix(".html")
    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"mechlib_offline.html.j2": _OFFLINE_TEMPLATE})],
        template_file="mechlib_offline.html.j2",
    )
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out.write_text(body, encoding="utf-8")
    return out


def _runs_log(reports: Path, runs: Iterable[Any]) -> list[dict[str, Any]]:
    """``<reports>/runs.json``: the latest run of every (notebook, model), this call's runs merged in."""
    path = reports / "runs.json"
    log = {r["name"]: r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    for run in runs:
        log[run.name] = {
            "name": run.name,
            "notebook": run.notebook,
            "model": run.model,
            "parameters": {k: repr(v) for k, v in run.parameters.items()},
            "seconds": round(run.seconds, 1),
            "error": run.error,
        }
    entries = sorted(log.values(), key=lambda r: r["name"])
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def _findings_html(rows: list[dict[str, Any]]) -> str:
    models, entries = by_model(rows)
    esc = html.escape
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    lines = [f"<table><thead><tr><th>notebook</th><th>claim</th>{head}<th>reference (source)</th></tr></thead><tbody>"]
    for e in entries:
        cells = []
        for m in models:
            text = e["cells"].get(m, "not run")
            cls = "holds" if text.startswith("yes:") else "fails" if text.startswith("NO:") else "missing"
            cells.append(f'<td class="{cls}">{esc(text)}</td>')
        lines.append(
            f"<tr><td>{esc(e['notebook'])}</td><td>{esc(e['claim'])}</td>{''.join(cells)}<td>{esc(e['reference'])}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def write_index(reports: Optional[Path] = None, runs: Iterable[Any] = ()) -> Path:
    """Convert executed notebooks to HTML (where the page is missing or older) and write
    ``<reports>/index.html``: the findings (a column per model) and a link to every executed
    notebook, with its time and status where ``<reports>/runs.json`` logged them.

    Args:
        reports: The reports folder (default :func:`~mechlib.reports.reports_dir`).
        runs: This call's :class:`mechlib.runner.Run` objects (their times and status are logged).

    Returns:
        The path of ``index.html``.
    """
    reports = Path(reports) if reports is not None else reports_dir()
    reports.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    for executed in sorted((reports / "executed").glob("*.ipynb")):
        page = executed.with_suffix(".html")
        if not page.is_file() or page.stat().st_mtime < executed.stat().st_mtime:
            notebook_html(executed)
    rows, _ = gather(reports)
    esc = html.escape
    items = []
    log = _runs_log(reports, runs)
    logged = {entry["name"] for entry in log}
    for page in sorted((reports / "executed").glob("*.html")):  # executed copies no run logged
        if page.stem not in logged:
            notebook, _, model = page.stem.partition("--")
            log.append(
                {
                    "name": page.stem,
                    "notebook": notebook,
                    "model": model,
                    "parameters": {},
                    "seconds": None,
                    "error": None,
                }
            )
    for entry in log:
        page = reports / "executed" / f"{entry['name']}.html"
        link = (
            f'<a href="executed/{esc(page.name)}">{esc(entry["notebook"])}</a>'
            if page.is_file()
            else esc(entry["notebook"])
        )
        status = "ok" if entry["error"] is None else f"FAILED: {entry['error'][:300]}"
        params = ", ".join(f"{k}={v}" for k, v in entry["parameters"].items() if k != "MODEL")
        seconds = "-" if entry["seconds"] is None else f"{entry['seconds']:.0f} s"
        items.append(
            f"<tr><td>{link}</td><td>{esc(entry['model'])}</td><td>{seconds}</td>"
            f"<td>{esc(params)}</td><td>{esc(status)}</td></tr>"
        )
    profiles = ", ".join(sorted({str(r.get("profile")) for r in rows})) or "-"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mechlib: findings</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 90em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }}
td.holds {{ background: #eef8ee; }} td.fails {{ background: #fbe9e9; }} td.missing {{ color: #888; }}
</style></head>
<body>
<h1>mechlib: what the notebooks find</h1>
<p>{len(rows)} findings, {sum(bool(r["holds"]) for r in rows)} hold (profile: {esc(profiles)}).
Written by <code>make reproduce</code> from <code>findings/*.json</code>.</p>
<h2>Notebooks</h2>
<table><thead><tr><th>notebook</th><th>model</th><th>time</th><th>parameters</th><th>status</th></tr></thead>
<tbody>
{chr(10).join(items)}
</tbody></table>
<h2>Findings</h2>
{_findings_html(rows)}
</body></html>
"""
    out = reports / "index.html"
    out.write_text(page, encoding="utf-8")
    return out


def update_readme(
    reports: Optional[Path] = None,
    *,
    complete: bool = True,
    names: Optional[Iterable[str]] = None,
    readme: Optional[Path] = None,
) -> str:
    """Rewrite the README's section between :data:`README_START` and :data:`README_END` with the
    findings table rendered from ``<reports>/findings/``.

    Args:
        complete: Whether the run was a complete, default one (every notebook, nothing injected);
            only then, and only at float32 (:mod:`mechlib.precision`), is the README rewritten, so
            a trial run never lands in it.
        names: Only these records (``<notebook>--<model>``, e.g. the runs just made); default all.
        readme: The file (default: the repository's ``README.md``).

    Returns:
        A line saying what was done.

    Raises:
        ValueError: The README lacks the markers.
    """
    reports = Path(reports) if reports is not None else reports_dir()
    readme = Path(readme) if readme is not None else REPO / "README.md"
    if not complete or mechlib.precision.current() != mechlib.precision.REFERENCE:
        return "README not rewritten: only a run of every notebook with no injected parameter, at float32, rewrites it"
    text = readme.read_text(encoding="utf-8")
    if (
        text.count(README_START) != 1
        or text.count(README_END) != 1
        or text.index(README_START) > text.index(README_END)
    ):
        raise ValueError(f"{readme} must hold {README_START} and then {README_END}, once each")
    rows, table = gather_all(reports, names)
    if not rows:
        return f"README not rewritten: {reports}/findings holds no record"
    profiles = ", ".join(sorted({str(r.get("profile")) for r in rows}))
    across = render_across_models(rows)
    if across:
        across = f"### What holds across models\n\n{across}\n### Every finding, per model\n\n"
    section = (
        f"{README_START}\n"
        "<!-- Rendered by `make reproduce` (mechlib.publish.update_readme) from reports/findings/; do not edit. -->\n"
        f"{len(rows)} findings, {sum(bool(r['holds']) for r in rows)} hold (profile: {profiles}).\n\n"
        f"{across}"
        "Each cell: whether the claim holds, then what was measured, with its interval where the claim rests on one.\n\n"
        f"{table}"
        f"{README_END}"
    )
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + section + tail, encoding="utf-8")
    return f"README findings section rewritten from {len(rows)} findings ({readme})"


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechlib.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reports", type=Path, default=None, help="reports folder (default: $MECHLIB_REPORTS or reports/)"
    )
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's findings section")
    args = parser.parse_args(None if argv is None else list(argv))
    reports = args.reports or reports_dir()
    rows, table = gather_all(reports)
    print(table)
    print(f"{len(rows)} findings; {write_index(reports)}")
    if args.readme:
        print(update_readme(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
