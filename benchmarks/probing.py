"""Benchmark: activation collection throughput and a full layer sweep of probes with control tasks.

Prints (1) tokens/s of collecting the residual stream at every layer for the part-of-speech data
(one forward pass per batch, every hook at once), (2) the wall time of a sweep over every layer
(``n_layers + 1`` residual streams) x linear and MLP probes x task and control x seeds, per fit
and in all, with the peaks it finds, and (3) the linear probes of a sweep fitted to convergence by
``mechlib.logistic`` against scikit-learn's ``StandardScaler + LogisticRegression`` one at a time
(its defaults, ``max_iter=300``): time, how many scikit-learn fits stopped at ``max_iter``, and the
largest held-out accuracy difference. Last line: ``ratio <scikit-learn time / mechlib time>
max_acc_diff <largest accuracy difference>``.
Run: python benchmarks/probing.py [--model smollm2-135m] [--seeds 0] [--layer-step 5]
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
    p.add_argument("--layer-step", type=int, default=5, help="layers compared with scikit-learn: every n-th")
    p.add_argument("--skip-sweep", action="store_true", help="only the scikit-learn comparison")
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

    if not args.skip_sweep:
        full_sweep(model, data, hooks, args.seeds)
    compare_sklearn(model, data, hooks[:: args.layer_step], args.seeds)


def full_sweep(model, data, hooks, seeds) -> None:
    t0 = time.perf_counter()
    result = probing.sweep(model, data, hooks=hooks, seeds=seeds, progress=False)
    dt = time.perf_counter() - t0
    n_fits = len(hooks) * 2 * 2 * len(seeds)
    print(
        f"sweep: {len(hooks)} layers x 2 probes x (task + control) x {len(seeds)} seed(s) = {n_fits} fits "
        f"in {dt:.1f} s ({dt / n_fits:.2f} s per fit; activations cached)"
    )
    for probe in ("linear", "mlp"):
        a, s = result.peak("accuracy", probe), result.peak("selectivity", probe)
        print(
            f"  {probe:6s}: accuracy peaks at layer {a} ({result.accuracy.values[a, result.accuracy.labels['probe'].index(probe)]:.3f}), "
            f"selectivity at layer {s} ({result.selectivity.values[s, result.selectivity.labels['probe'].index(probe)]:.3f})"
        )


def compare_sklearn(model, data, hooks, seeds) -> None:
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    acts = probing.collect(model, data, hooks, progress=False)
    t0 = time.perf_counter()
    ours = probing.sweep(model, data, hooks=hooks, probes=("linear",), seeds=seeds, progress=False)
    t_ours = time.perf_counter() - t0
    t_sk, diffs, capped = 0.0, [], 0
    for si, seed in enumerate(seeds):
        split = probing.split_by_group(data.sentence, 0.2, seed)
        labels = {"task": data.labels, "control": probing.control_labels(data.words, data.labels, seed)}
        for li, h in enumerate(hooks):
            for which, y in labels.items():
                est = probing.make_probe("linear", seed)
                x, yy = acts[h].float().numpy(), np.asarray(y)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(x[split[0]], yy[split[0]])
                t_sk += time.perf_counter() - t0
                capped += int(est[-1].n_iter_[0] >= est[-1].max_iter)
                acc = float((est.predict(x[split[1]]) == yy[split[1]]).mean())
                grid = ours.accuracy if which == "task" else ours.control
                diffs.append(abs(acc - float(grid.samples[si, li, 0])))
    n = len(diffs)
    print(
        f"linear probes, {len(hooks)} layers x (task + control) x {len(seeds)} seed(s) = {n} fits: "
        f"mechlib.logistic {t_ours:.1f} s, scikit-learn one at a time {t_sk:.1f} s ({capped} of {n} stopped at max_iter "
        f"unconverged); held-out accuracy differs by at most {max(diffs):.4f} (mean {sum(diffs) / n:.4f})"
    )
    print(f"ratio {t_sk / t_ours:.1f} max_acc_diff {max(diffs):.4f}")


if __name__ == "__main__":
    main()
