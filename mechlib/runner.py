"""Execute the notebooks, with injected parameters, on one or several models.

Shared by ``make reproduce``, ``make test`` (``tests/test_notebooks.py``) and the command line::

    python -m mechlib.runner                                  # every notebooks/NN_*.py, default model
    python -m mechlib.runner notebooks/02_ioi_circuit.ipynb -p MODEL=gpt2-small -p N_PROMPTS=64
    python -m mechlib.runner --models "smollm2-135m gemma3-270m"   # every notebook once per model

A notebook is a pair (see ``notebooks/jupytext.toml``): ``NN_name.py``, the jupytext percent source,
and ``NN_name.ipynb``. Either path names the pair, and the runner always executes the ``.py``
(read with jupytext; no outputs, so outputs someone saved in the ``.ipynb`` never matter).

Parameters follow papermill's convention: the code cell tagged ``parameters`` holds the defaults;
``-p NAME=VALUE`` adds a cell tagged ``injected-parameters`` right after it that assigns the new
values (``VALUE`` is read as a Python literal where it is one, else as a string) and then
recomputes what the parameters cell derives from them (``N_PROMPTS = 12 if QUICK else 32``). A
name the parameters cell does not assign is an error: an injection never silently does nothing.

Each run writes the executed copy ``<reports>/executed/<notebook>--<model>.ipynb`` (also when a
cell fails, so the traceback can be read) and the notebook's findings record
``<reports>/findings/<notebook>--<model>.json``. The command line then gathers the records into
``findings.md``/``findings.json``, writes ``<reports>/index.html`` (:mod:`mechlib.publish`) and
prints the findings and a notebook x model table of seconds.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import mechlib.precision
from mechlib import publish, validate
from mechlib.reports import compare_precisions, record_stem, reports_dir

__all__ = [
    "Run",
    "execute_notebook",
    "inject_parameters",
    "load_notebook",
    "main",
    "notebook_paths",
    "parameter_names",
    "parse_parameter",
    "run_notebooks",
    "time_table",
]

REPO = Path(__file__).resolve().parent.parent
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def notebook_paths(folder: Optional[Path] = None) -> list[Path]:
    """The curated notebooks in order: every ``NN_*.py`` source (``notebooks/`` by default)."""
    return sorted((Path(folder) if folder else REPO / "notebooks").glob("[0-9][0-9]_*.py"))


def _pair(path: Path) -> tuple[Path, Path]:
    """The ``(.py, .ipynb)`` pair that ``path`` (either of them) names."""
    path = Path(path)
    if path.suffix not in (".py", ".ipynb"):
        raise ValueError(f"a notebook is a .py (jupytext percent) or .ipynb file, got {str(path)!r}")
    return path.with_suffix(".py"), path.with_suffix(".ipynb")


def load_notebook(path: Path) -> Any:
    """The notebook ``path`` names, read from its ``.py`` source (the ``.ipynb`` where no ``.py``
    exists), as an ``nbformat`` notebook without outputs.

    Raises:
        FileNotFoundError: Neither file of the pair exists.
    """
    import jupytext

    source, ipynb = _pair(path)
    if source.is_file():
        nb = jupytext.read(source)
    elif ipynb.is_file():
        nb = jupytext.read(ipynb)
    else:
        raise FileNotFoundError(f"no notebook {source} (nor {ipynb.name})")
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


def parse_parameter(text: str) -> tuple[str, Any]:
    """``"NAME=VALUE"`` -> ``(NAME, value)``: the value as a Python literal where it is one
    (``64``, ``0.5``, ``True``, ``None``, ``"'x'"``, ``[1, 2]``), else the text itself (``gpt2-small``).

    Raises:
        ValueError: No ``=``, or ``NAME`` is not a Python identifier.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"a parameter is NAME=VALUE, got {text!r}")
    name, value = (part.strip() for part in text.split("=", 1))
    if not name.isidentifier():
        raise ValueError(f"parameter name must be a Python identifier, got {name!r} (in {text!r})")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _parameters_cell(nb: Any, where: str) -> int:
    tagged = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and PARAMETERS_TAG in c.metadata.get("tags", [])
    ]
    if not tagged:
        raise ValueError(f"{where}: no code cell is tagged {PARAMETERS_TAG!r}, so nothing can be injected")
    if len(tagged) > 1:
        raise ValueError(f"{where}: cells {tagged} are all tagged {PARAMETERS_TAG!r}; tag exactly one")
    return tagged[0]


