"""Execute the notebooks: shared by ``make reproduce`` and the notebook tests.

``python -m mechlib.runner [NOTEBOOK ...]`` executes each notebook (default: every
``notebooks/*.ipynb``) top to bottom in a fresh kernel, writes the executed copy under
``reports/executed/``, gathers the findings records into ``reports/findings.md`` and
``reports/findings.json``, and prints the findings table.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from mechlib.reports import gather, reports_dir

__all__ = ["execute_notebook", "notebook_paths", "main"]

REPO = Path(__file__).resolve().parent.parent


def notebook_paths(folder: Optional[Path] = None) -> list[Path]:
    """The curated notebooks, in order."""
    return sorted((Path(folder) if folder else REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute_notebook(path: Path, out_dir: Optional[Path] = None, *, timeout: int = 3600) -> Path:
    """Run ``path`` top to bottom in a fresh kernel (cwd = its folder); save the executed copy.

    The executed copy is written even when a cell fails, so the traceback can be read in
    JupyterLab; the error is then re-raised.

    Returns:
        The path of the executed copy.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    out_dir = Path(out_dir) if out_dir else reports_dir() / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("MECHLIB_REPORTS", str(reports_dir()))
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    out = out_dir / path.name
    try:
        client.execute()
    finally:
        nbformat.write(nb, out)
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [Path(a) for a in args] or notebook_paths()
    failures = []
    for path in paths:
        t0 = time.perf_counter()
        print(f"== {path.name}", flush=True)
        try:
            out = execute_notebook(path)
            print(f"   ok in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
        except Exception as e:  # keep going: report every notebook
            failures.append(path.name)
            print(f"   FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
    rows, table = gather()
    print()
    print(table)
    print(f"{len(rows)} findings, {sum(r['holds'] for r in rows)} hold; written to {reports_dir()}/findings.md")
    if failures:
        print(f"notebooks that failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
