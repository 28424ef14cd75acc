"""Every-head-by-position activation patching (hook_z per head per position) on IOI prompts:
mechlib.patching against transformer_lens.patching on the same grid, same metric, same run.

Prints the grid, both wall times, their ratio, and the largest absolute difference between the two
results; before the last line, the matrix-multiply FLOP rate mechlib's sweep achieves against a bare
float32 GEMM of the same shapes (``flops <achieved> peak <GEMM> (<percent>% of peak)``, see
``benchmarks/flopmeter.py``; FLOPs are counted in one extra, untimed run of the sweep). The last line
reads ``ratio <x> max_abs_diff <y>``.

TransformerLens runs one bridge forward per cell (prompts x layers x heads x positions cells
would be 16,200 forwards for 4 prompts x 30 layers x 9 heads x 15 positions on SmolLM2, about an
hour on 2 CPU cores), so by default both sides sweep every third layer (0, 3, ..., 27: 10 layers,
1,350 cells), all 9 heads and all positions. ``--layers all`` sweeps all 30 (mechlib alone takes
seconds; TL ~1 hour).

With ``--precision bfloat16`` mechlib's sweep runs at the bfloat16 opt-in (:mod:`mechlib.precision`);
TransformerLens stays float32, so ``max_abs_diff`` is then the opt-in's largest difference from float32,
and the peak is that of the same GEMMs in bfloat16.

Usage: python benchmarks/patching.py [--model smollm2-135m] [--n 4] [--layer-step 3] [--layers all|0,14,27]
       [--precision float32|bfloat16]
On a machine shared with other jobs, MECHLIB_THREADS=1 avoids thread oversubscription (which slows the
bridge's many small ops far more than the engine's few large ones).
"""

import argparse
import time

import pandas as pd
import torch
from flopmeter import FlopMeter

import mechlib
import mechlib.precision
from mechlib.ioi import make_ioi_dataset
from mechlib.metrics import ioi_metric
from mechlib.patching import patch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=4, help="IOI prompts")
    ap.add_argument("--layer-step", type=int, default=3, help="sweep layers 0, step, 2*step, ...")
    ap.add_argument("--layers", default=None, help="'all', or comma-separated layers (overrides --layer-step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="float32", choices=mechlib.precision.PRECISIONS, help="mechlib's sweep")
    args = ap.parse_args()
    mechlib.set_threads()
    from transformer_lens import patching as tl_patching

    model = mechlib.load_model(args.model)
    cfg = model.cfg
    ds = make_ioi_dataset(model, args.n, seed=args.seed)
    if args.layers == "all":
        layers = list(range(cfg.n_layers))
    elif args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        layers = list(range(0, cfg.n_layers, args.layer_step))
    B, T = ds.tokens.shape
    H = cfg.n_heads
    metric = ioi_metric(ds)  # IO - S logit diff at END (the last token), mean over prompts
    raw = lambda logits: metric(logits).mean()  # noqa: E731  the same metric as a plain scalar function
    print(
        f"model {args.model}: {cfg.n_layers} layers x {H} heads; IOI prompts: {B} x {T} tokens (seed {args.seed}); "
        f"torch threads {torch.get_num_threads()} (set MECHLIB_THREADS to change)"
    )
    print(
        f"grid: hook_z per head per position, layers {layers} ({len(layers)} of {cfg.n_layers}) x {H} heads x "
        f"{T} positions = {len(layers) * H * T} cells x {B} prompts; metric: IO-S logit diff (raw), denoising"
    )

    def sweep():
        with mechlib.precision.use(args.precision):
            return patch(
                model,
                ds.tokens,
                ds.corrupted_tokens,
                metric,
                "head_out_by_pos",
                layers=layers,
                normalise=False,
                progress=False,
            )

    t0 = time.perf_counter()
    ours = sweep()
    t_ours = time.perf_counter() - t0
    print(
        f"mechlib.patching.patch ({args.precision}): {t_ours:.2f} s ({ours.meta['calls']} engine calls); "
        f"clean {ours.meta['clean']:.3f}, corrupted {ours.meta['corrupted']:.3f}"
    )

    t0 = time.perf_counter()
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(ds.tokens)
    index_df = pd.DataFrame(
        [(l, p, h) for l in layers for p in range(T) for h in range(H)], columns=["layer", "pos", "head_index"]
    )
    theirs_flat = tl_patching.generic_activation_patch(
        model,
        ds.corrupted_tokens,
        clean_cache,
        raw,
        patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
        activation_name="z",
        index_df=index_df,
    )
    t_tl = time.perf_counter() - t0
    print(
        f"transformer_lens.patching (generic_activation_patch, layer_pos_head_vector_patch_setter, "
        f"same cells as get_act_patch_attn_head_out_by_pos): {t_tl:.2f} s ({len(index_df)} forwards)"
    )

    theirs = torch.full_like(ours.values, float("nan"))
    for (l, p, h), v in zip(index_df.itertuples(index=False), theirs_flat.tolist()):
        theirs[l, h, p] = v
    sel = ~torch.isnan(ours.values)
    assert torch.equal(sel, ~torch.isnan(theirs)), "the two sweeps covered different cells"
    diff = float((ours.values[sel] - theirs[sel]).abs().max())
    effect = ours.values - ours.meta["corrupted"]  # how far each patch moves the corrupted run's logit diff
    best = torch.nan_to_num(effect, nan=0.0).flatten().abs().topk(5).indices
    cells = [torch.unravel_index(i, effect.shape) for i in best]
    print(
        "largest effects (mechlib, logit diff change):",
        ", ".join(
            f"{ours.label(layer=int(l), head=int(h), pos=int(p))} {float(effect[l, h, p]):+.3f}" for l, h, p in cells
        ),
    )
    print(f"mechlib {t_ours:.2f} s, transformer_lens {t_tl:.2f} s")
    meter = FlopMeter()
    with meter.count():
        sweep()
    print(f"mechlib executed {meter.summary()}")
    print(meter.line(t_ours))
    print(f"ratio {t_tl / t_ours:.1f} max_abs_diff {diff:.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