def _assignments(source: str) -> list[tuple[list[str], Any, set[str], str]]:
    """Each top-level assignment of ``source``: the names it assigns, its value where that is a
    literal assigned to one name (else ``None``), the names its value reads, and its code."""
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            try:
                single = not isinstance(node, ast.AugAssign) and all(isinstance(t, ast.Name) for t in targets)
                value = ast.literal_eval(node.value) if single else None
            except (ValueError, SyntaxError, TypeError):
                value = None
            out.append((names, value, reads, ast.get_source_segment(source, node) or ""))
    return out


def parameter_names(nb: Any, where: str = "notebook") -> dict[str, Any]:
    """The names the parameters cell assigns, each with its default where that is a literal
    (``None`` where it is computed, e.g. ``QUICK = quick()``).

    Raises:
        ValueError: The notebook has no (or more than one) cell tagged ``parameters``.
    """
    source = nb.cells[_parameters_cell(nb, where)].source
    return {name: value for names, value, _, _ in _assignments(source) for name in names}


def inject_parameters(nb: Any, parameters: dict[str, Any], where: str = "notebook") -> Any:
    """Insert a cell tagged ``injected-parameters`` after the ``parameters`` cell (replacing an
    earlier injected cell) that assigns ``parameters``, then recomputes every other assignment of
    the parameters cell that depends on them, in order (so ``-p QUICK=False`` also resizes
    ``N_PROMPTS = 12 if QUICK else 32``, and ``-p SEED=1`` also moves ``TOY_SEED = SEED``).
    Returns ``nb`` (changed in place).

    Raises:
        ValueError: No parameters cell, or a name it does not assign (a typo must not silently do
            nothing).
    """
    import nbformat

    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    index = _parameters_cell(nb, where)
    if not parameters:
        return nb
    known = parameter_names(nb, where)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: the parameters cell does not define {', '.join(unknown)}; it defines {', '.join(known)}"
        )
    lines = ["# Parameters (injected by mechlib.runner)"] + [f"{k} = {v!r}" for k, v in parameters.items()]
    changed, recomputed = set(parameters), []
    for names, _, reads, code in _assignments(nb.cells[index].source):
        if reads & changed and not set(names) & set(parameters):
            recomputed.append(code)
            changed.update(names)
    if recomputed:
        lines += ["# ... and what the parameters cell computes from them"] + recomputed
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]}))
    return nb


@dataclass
class Run:
    """One notebook executed on one model.

    Attributes:
        notebook: The notebook's stem (``02_ioi_circuit``).
        model: The model it ran on (the injected ``MODEL``, else the parameters cell's default).
        parameters: What was injected.
        executed: The executed copy (written also when a cell failed).
        seconds: Wall time of the execution.
        error: ``None`` where every cell ran, else the error, shortened.
    """

    notebook: str
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    executed: Optional[Path] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def name(self) -> str:
        """``<notebook>--<model>``: the stem of the executed copy and of the findings record."""
        return record_stem(self.notebook, self.model)

    @property
    def ok(self) -> bool:
        return self.error is None


def execute_notebook(
    path: Path,
    out_dir: Optional[Path] = None,
    *,
    parameters: Optional[dict[str, Any]] = None,
    reports: Optional[Path] = None,
    timeout: int = 3600,
    threads: Optional[int] = None,
) -> Run:
    """Run the notebook ``path`` names (its ``.py`` source) top to bottom in a fresh kernel,
    whose cwd is the notebook's folder and whose ``$MECHLIB_REPORTS`` is ``reports``.

    Args:
        path: ``notebooks/NN_name.py`` or ``.ipynb``.
        out_dir: Where the executed copy goes; default ``<reports>/executed``.
        parameters: Values to inject (see :func:`inject_parameters`).
        reports: The reports folder the notebook's findings record is saved under; default
            :func:`~mechlib.reports.reports_dir`.
        timeout: Seconds a single cell may take.
        threads: The kernel's ``$MECHLIB_THREADS`` (torch's intra-op threads); default this
            process's environment.

    Returns:
        The :class:`Run`; its ``error`` says what failed (the executed copy holds the traceback).

    Raises:
        ValueError: Bad parameters (before any execution).
    """
    import nbformat
    from nbclient import NotebookClient

    source, _ = _pair(path)
    nb = load_notebook(path)
    parameters = dict(parameters or {})
    inject_parameters(nb, parameters, where=source.name)
    model = parameters.get("MODEL", parameter_names(nb, source.name).get("MODEL")) or "default"
    reports = Path(reports) if reports is not None else reports_dir()
    out_dir = Path(out_dir) if out_dir is not None else reports / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(source.stem, str(model), parameters)
    run.executed = out_dir / f"{run.name}.ipynb"
    (reports / "findings" / f"{run.name}.json").unlink(missing_ok=True)  # a crash must not leave an old record
    env = {**os.environ, "MECHLIB_REPORTS": str(reports)}
    if threads is not None:
        env["MECHLIB_THREADS"] = str(int(threads))
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}}
    )
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
    except Exception as e:  # the executed copy keeps the traceback; the caller decides
        run.error = error_summary(e)
    finally:
        run.seconds = time.perf_counter() - t0
        nbformat.write(nb, run.executed)
    return run


