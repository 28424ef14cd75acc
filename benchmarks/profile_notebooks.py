"""Where a notebook's time goes: run notebooks 02 and 03 (full profile by default) under cProfile and
write the top functions to ``reports/profile_<notebook>.txt``, so the next speed-up is chosen from data.

Each notebook is read and parameterised exactly as ``mechlib.runner`` does (its ``.py`` source, the
``-p NAME=VALUE`` cell injected after the parameters cell), and its code cells are executed in one
fresh namespace in this process (plots go to the Agg backend).

With ``--flops``, each notebook runs under :class:`flopmeter.FlopMeter` instead of cProfile: it counts
every matrix multiply the notebook executes (the engine's, the bridge's forwards and backwards,
scikit-learn aside), times a bare GEMM of each shape, and prints the notebook's
``flops <achieved> peak <GEMM> (<percent>% of peak)`` line and how long its GEMMs alone would take at
that peak: a floor on this machine for any code that runs the same matrix multiplies (only running
fewer goes below it). With several runs it ends with their totals. NumPy's BLAS (scikit-learn's
probes) and attention kernels are not counted: they are time, not FLOPs, so the floor is if anything low.

Usage: python benchmarks/profile_notebooks.py [02 03] [--profile full|quick] [--top 40] [--flops]
       [--models "smollm2-135m gemma3-270m"] [-p NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import torch
from flopmeter import FlopMeter

from mechlib.runner import inject_parameters, load_notebook, parse_parameter

ROOT = Path(__file__).resolve().parent.parent


def _cells(source: Path, params: dict[str, object]) -> list[str]:
    """The notebook's code cells as the runner runs them, magics and shell lines dropped."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    nb = inject_parameters(load_notebook(source), params, where=source.name)
    return [
        "\n".join(line for line in c.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for c in nb.cells
        if c.cell_type == "code"
    ]


def _run_cell(code: str, source: Path, namespace: dict, last: bool) -> None:
    try:
        exec(compile(code, f"{source.name}", "exec"), namespace, namespace)
    except AssertionError as err:  # record.conclude(), the last cell, naming claims that do not hold
        if not last:
            raise
        print(f"{source.name}: {str(err).splitlines()[0]}")


def run_counted(source: Path, params: dict[str, object]) -> tuple[float, float, str]:
    """Run the notebook with every GEMM counted: its seconds under the counter, the seconds of its
    GEMMs alone at the measured peak (the floor), and a text giving both and its FLOPs and rate."""
    cells = _cells(source, params)
    namespace: dict[str, object] = {"__name__": "__main__"}
    meter = FlopMeter()
    cwd = os.getcwd()
    os.chdir(source.parent)
    t0 = time.perf_counter()
    try:
        with meter.count():
            for index, code in enumerate(cells):
                _run_cell(code, source, namespace, index == len(cells) - 1)
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - t0  # with the counting mode on: a little slower than a plain run
    floor = meter.peak_seconds()  # timing every shape's GEMM: measured once, for both lines below
    text = (
        f"{source.name}: {seconds:.1f} s under the counter; {meter.summary()}\n"
        f"{meter.line(seconds, floor)}\n"
        f"its GEMMs alone at that peak: {floor:.1f} s ({100 * floor / seconds:.0f}% of the run)\n"
    )
    return seconds, floor, text


def run_profiled(source: Path, params: dict[str, object], top: int) -> tuple[float, str]:
    namespace: dict[str, object] = {"__name__": "__main__"}
    cells = _cells(source, params)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(source.parent)
    per_cell: list[tuple[int, float, str]] = []
    try:
        for index, code in enumerate(cells):
            start = time.perf_counter()
            profiler.enable()
            try:
                _run_cell(code, source, namespace, index == len(cells) - 1)
            finally:
                profiler.disable()
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
    ap.add_argument("--flops", action="store_true", help="count GEMM FLOPs and print the floor (no cProfile)")
    ap.add_argument(
        "--models",
        default="",
        help='run each notebook on each of these models (space-separated; -p MODEL=... for one), e.g. "smollm2-135m gemma3-270m"',
    )
    ap.add_argument(
        "-p", dest="params", action="append", default=[], help="NAME=VALUE, injected after the parameters cell"
    )
    args = ap.parse_args()
    os.environ["MECHLIB_PROFILE"] = args.profile
    reports = Path(os.environ.get("MECHLIB_REPORTS", ROOT / "reports"))
    reports.mkdir(parents=True, exist_ok=True)
    params = dict(parse_parameter(p) for p in args.params)
    if args.models and "MODEL" in params:
        raise SystemExit("give the models by --models or by -p MODEL=..., not both")
    runs = [(n, {**params, "MODEL": m}) for m in args.models.split() for n in args.notebooks] or [
        (n, params) for n in args.notebooks
    ]
    totals = [0.0, 0.0]  # --flops: seconds under the counter, seconds at the GEMM peak
    for number, run_params in runs:
        matches = sorted((ROOT / "notebooks").glob(f"{number}_*.py"))
        if not matches:
            raise SystemExit(f"no notebooks/{number}_*.py")
        model = run_params.get("MODEL", "its own MODEL")
        if args.flops:
            seconds, floor, text = run_counted(matches[0], run_params)
            totals = [totals[0] + seconds, totals[1] + floor]
            print(f"== {matches[0].name} on {model} ({args.profile} profile)\n{text}", end="", flush=True)
            continue
        seconds, text = run_profiled(matches[0], run_params, args.top)
        out = reports / f"profile_{matches[0].stem}.txt"
        out.write_text(text)
        print(f"{matches[0].name} ({args.profile} profile): {seconds:.1f} s; top functions written to {out}")
    if args.flops and len(runs) > 1:
        print(
            f"all {len(runs)} runs: {totals[0]:.1f} s under the counter; their GEMMs alone at the peak: "
            f"{totals[1]:.1f} s ({100 * totals[1] / totals[0]:.0f}%), on {torch.get_num_threads()} thread(s)"
        )


if __name__ == "__main__":
    main()
