"""Edge attribution on SmolLM2's whole graph: how fast, and how close to exact edge patching.

Prints the time to score every edge (70,651 on SmolLM2) for IOI prompts with EAP and with EAP-IG
(5 steps), the time of a faithfulness curve (20 circuit sizes, one batched forward per few sizes),
and, on a random sample of edges, exact edge patching (one forward row per edge and prompt)
against EAP and EAP-IG: the correlation of each with the exact effects and the per-edge time
ratio. The last line reads ``ratio <exact-per-edge time / EAP-IG-per-edge time> r <EAP-IG's
correlation with exact>``.

Usage: python benchmarks/circuit_discovery.py [--model smollm2-135m] [--n 32] [--sample 200] [--steps 5]
On a machine shared with other jobs, MECHLIB_THREADS=1 avoids thread oversubscription.
"""

import argparse
import time

import torch

import mechlib
from mechlib import eap as E
from mechlib.ioi import make_ioi_dataset
from mechlib.metrics import ioi_metric


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="IOI prompts to score")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--sample", type=int, default=200, help="edges patched exactly")
    ap.add_argument("--exact-n", type=int, default=8, help="prompts for the exact comparison")
    ap.add_argument("--points", type=int, default=20, help="faithfulness curve points")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mechlib.set_threads()
    model = mechlib.load_model(args.model)
    ds = make_ioi_dataset(model, args.n, seed=args.seed)
    metric = ioi_metric(ds)
    B, T = ds.tokens.shape
    E.graph_model(model)  # build once, outside the timings
    print(f"model {args.model}: IOI prompts {B} x {T} tokens; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    g_eap = E.eap(model, ds.tokens, ds.corrupted_tokens, metric)
    t_eap = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_ig = E.eap_ig(model, ds.tokens, ds.corrupted_tokens, metric, steps=args.steps)
    t_ig = time.perf_counter() - t0
    print(f"graph: {g_eap.n_edges} edges")
    print(f"EAP    scores every edge for {B} prompts in {t_eap:.1f} s")
    print(f"EAP-IG ({args.steps} steps) scores every edge for {B} prompts in {t_ig:.1f} s")

    t0 = time.perf_counter()
    curve = E.faithfulness_curve(model, ds.tokens, ds.corrupted_tokens, metric, g_ig, points=args.points)
    t_curve = time.perf_counter() - t0
    print(f"faithfulness curve, {len(curve.n_edges)} sizes x {B} prompts: {t_curve:.1f} s")
    print(f"  {curve}")

    # exact edge patching on a sample of edges (on fewer prompts: it costs one forward row per edge and prompt)
    n = min(args.exact_n, B)
    sub = make_ioi_dataset(model, n, seed=args.seed)
    m_sub = ioi_metric(sub)
    gen = torch.Generator().manual_seed(args.seed)
    all_edges = g_eap.edge_list()
    # half the sample from the highest-scoring edges (where scores matter: a quarter from each method's
    # top, so neither is favoured), half uniformly over all edges (most of which do almost nothing)
    top = list(dict.fromkeys([e for e, _ in g_eap.top(args.sample // 4)] + [e for e, _ in g_ig.top(args.sample // 4)]))
    rand_idx = torch.randperm(len(all_edges), generator=gen).tolist()
    rand = [(g_eap.senders[all_edges[i][0]], g_eap.receivers[all_edges[i][1]]) for i in rand_idx]
    edges = list(dict.fromkeys(top + rand))[: args.sample]
    t0 = time.perf_counter()
    exact = E.patch_edges(model, sub.tokens, sub.corrupted_tokens, m_sub, edges)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_eap = E.eap(model, sub.tokens, sub.corrupted_tokens, m_sub)
    t_eap_sub = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_ig = E.eap_ig(model, sub.tokens, sub.corrupted_tokens, m_sub, steps=args.steps)
    t_ig_sub = time.perf_counter() - t0
    a_eap = torch.tensor([s_eap.score(a, b) for a, b in edges])
    a_ig = torch.tensor([s_ig.score(a, b) for a, b in edges])
    r_eap, r_ig = _corr(a_eap, exact), _corr(a_ig, exact)
    per_exact = t_exact / len(edges)
    per_eap, per_ig = t_eap_sub / g_eap.n_edges, t_ig_sub / g_eap.n_edges
    print(f"exact edge patching: {len(edges)} edges x {n} prompts in {t_exact:.1f} s ({per_exact * 1e3:.2f} ms/edge)")
    print(
        f"EAP    on the same {n} prompts: {t_eap_sub:.1f} s for all {g_eap.n_edges} edges "
        f"({per_eap * 1e6:.1f} us/edge); r with exact {r_eap:.3f}; exact/EAP per edge {per_exact / per_eap:.0f}x"
    )
    print(
        f"EAP-IG on the same {n} prompts: {t_ig_sub:.1f} s ({per_ig * 1e6:.1f} us/edge); r with exact {r_ig:.3f}; "
        f"exact/EAP-IG per edge {per_exact / per_ig:.0f}x"
    )
    if r_ig > r_eap:
        print("EAP-IG correlates better with exact edge patching than EAP, as expected")
    else:
        print("NOTE: EAP-IG does NOT correlate better with exact edge patching than EAP here")
    print(f"ratio {per_exact / per_ig:.1f} r {r_ig:.3f}")


if __name__ == "__main__":
    main()
