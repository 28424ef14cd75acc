"""Benchmark: activation collection throughput and a full layer sweep of probes with control tasks.

Prints (1) tokens/s of collecting the residual stream at every layer for the part-of-speech data
(one forward pass per batch, every hook at once), (2) the wall time of a sweep over every layer
(``n_layers + 1`` residual streams) x linear and MLP probes x task and control x seeds, per fit
and in all, with the peaks it finds. Run: python benchmarks/probing.py [--model smollm2-135m] [--seeds 0]
"""

from __future__ import annotations

import argparse
import time

import mechlib
from mechlib import probing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    mechlib.set_threads()
    model = mechlib.load_model(args.model)
    data = probing.load_pos(model)
    n_tokens = sum(len(t) for t in data.tokens)
    hooks = probing.resid_hooks(model)
    print(
        f"{args.model}: {len(data.tokens)} sentences, {n_tokens} tokens, {len(data)} labelled words, "
        f"{len(hooks)} hooks, {mechlib.set_threads()} torch thread(s)"
    )

    probing.clear_cache(model)
    t0 = time.perf_counter()
    probing.collect(model, data, hooks, batch_size=args.batch_size, progress=False)
    dt = time.perf_counter() - t0
    print(f"collect: {dt:.1f} s for {n_tokens} tokens x {len(hooks)} hooks = {n_tokens / dt:.0f} tokens/s")
    t0 = time.perf_counter()
    probing.collect(model, data, hooks, progress=False)
    print(f"collect again (cached): {1e3 * (time.perf_counter() - t0):.2f} ms")

    t0 = time.perf_counter()
    result = probing.sweep(model, data, hooks=hooks, seeds=args.seeds, progress=False)
    dt = time.perf_counter() - t0
    n_fits = len(hooks) * 2 * 2 * len(args.seeds)
    print(
        f"sweep: {len(hooks)} layers x 2 probes x (task + control) x {len(args.seeds)} seed(s) = {n_fits} fits "
        f"in {dt:.1f} s ({dt / n_fits:.2f} s per fit; activations cached)"
    )
    for probe in ("linear", "mlp"):
        a, s = result.peak("accuracy", probe), result.peak("selectivity", probe)
        print(
            f"  {probe:6s}: accuracy peaks at layer {a} ({result.accuracy.values[a, result.accuracy.labels['probe'].index(probe)]:.3f}), "
            f"selectivity at layer {s} ({result.selectivity.values[s, result.selectivity.labels['probe'].index(probe)]:.3f})"
        )


if __name__ == "__main__":
    main()
