"""Causal tracing speed: mechlib's batched tracer vs ROME's plain loop, same facts and noise.

Both trace all three kinds (residual state, MLP window, attention window) of every (layer, token)
cell with the same noise samples. The plain loop is ROME's, written out below (:func:`rome_loop`):
one bridge forward per cell with [clean row, noise samples] as the batch and the clean state
copied into the corrupted rows. mechlib's tracer runs on ``--backend`` (default ``auto``: the
engine where it mirrors the model). Prints facts traced per second for each, their results'
largest difference, the matrix-multiply FLOP rate mechlib's tracer achieves against a bare float32
GEMM of the same shapes (``flops <achieved> peak <GEMM> (<percent>% of peak)``, see
``benchmarks/flopmeter.py``; its FLOPs are counted in one extra, untimed run), and last the speed
ratio.

With ``--precision bfloat16`` mechlib's tracer runs at the bfloat16 opt-in (:mod:`mechlib.precision`);
the plain loop stays float32, so the largest difference is then the opt-in's difference from float32,
and the peak is that of the same GEMMs in bfloat16.

Usage: python benchmarks/causal_tracing.py [--facts 2] [--plain-facts 2] [--samples 10] [--corrupt block0]
       [--precision float32|bfloat16]

By default both tracers trace the same two facts, so the ratio compares like with like; the plain
loop takes roughly ten minutes on an idle 2-core machine (about 1,000 bridge forwards a fact).
"""

import argparse
import time

import torch
from flopmeter import FlopMeter

import mechlib
import mechlib.precision
from mechlib.causal_tracing import corruption_noise, trace_fact, window_layers
from mechlib.facts import known_facts, load_facts, noise_scale, tokenize_fact

HOOK = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def rome_loop(model, fact, samples, noise, window, seed, corrupt):
    """ROME's plain loop: per (kind, layer, token) one bridge forward of [clean, corrupted x samples],
    the clean state copied from row 0 into the corrupted rows. Returns ``{kind: [layer, pos]}``."""
    tf = tokenize_fact(model, fact)
    s0, s1 = tf.subject_start, tf.subject_end
    tokens = torch.as_tensor(tf.tokens)
    nL, P = model.cfg.n_layers, tokens.shape[0]
    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, noise, seed)
    batch = tokens[None].repeat(samples + 1, 1).to(model.cfg.device)
    site = "hook_embed" if corrupt == "embed" else "blocks.0.hook_resid_post"

    def add_noise(act, hook):
        act = act.clone()
        act[1:, s0:s1] += nz.to(act)
        return act

    def restore(t):
        def fn(act, hook):
            act = act.clone()
            act[1:, t] = act[0, t]
            return act

        return fn

    out = {}
    for kind in HOOK:
        grid = torch.zeros(nL, P)
        for t in range(P):
            for L in range(nL):
                layers = [L] if kind == "resid" else list(window_layers(L, window, nL))
                hooks = [(site, add_noise)] + [(f"blocks.{l}.{HOOK[kind]}", restore(t)) for l in layers]
                with torch.no_grad():
                    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
                grid[L, t] = logits[1:, -1].float().softmax(-1)[:, tf.attribute_token].mean()
        out[kind] = grid
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=2, help="facts traced by mechlib")
    ap.add_argument("--plain-facts", type=int, default=2, help="facts traced by the plain loop (the first of those)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="mechlib's backend: auto, engine, bridge, nnsight")
    ap.add_argument(
        "--corrupt",
        choices=("embed", "block0"),
        default="embed",
        help="noise on the token embeddings (ROME) or after block 0 (MLP 0 as part of the embedding)",
    )
    ap.add_argument("--precision", default="float32", choices=mechlib.precision.PRECISIONS, help="mechlib's tracer")
    args = ap.parse_args()
    threads = mechlib.set_threads()
    model = mechlib.load_model(args.model)
    candidates = load_facts(["country_capital", "landmark_city", "city_country"])
    known = [k.fact for k in known_facts(model, candidates, progress=False)]
    # interleave relations so the sample mixes prompt shapes
    by_rel: dict[str, list] = {}
    for f in known:
        by_rel.setdefault(f.relation, []).append(f)
    mixed = [f for group in zip(*by_rel.values()) for f in group]
    facts = mixed[: max(args.facts, args.plain_facts)]
    scale = noise_scale(model, known, at=args.corrupt)
    kw = dict(
        samples=args.samples,
        window=args.window,
        seed=args.seed,
        noise=scale,
        corrupt=args.corrupt,
        backend=args.backend,
    )
    print(
        f"model {args.model}, {threads} threads; {args.samples} noise samples, noise std {scale.noise():.4f} "
        f"(3 x {scale.std:.4f}, {scale.measured_on})"
    )
    for f in facts:
        print(f"  fact: {f.prompt!r} -> {f.attribute!r}, {len(model.to_tokens(f.prompt)[0])} tokens")

    def trace(f, **extra):
        with mechlib.precision.use(args.precision):
            return trace_fact(model, f, **{**kw, **extra})

    trace(facts[0], samples=1, kinds=("resid",))  # warm-up
    t = time.perf_counter()
    fast = [trace(f) for f in facts[: args.facts]]
    t_fast = time.perf_counter() - t
    cells = sum(3 * model.cfg.n_layers * len(tr.str_tokens) for tr in fast)
    print(
        f"mechlib ({fast[0].backend} backend, {args.precision}): {len(fast)} facts in {t_fast:.1f} s = {len(fast) / t_fast:.4f} facts/s "
        f"({cells * args.samples / t_fast:.0f} restored sequences/s)"
    )

    meter = FlopMeter()
    with meter.count():
        for f in facts[: args.facts]:
            trace(f)
    print(f"mechlib executed {meter.summary()}")

    t = time.perf_counter()
    std = scale.noise()
    slow = [
        rome_loop(model, f, args.samples, std, args.window, args.seed, args.corrupt) for f in facts[: args.plain_facts]
    ]
    t_slow = time.perf_counter() - t
    n_calls = sum(3 * g["resid"].numel() for g in slow)
    print(
        f"plain loop: {len(slow)} facts in {t_slow:.1f} s = {len(slow) / t_slow:.4f} facts/s "
        f"({n_calls} bridge forwards, {t_slow / n_calls * 1000:.0f} ms each)"
    )
    diff = max((a.restored[k].values - b[k]).abs().max().item() for a, b in zip(fast, slow) for k in a.restored)
    print(f"largest difference between the two tracers' restored probabilities: {diff:.2e}")
    print(meter.line(t_fast))
    print(f"ratio {(len(fast) / t_fast) / (len(slow) / t_slow):.1f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