def error_summary(e: BaseException, limit: int = 3000) -> str:
    """What failed, in one string: a failing cell's own exception (name and message, from its
    head: ``record.conclude()`` names the claims that do not hold first) rather than the tail of
    nbclient's report, which may cut that first line off."""
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    text = f"{ename}: {evalue}" if ename is not None and evalue is not None else str(e)
    if len(text) > limit:
        text = f"{text[: limit - 500]} [...] {text[-400:]}"
    return f"{type(e).__name__}: {text}"


def notebook_dependencies(path: Path) -> set[str]:
    """The notebooks whose findings records the notebook ``path`` reads
    (``FindingsRecord.load("02_ioi_circuit", MODEL)``): on the same model, they run before it."""
    source = _pair(Path(path))[0].read_text(encoding="utf-8")
    return set(re.findall(r"FindingsRecord\.load\(\s*[\"'](\w+)[\"']", source))


def run_notebooks(
    paths: Sequence[Path],
    *,
    models: Optional[Sequence[str]] = None,
    parameters: Optional[dict[str, Any]] = None,
    reports: Optional[Path] = None,
    timeout: int = 3600,
    jobs: int = 1,
    log=print,
) -> list[Run]:
    """Execute every notebook (once per model where ``models`` is given, with ``MODEL`` injected),
    keeping going past failures.

    Args:
        jobs: How many notebooks run at once, each in its own kernel. With more than one, each
            kernel gets ``cores // jobs`` torch threads (unless ``$MECHLIB_THREADS`` says
            otherwise), runs start in the given order, and a notebook that reads the findings
            record of one listed before it (:func:`notebook_dependencies`) starts after that one
            has ended on the same model, so the records read are those of a run one at a time.

    Returns:
        The runs, in the order of ``paths`` x ``models`` whatever order they ended in.

    Raises:
        ValueError: ``MODEL`` both in ``parameters`` and through ``models``; bad parameters for any
            notebook (checked for all of them before the first one runs); ``jobs`` below 1
            (``TypeError`` where it is not a whole number).
    """
    parameters = dict(parameters or {})
    models = list(models or [])
    if models and "MODEL" in parameters:
        raise ValueError("give the model either as -p MODEL=... or through --models, not both")
    jobs = validate.whole(jobs, "jobs", minimum=1)
    plans = [(Path(p), {**parameters, **({"MODEL": m} if m else {})}) for p in paths for m in (models or [None])]
    for path, params in plans:  # every injection is checked before anything runs
        inject_parameters(load_notebook(path), params, where=_pair(path)[0].name)
    threads = None
    if jobs > 1 and not os.environ.get("MECHLIB_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // jobs)

    def start(i: int) -> Run:
        path, params = plans[i]
        shown = " ".join(f"{k}={v!r}" for k, v in params.items())
        log(f"== {_pair(path)[0].stem} {shown}".rstrip())
        return execute_notebook(path, parameters=params, reports=reports, timeout=timeout, threads=threads)

    def finished(run: Run) -> None:
        where = f" ({run.name})" if jobs > 1 else ""
        log(f"   {'ok' if run.ok else 'FAILED'}{where} in {run.seconds:.0f} s -> {run.executed}")
        if not run.ok:
            log(f"   {run.error}")

    if jobs == 1:
        runs = []
        for i in range(len(plans)):
            runs.append(start(i))
            finished(runs[-1])
        return runs

    stems = [_pair(path)[0].stem for path, _ in plans]
    needs = {
        i: {j for j in range(i) if plans[j][1].get("MODEL") == plans[i][1].get("MODEL") and stems[j] in deps}
        for i, deps in ((i, notebook_dependencies(plans[i][0])) for i in range(len(plans)))
    }
    done: dict[int, Run] = {}
    running: dict[concurrent.futures.Future, int] = {}
    waiting = list(range(len(plans)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while waiting or running:
            for i in [i for i in waiting if needs[i] <= done.keys()][: jobs - len(running)]:
                waiting.remove(i)
                running[pool.submit(start, i)] = i
            ended, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in ended:
                done[running.pop(future)] = run = future.result()
                finished(run)
    return [done[i] for i in range(len(plans))]


def time_table(runs: Iterable[Run], wall: Optional[float] = None) -> str:
    """Seconds per notebook (rows) and model (columns), as a plain-text table; ``wall``: the
    whole run's wall time, printed beside the sum where notebooks ran side by side."""
    runs = list(runs)
    models = list(dict.fromkeys(r.model for r in runs))
    notebooks = list(dict.fromkeys(r.notebook for r in runs))
    cell = {(r.notebook, r.model): f"{r.seconds:.0f} s" + ("" if r.ok else " FAILED") for r in runs}
    width = max([len("notebook")] + [len(n) for n in notebooks])
    cols = [max(len(m), 10) for m in models]
    lines = ["notebook".ljust(width) + "".join(f"  {m:>{w}}" for m, w in zip(models, cols))]
    for n in notebooks:
        lines.append(n.ljust(width) + "".join(f"  {cell.get((n, m), '-'):>{w}}" for m, w in zip(models, cols)))
    total = sum(r.seconds for r in runs)
    lines.append(f"total {total:.0f} s" + ("" if wall is None else f" of notebook time in {wall:.0f} s of wall time"))
    return "\n".join(lines)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks/NN_name.py or .ipynb (default: every one)")
    parser.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="inject a value after the parameters cell (repeatable)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="run every notebook once per model (space- or comma-separated), "
        "with MODEL injected; default: the notebook's own MODEL",
    )
    parser.add_argument(
        "--reports", type=Path, default=None, help="reports folder (default: $MECHLIB_REPORTS or reports/)"
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a single cell may take")
    parser.add_argument("--no-html", action="store_true", help="do not write <reports>/index.html")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="notebooks run at once, each kernel with cores/jobs torch threads (default 1: one at a time)",
    )
    return parser


def main(argv: Optional[Iterable[str]] = None, *, readme: bool = False, prog: str = "python -m mechlib.runner") -> int:
    """The command line; ``readme=True`` (``make reproduce``) also rewrites the README's findings
    section, where the run was a complete, default one (see :func:`mechlib.publish.update_readme`)."""
    args = _parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    models = [m for m in args.models.replace(",", " ").split() if m]
    paths = args.notebooks or notebook_paths()
    reports = args.reports or reports_dir()
    try:
        parameters = dict(parse_parameter(p) for p in args.parameter)
        t0 = time.perf_counter()
        runs = run_notebooks(
            paths, models=models, parameters=parameters, reports=reports, timeout=args.timeout, jobs=args.jobs
        )
        wall = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, table = publish.gather_all(reports, [r.name for r in runs])
    print()
    print(table)
    print(f"{len(rows)} findings, {sum(bool(r['holds']) for r in rows)} hold; written to {reports}/findings.md")
    if not args.no_html:
        print(f"notebooks and findings as HTML: {publish.write_index(reports, runs)}")
    if readme:
        complete = not args.notebooks and not parameters
        print(publish.update_readme(reports, complete=complete, names=[r.name for r in runs]))
    print()
    print(time_table(runs, wall if args.jobs > 1 else None))
    if mechlib.precision.current() != mechlib.precision.REFERENCE:
        names = [record_stem(r.notebook, r.model, mechlib.precision.REFERENCE) for r in runs]
        _, text = compare_precisions(reports, names)
        print()
        print(text)
        (Path(reports) / f"precision-{mechlib.precision.current()}.txt").write_text(text + "\n")
    failures = [r.name for r in runs if not r.ok]
    if failures:
        print(f"notebooks that failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
