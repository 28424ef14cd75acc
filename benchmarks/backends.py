"""One intervention language, three backends: the same sweeps on the engine, the bridge and nnsight.

On SmolLM2 (or ``--model``), each backend runs

1. a head-by-position activation-patching sweep (``patch(..., "head_out_by_pos")``, IOI prompts,
   denoising, raw IO-S logit difference) over a few layers, and
2. one causal trace in ROME's style written directly as intervention lists (``mechlib.causal_tracing``
   itself is not ported to the language yet): the subject's token embeddings noised
   (``Noise``, the same draw on every backend) in ``--samples`` copies of one fact's prompt, and the
   clean residual stream restored (``Patch`` of ``resid_pre``) at every (layer, position) of a few
   layers; scored by the answer's probability.

Prints each backend's time and the largest difference of its results from the engine's. The last
line reads ``ratio <bridge time / engine time> max_abs_diff <largest difference between backends>``.
The sweeps are kept small (two prompts, two layers) so the bridge and nnsight, which recompute
every row in full, finish in a few minutes on a loaded 2-core machine.

Usage: python benchmarks/backends.py [--n 2] [--layers 20,29] [--samples 3] [--backends engine,bridge,nnsight]
"""

import argparse
import time

import torch

import mechlib
from mechlib.backends import get_backend
from mechlib.interventions import Intervention, Noise, Patch, Site
from mechlib.ioi import make_ioi_dataset
from mechlib.metrics import answer_prob, ioi_metric
from mechlib.patching import patch

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"


def trace_lists(n_pos: int, subject: list[int], layers: list[int], std: float) -> list[list[Intervention]]:
    """ROME's residual trace as data: noise the subject's embeddings, restore one clean state."""
    noise = Intervention(Site("embed", positions=tuple(subject)), Noise(std, seed=0))
    lists = [[noise]]  # the corrupted run itself
    for layer in layers:
        for pos in range(n_pos):
            lists.append([noise, Intervention(Site("resid_pre", layer, positions=(pos,)), Patch("clean"))])
    return lists


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=2, help="IOI prompts in the patching sweep")
    ap.add_argument("--layers", default="20,29", help="layers of the patching sweep")
    ap.add_argument("--trace-layers", default="0,10,20", help="layers of the causal trace")
    ap.add_argument("--samples", type=int, default=3, help="noised copies of the fact's prompt")
    ap.add_argument("--backends", default="engine,bridge,nnsight")
    args = ap.parse_args()
    threads = mechlib.set_threads()
    model = mechlib.load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    trace_layers = [int(x) for x in args.trace_layers.split(",")]
    ds = make_ioi_dataset(model, args.n, seed=0)
    metric = ioi_metric(ds)
    tokens = model.to_tokens(PROMPT)
    n_subj = len(model.to_tokens(SUBJECT)[0])
    T = tokens.shape[1]
    std = 3 * float(model.W_E.detach().std())
    batch = tokens.repeat(args.samples, 1)
    lists = trace_lists(T, list(range(n_subj)), trace_layers, std)
    prob = answer_prob(model, ANSWER)
    B, P = ds.tokens.shape
    print(f"model {args.model}, torch threads {threads} (a loaded machine: compare backends within this run)")
    print(
        f"sweep: head_out_by_pos, {B} IOI prompts x {P} tokens, layers {layers}: "
        f"{len(layers) * model.cfg.n_heads * P} cells; trace: {args.samples} noised copies of {PROMPT!r} "
        f"(subject = first {n_subj} tokens, noise std {std:.3f}), resid_pre restored at layers {trace_layers} "
        f"x {T} positions ({len(lists) - 1} lists)"
    )

    results, times = {}, {}
    for name in args.backends.split(","):
        be = get_backend(model, name)
        if name == "nnsight":
            be.cache({"warm": tokens}, [])  # load the Hugging Face model before timing
        t0 = time.perf_counter()
        grid = patch(
            model,
            ds.tokens,
            ds.corrupted_tokens,
            metric,
            "head_out_by_pos",
            layers=layers,
            normalise=False,
            progress=False,
            backend=be,
        )
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs = be.cache({"clean": batch}, ["hook_embed"] + [f"blocks.{l}.hook_resid_pre" for l in trace_layers])
        trace = be.run(runs, lists, base="clean", score=prob.evaluate, last_only=True).values
        t_trace = time.perf_counter() - t0
        results[name] = (grid.values, trace)
        times[name] = t_sweep + t_trace
        print(
            f"{name:8s} sweep {t_sweep:7.2f} s ({grid.meta['calls']} calls), trace {t_trace:6.2f} s; "
            f"clean {grid.meta['clean']:.3f}, corrupted {grid.meta['corrupted']:.3f}, "
            f"trace: noised p={float(trace[0].mean()):.3f}, best restore p={float(trace[1:].mean(1).max()):.3f}"
        )

    ref = next(iter(results))
    worst = 0.0
    for name, (g, tr) in results.items():
        d_grid = float(torch.nan_to_num((g - results[ref][0]).abs(), nan=0.0).max())
        d_trace = float((tr - results[ref][1]).abs().max())
        worst = max(worst, d_grid, d_trace)
        print(f"{name:8s} vs {ref}: max |diff| sweep {d_grid:.2e}, trace {d_trace:.2e}")
    top = results[ref][0]
    best = torch.nan_to_num(top - grid.meta["corrupted"], nan=0.0).flatten().abs().topk(3).indices
    cells = [torch.unravel_index(i, top.shape) for i in best]
    print("largest sweep effects:", ", ".join(f"L{int(l)}H{int(h)}@{int(p)}" for l, h, p in cells))
    ratio = times.get("bridge", float("nan")) / times.get("engine", float("nan"))
    for name, t in times.items():
        print(f"{name:8s} total {t:.2f} s ({t / times.get('engine', t):.1f}x the engine)")
    print(f"ratio {ratio:.1f} max_abs_diff {worst:.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
