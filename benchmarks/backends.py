"""One intervention language, three backends: the same sweeps on the engine, the bridge and nnsight.

On SmolLM2 (or ``--model``), each backend runs

1. a head-by-position activation-patching sweep (``patch(..., "head_out_by_pos")``, IOI prompts,
   denoising, raw IO-S logit difference) over a few layers, and
2. one causal trace (``mechlib.causal_tracing.trace_tokens(..., backend=name)``, ROME's method:
   the subject's embeddings noised in ``--samples`` seeded copies, the clean residual stream and
   MLP / attention windows restored at every (layer, position); the answer's probability).

Prints each backend's time and the largest difference of its results from the engine's; then the
same sweep and trace on Gemma 3 270M (``--gemma``, default ``gemma3-270m``; ``--gemma ""`` skips
it) on the engine and the bridge. The last line reads
``ratio <bridge time / engine time> max_abs_diff <largest difference between backends>`` (SmolLM2's
ratio; the largest difference over every model and backend).
The sweeps are kept small (two prompts, two layers) so the bridge and nnsight, which recompute
every row in full, finish in a few minutes on a loaded 2-core machine.

Usage: python benchmarks/backends.py [--n 2] [--layers 20,29] [--samples 3] [--backends engine,bridge,nnsight] [--gemma gemma3-270m]
"""

import argparse
import time

import torch

import mechlib
from mechlib.backends import get_backend
from mechlib.causal_tracing import trace_tokens
from mechlib.ioi import make_ioi_dataset
from mechlib.metrics import ioi_metric
from mechlib.patching import patch

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"


def compare(model, names: list[str], n: int, layers: list[int], samples: int) -> tuple[dict, float]:
    """The sweep and the trace on each backend of ``names``: ``({name: seconds}, largest difference)``."""
    ds = make_ioi_dataset(model, n, seed=0)
    metric = ioi_metric(ds)
    tokens = model.to_tokens(PROMPT)[0]
    bos = int(model.to_tokens("").shape[1])  # 1 where the model prepends BOS
    subject = (bos, len(model.to_tokens(SUBJECT)[0]))
    target = int(model.to_single_token(ANSWER))
    B, P = ds.tokens.shape
    print(
        f"model {model.cfg.model_name}: sweep head_out_by_pos, {B} IOI prompts x {P} tokens, layers {layers} "
        f"({len(layers) * model.cfg.n_heads * P} cells); trace of {PROMPT!r} -> {ANSWER!r}, subject tokens "
        f"{subject}, {samples} noise samples, resid/mlp/attn at every layer and position"
    )
    results, times = {}, {}
    for name in names:
        be = get_backend(model, name)
        if name == "nnsight":
            be.cache({"warm": tokens[None]}, [])  # load the Hugging Face model before timing
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
        trace = trace_tokens(model, tokens, subject, target, samples=samples, backend=be, allow_unpredicted=True)
        t_trace = time.perf_counter() - t0
        stacked = torch.stack([trace.restored[k].values for k in trace.kinds])
        results[name] = (grid.values, stacked)
        times[name] = t_sweep + t_trace
        print(
            f"{name:8s} sweep {t_sweep:7.2f} s ({grid.meta['calls']} calls), trace {t_trace:6.2f} s "
            f"(backend {trace.backend}); clean {grid.meta['clean']:.3f}, corrupted {grid.meta['corrupted']:.3f}; "
            f"trace: clean p={trace.clean_prob:.3f}, noised p={trace.corrupted_prob:.3f}, "
            f"best resid restore p={float(trace.restored['resid'].values.nan_to_num(0).max()):.3f}"
        )
    ref = next(iter(results))
    worst = 0.0
    for name, (g, tr) in results.items():
        d_grid = float(torch.nan_to_num((g - results[ref][0]).abs(), nan=0.0).max())
        d_trace = float(torch.nan_to_num((tr - results[ref][1]).abs(), nan=0.0).max())
        worst = max(worst, d_grid, d_trace)
        print(f"{name:8s} vs {ref}: max |diff| sweep {d_grid:.2e}, trace {d_trace:.2e}")
    for name, t in times.items():
        print(f"{name:8s} total {t:.2f} s ({t / times.get(ref, t):.1f}x the {ref})")
    return times, worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=2, help="IOI prompts in the patching sweep")
    ap.add_argument("--layers", default="20,29", help="layers of the patching sweep")
    ap.add_argument("--samples", type=int, default=3, help="noise samples of the causal trace")
    ap.add_argument("--backends", default="engine,bridge,nnsight")
    ap.add_argument("--gemma", default="gemma3-270m", help='second model, engine vs bridge ("" skips it)')
    ap.add_argument("--gemma-layers", default="10,17", help="layers of the second model's sweep")
    args = ap.parse_args()
    threads = mechlib.set_threads()
    print(f"torch threads {threads} (on a loaded machine compare backends within this run only)")
    model = mechlib.load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    times, worst = compare(model, args.backends.split(","), args.n, layers, args.samples)
    if args.gemma:
        gemma = mechlib.load_model(args.gemma)
        g_layers = [int(x) for x in args.gemma_layers.split(",")]
        _, g_worst = compare(gemma, ["engine", "bridge"], args.n, g_layers, args.samples)
        worst = max(worst, g_worst)
    ratio = times.get("bridge", float("nan")) / times.get("engine", float("nan"))
    print(f"ratio {ratio:.1f} max_abs_diff {worst:.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
