"""IOI baseline, direct logit attribution and logit lens on a real model; prints every figure.

Usage: python benchmarks/ioi_dla.py [--model smollm2-135m] [--n 100] [--seed 0]
"""

import argparse
import time

import torch

import mechlib
from mechlib.ioi import ioi_baseline, make_ioi_dataset
from mechlib.logit_attribution import ioi_logit_attribution, logit_lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mechlib.set_threads()
    model = mechlib.load_model(args.model)
    t = time.time()
    ds = make_ioi_dataset(model, args.n, seed=args.seed)
    print(ds.report())
    print(f"[dataset {time.time() - t:.1f}s]")
    t = time.time()
    print(ioi_baseline(model, ds))
    print(f"[baseline {time.time() - t:.1f}s]")
    t = time.time()
    dla = ioi_logit_attribution(model, ds, progress=False)
    print(dla.summary(k=8))
    print(f"[DLA {time.time() - t:.1f}s]")
    t = time.time()
    lens = logit_lens(model, ds.tokens, ds.io_ids, ds.s_ids, pos=ds.pos("END"), progress=False)
    print(lens.summary())
    labs = lens.logit.labels["layer"]
    for i, lab in enumerate(labs):
        print(
            f"  {lab:>6}: logit diff {lens.logit_diff.values[i]:+.3f}  p(IO) {lens.prob.values[i]:.4f}  rank {lens.rank.values[i]:.1f}"
        )
    print(f"[logit lens {time.time() - t:.1f}s]")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
