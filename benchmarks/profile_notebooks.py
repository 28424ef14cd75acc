"""Where a notebook's time goes: run notebooks 02 and 03 (full profile by default) under cProfile and
write the top functions to ``reports/profile_<notebook>.txt``, so the next speed-up is chosen from data.

Each notebook is read and parameterised exactly as ``mechlib.runner`` does (its ``.py`` source, the
``-p NAME=VALUE`` cell injected after the parameters cell), and its code cells are executed in one
fresh namespace in this process (plots go to the Agg backend).

Usage: python benchmarks/profile_notebooks.py [02 03] [--profile full|quick] [--top 40] [-p NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

from mechlib.runner import inject_parameters, load_notebook, parse_parameter

ROOT = Path(__file__).resolve().parent.parent


def run_profiled(source: Path, params: dict[str, object], top: int) -> tuple[float, str]:
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__main__"}
    nb = inject_parameters(load_notebook(source), params, where=source.name)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(source.parent)
    per_cell: list[tuple[int, float, str]] = []
    try:
        for index, code in enumerate(cells):
            code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
            start = time.perf_counter()
            try:
                profiler.runctx(compile(code, f"{source.name}", "exec"), namespace, namespace)
            except AssertionError as err:  # record.conclude(), the last cell, naming claims that do not hold
                if index != len(cells) - 1:
                    raise
                print(f"{source.name}: {str(err).splitlines()[0]}")
            first = next((line for line in code.splitlines() if line.strip() and not line.startswith("#")), "")
            per_cell.append((index, time.perf_counter() - start, first[:70]))
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - t0
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    out.write(f"# {source.name}: {seconds:.1f} s in all\n\n## code cells by wall time (profiled)\n")
    for index, cell_seconds, first in sorted(per_cell, key=lambda c: -c[1]):
        out.write(f"{cell_seconds:8.1f} s  cell {index:2d}  {first}\n")
    out.write("\n## by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)
    out.write("\n## by own time\n")
    stats.sort_stats("tottime").print_stats(top)
    return seconds, out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="*", default=["02", "03"], help="notebook numbers")
    ap.add_argument("--profile", default="full", choices=["full", "quick"])
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "-p", dest="params", action="append", default=[], help="NAME=VALUE, injected after the parameters cell"
    )
    args = ap.parse_args()
    os.environ["MECHLIB_PROFILE"] = args.profile
    reports = Path(os.environ.get("MECHLIB_REPORTS", ROOT / "reports"))
    reports.mkdir(parents=True, exist_ok=True)
    params = dict(parse_parameter(p) for p in args.params)
    for number in args.notebooks:
        matches = sorted((ROOT / "notebooks").glob(f"{number}_*.py"))
        if not matches:
            raise SystemExit(f"no notebooks/{number}_*.py")
        seconds, text = run_profiled(matches[0], params, args.top)
        out = reports / f"profile_{matches[0].stem}.txt"
        out.write_text(text)
        print(f"{matches[0].name} ({args.profile} profile): {seconds:.1f} s; top functions written to {out}")


if __name__ == "__main__":
    main()
