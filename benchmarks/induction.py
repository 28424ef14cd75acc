"""Benchmark: train the 2-layer attention-only induction model on 3 seeds; print wall time,
phase-change step and head scores. Run: python benchmarks/induction.py [--steps 2000] [--seeds 0 1 2]

Each run uses one torch thread (much faster than two for a model this small).
"""

import argparse
import time

from mechlib.toy import train_induction_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    print(f"2-layer attention-only model, {args.steps} steps, seeds {args.seeds}")
    header = f"{'seed':>4} {'wall s':>7} {'phase step':>10} {'loss 1st':>8} {'loss 2nd':>8}  {'prev-token head':>18}  {'induction head':>18}"
    print(header)
    t0 = time.perf_counter()
    for seed in args.seeds:
        r = train_induction_model(args.steps, seed=seed, progress=False)
        s = r.summary()
        pc = s["phase_change_step"]
        # scores of the final model's best heads at the phase change, for the record
        at = r.scores(pc) if pc is not None else None
        print(
            f"{seed:>4} {s['wall_time_s']:>7.1f} {str(pc):>10} {s['first_loss']:>8.3f} {s['second_loss']:>8.3f}  "
            f"{s['prev_token_head'] + ' ' + format(s['prev_token_score'], '.3f'):>18}  "
            f"{s['induction_head'] + ' ' + format(s['induction_score'], '.3f'):>18}",
            flush=True,
        )
        print(
            "      all final scores: previous-token layer 0 "
            + ", ".join(f"{v:.2f}" for v in r.history[-1].scores["previous_token"][0].tolist())
            + "; induction layer 1 "
            + ", ".join(f"{v:.2f}" for v in r.history[-1].scores["induction"][1].tolist())
        )
        if at is not None:
            print(
                f"      at the phase change (step {pc}): best prev-token {float(at['previous_token'].values[0].max()):.3f}, "
                f"best layer-1 induction {float(at['induction'].values[1].max()):.3f}"
            )
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
