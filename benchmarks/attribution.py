"""Sentences per second for each attribution method, faithfulness and self-explanation on SmolLM2.

Every method runs on the same held-out review sentences (mechlib/data/sentiment_reviews.json,
test split), inside the chat-formatted classification prompt of notebook 06; the numbers depend on
the machine and on how many threads it gives (``MECHLIB_THREADS``).

Then the prompt template's shared prefix: occlusion, integrated gradients and faithfulness run once
more with the prefix's keys and values recomputed in every forward pass (the reuse switched off), and
the last line reads ``ratio <time without reuse / time with it> max_abs_diff <largest score difference>``.

Usage: python benchmarks/attribution.py [--model smollm2-135m] [--n 16] [--ig-steps 16] [--seed 0]
"""

import argparse
import time

import torch

import mechlib
from mechlib import attribution as attr
from mechlib import self_explain as se


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="sentences (even)")
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    threads = mechlib.set_threads()
    model = mechlib.load_model(args.model)
    items = se.balanced(se.reviews("test"), args.n, seed=args.seed)
    segs = [se.classification_input(model, r) for r in items]
    n_tok = sum(int(s.tokens.numel()) for s in segs) / len(segs)
    n_words = sum(s.n_words for s in segs) / len(segs)
    print(
        f"{args.model}: {len(segs)} sentences, {n_words:.1f} words and {n_tok:.1f} prompt tokens on average, "
        f"{threads} thread(s)"
    )

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        print(f"  {name:<34s} {len(segs) / dt:8.2f} sentences/s   ({dt:.1f}s)")
        return out

    targets = timed("decision (two-answer logits)", lambda: attr.decision_targets(model, segs, *se.ANSWERS))
    occ = timed("occlusion (leave one word out)", lambda: attr.occlusion(model, segs, targets))
    timed("gradient x input", lambda: attr.gradient_x_input(model, segs, targets))
    ig = timed(
        f"integrated gradients ({args.ig_steps} steps)",
        lambda: attr.integrated_gradients(model, segs, targets, steps=args.ig_steps, baseline=" "),
    )
    timed("attention", lambda: attr.attention_scores(model, segs))
    timed(f"faithfulness ({len(attr.ERASER_KS)} ERASER bins)", lambda: attr.faithfulness(model, segs, targets, occ))
    if not se.has_chat_template(model):
        print(f"  self-explanations skipped: {args.model} has no chat template (a base model)")
    for scheme in se.SCHEMES if se.has_chat_template(model) else ():
        timed(
            f"self-explanation {scheme} (generate+parse)",
            lambda s=scheme: se.explain(model, items, s, max_new_tokens=args.max_new_tokens, seed=args.seed),
        )
    err = torch.tensor([a.info["relative_error"] for a in ig])
    print(f"IG relative completeness error ({args.ig_steps} steps): median {err.median():.3f}, max {err.max():.3f}")

    def reuse_comparison():
        t = time.perf_counter()
        out = [
            attr.occlusion(model, segs, targets),
            attr.integrated_gradients(model, segs, targets, steps=args.ig_steps, baseline=" "),
        ]
        f = attr.faithfulness(model, segs, targets, out[0])
        return time.perf_counter() - t, [a.scores for m in out for a in m] + [f.comprehensiveness, f.sufficiency]

    prefix = attr._shared_prefix(model, [s.tokens for s in segs])
    print(f"shared template prefix: {len(prefix) if prefix is not None else 0} tokens of {n_tok:.1f}")
    t_with, with_reuse = reuse_comparison()
    reuse = attr._shared_prefix
    attr._shared_prefix = lambda *a, **k: None  # every forward pass runs the whole prompt
    try:
        t_without, without = reuse_comparison()
    finally:
        attr._shared_prefix = reuse
    diff = max(float((a - b).abs().max()) for a, b in zip(with_reuse, without))
    print(f"occlusion + IG + faithfulness: prefix reused {t_with:.1f}s, recomputed {t_without:.1f}s")
    print(f"ratio {t_without / t_with:.2f} max_abs_diff {diff:.2g}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
