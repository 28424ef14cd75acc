"""Edge attribution patching (mechlib.eap) against independent implementations.

* TransformerLens 4.3's own attribution patching: node level on a tiny multi-head model, edge
  level on a tiny non-grouped model (a HF-booted GPT-2, where TL's per-head hooks exist).
* A hook-based implementation written here on the bridge's own forward (hooks at ``hook_q``/
  ``hook_k``/``hook_v``, ``hook_resid_mid``, ``hook_mlp_out``, the final ``hook_resid_post``) that
  rebuilds each receiver's input from its senders: the grouped-query first-order term, edge by edge,
  and circuit faithfulness.
* Exact edge patching where the metric is linear in the patched activations, and the
  integrated-gradients completeness of the input node.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mechlib import eap as E
from mechlib.graph import Graph
from mechlib.metrics import Metric, logit_diff
from mechlib.models import load_model, random_model


def _metric(b: int) -> Metric:
    g = torch.Generator().manual_seed(7)
    return logit_diff(None, torch.randint(0, 256, (b,), generator=g), torch.randint(0, 256, (b,), generator=g))


def _pair(b=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama-2l", seed=0)


@pytest.fixture(scope="module")
def gpt():
    return load_model("tiny-2l", seed=0)


@pytest.fixture(scope="module")
def hf_gpt2():
    """A tiny random GPT-2 booted from Hugging Face classes: TL's split per-head hooks work on it."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mechlib.models import cache_dir

    tok_dir = cache_dir() / "smollm2-135m-instruct-f32-v1"
    if not (tok_dir / "tokenizer.json").exists():
        pytest.skip("needs a local tokenizer (the SmolLM2 cache) to boot a HF model offline")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=256)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = TransformerBridge.boot_transformers(
            "gpt2", hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(tok_dir), device="cpu"
        )
        b.enable_compatibility_mode(disable_warnings=True)
    return b.eval()


# ---- the graph forward is the model ---------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-attn-2l", "tiny-2l", "tiny-llama-2l", "tiny-gemma3-3l"])
def test_graph_forward_matches_bridge(name):
    model = load_model(name, seed=0)
    gm = E.graph_model(model)
    clean, corrupted = _pair()
    out = gm.run(gm.embed(clean), last_only=False)
    assert torch.allclose(out.logits, model(clean), atol=1e-4)
    # patched rows: every edge kept = the clean run; none kept = the corrupted run
    src = gm.run(gm.embed(corrupted), last_only=False)
    keep = torch.stack([gm.graph.valid, torch.zeros_like(gm.graph.valid)]).repeat_interleave(3, 0)
    lg = gm.patched_run(gm.embed(clean).repeat(2, 1, 1), src, torch.arange(3).repeat(2), keep, last_only=False)
    assert torch.allclose(lg[:3], model(clean), atol=1e-4)
    assert torch.allclose(lg[3:], model(corrupted), atol=1e-4)


# ---- against TransformerLens ------------------------------------------------------------------


def _tl_metric(m: Metric):
    return lambda logits: logits[:, -1, 3].sum() - logits[:, -1, 5].sum()


def test_node_scores_equal_transformerlens_node_level(gpt):
    from transformer_lens.tools.analysis import attribution_patching as tlap

    clean, corrupted = _pair(4, 7, seed=1)
    metric = Metric(lambda lg: lg[:, -1, 3] - lg[:, -1, 5], "logit 3 - 5", last_only=True)
    tl = tlap.attribution_patch(gpt, clean, corrupted, _tl_metric(metric), tlap.EdgeAttributionConfig("node"))
    tot: dict[str, float] = {}
    for node, v in tl.node_scores.items():
        name = {"embed": "input", "attn_head_out": f"L{node.layer}H{node.head}", "mlp_out": f"MLP{node.layer}"}[
            node.kind
        ]
        tot[name] = tot.get(name, 0.0) + v
    ours = E.eap(gpt, clean, corrupted, metric).node_scores()
    assert set(tot) == set(ours)
    for k in tot:
        assert abs(ours[k] - tot[k]) < 1e-5, (k, ours[k], tot[k])


def test_edge_scores_equal_transformerlens_edge_level(hf_gpt2):
    from transformer_lens.tools.analysis import attribution_patching as tlap

    clean, corrupted = _pair(3, 6, seed=2)
    metric = Metric(lambda lg: lg[:, -1, 3] - lg[:, -1, 5], "logit 3 - 5", last_only=True)
    tl = tlap.attribution_patch(hf_gpt2, clean, corrupted, _tl_metric(metric), tlap.EdgeAttributionConfig("edge"))
    sname = lambda n: {"embed": "input", "attn_head_out": f"L{n.layer}H{n.head}", "mlp_out": f"MLP{n.layer}"}[n.kind]  # noqa: E731

    def rname(n):
        return {
            "q_input": f"L{n.layer}H{n.head}.q",
            "k_input": f"L{n.layer}H{n.head}.k",
            "v_input": f"L{n.layer}H{n.head}.v",
            "mlp_in": f"MLP{n.layer}",
            "logits": "logits",
        }[n.kind]

    agg: dict[tuple[str, str], float] = {}
    for (w, r), v in tl.edge_scores.items():  # TL scores each position's edge; ours sum over positions
        agg[(sname(w), rname(r))] = agg.get((sname(w), rname(r)), 0.0) + v
    g = E.eap(hf_gpt2, clean, corrupted, metric)
    assert len(agg) == g.n_edges
    scale = max(abs(v) for v in agg.values())
    for (s, r), v in agg.items():
        assert abs(g.score(s, r) - v) < 1e-5 * max(1.0, scale), (s, r, g.score(s, r), v)


# ---- an independent hook-based implementation on the bridge (grouped-query model) -------------


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hook_run(model, tokens, graph: Graph, input_fn, corrupt_out=None):
    """Run the bridge with each receiver's input replaced by ``input_fn(receiver, true_input, run_out)``.

    ``run_out`` holds every sender's output in this run so far (``input``, ``L0H1``, ``MLP0``).
    Queries, keys and values are recomputed from the receivers' inputs at ``attn.hook_q/k/v``; the
    MLP reads a patched ``hook_resid_mid`` (which, on the bridge, feeds the MLP but not the residual:
    ``test_hook_reference_reproduces_the_model`` checks both).
    Only RMS-normalised, rotary, bias-free-output models (tiny-llama-2l) are handled.
    """
    cfg = model.cfg
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads
    eps = cfg.eps
    run_out: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    kvname = (lambda l, g: f"L{l}KV{g}") if K != H else (lambda l, g: f"L{l}H{g}")
    hooks = []

    def rec_embed(act, hook):
        run_out["input"] = act
        return act

    hooks.append(("hook_embed", rec_embed))
    for l in range(L):

        def rec_pre(act, hook, l=l):
            state[f"pre{l}"] = act
            return act

        def qkv(act, hook, l=l, kind="q"):
            n = act.shape[2]
            W = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[kind][l]
            b = {"q": model.b_Q, "k": model.b_K, "v": model.b_V}[kind][l]
            out = []
            for h in range(n):
                r = f"L{l}H{h}.q" if kind == "q" else f"{kvname(l, h)}.{kind}"
                x = input_fn(r, state[f"pre{l}"], run_out)
                out.append(_rms(x, eps) @ W[h] + b[h])
            return torch.stack(out, 2)

        def rec_z(act, hook, l=l):
            for h in range(H):
                run_out[f"L{l}H{h}"] = act[:, :, h] @ model.W_O[l, h]
            return act

        def mid(act, hook, l=l):  # on the bridge, hook_resid_mid feeds the MLP only, not the residual
            return input_fn(f"MLP{l}", act, run_out)

        def mlp_out(act, hook, l=l):
            run_out[f"MLP{l}"] = act
            return act

        hooks += [
            (f"blocks.{l}.hook_resid_pre", rec_pre),
            (f"blocks.{l}.attn.hook_q", qkv),
            (f"blocks.{l}.attn.hook_k", lambda a, hook, l=l: qkv(a, hook, l, "k")),
            (f"blocks.{l}.attn.hook_v", lambda a, hook, l=l: qkv(a, hook, l, "v")),
            (f"blocks.{l}.attn.hook_z", rec_z),
            (f"blocks.{l}.hook_resid_mid", mid),
            (f"blocks.{l}.hook_mlp_out", mlp_out),
        ]
    hooks.append((f"blocks.{L - 1}.hook_resid_post", lambda a, hook: input_fn("logits", a, run_out)))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def _sender_outputs(model, tokens):
    _, cache = model.run_with_cache(tokens)
    out = {"input": cache["hook_embed"]}
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"L{l}H{h}"] = cache[f"blocks.{l}.attn.hook_z"][:, :, h] @ model.W_O[l, h]
        out[f"MLP{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def test_hook_reference_reproduces_the_model(llama):
    clean, _ = _pair()
    g = Graph.for_model(llama)
    with torch.no_grad():
        ref = _hook_run(llama, clean, g, lambda r, x, run: x)
        assert torch.allclose(ref, llama(clean), atol=1e-4)
        # moving only the MLP's input must leave the residual stream alone (the MLP output aside)
        noise = torch.randn(3, 6, llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
        gm = E.graph_model(llama)
        expect = gm.run(gm.embed(clean), False)
        shifted = expect.mid[0] + noise
        mlp0 = gm.mlp(0, shifted)
        resid = expect.mid[0] + mlp0
        x = resid[:, :, None].expand(-1, -1, 8, -1)
        z = gm.attend(1, x)
        resid = resid + gm.head_out(1, z).sum(2)
        resid = resid + gm.mlp(1, resid)
        got = _hook_run(llama, clean, g, lambda r, x, run: x + noise if r == "MLP0" else x)
        assert torch.allclose(got, gm.unembed(resid, False), atol=1e-4)


def test_grouped_first_order_term_equals_brute_force_per_edge(llama):
    clean, corrupted = _pair(3, 6, seed=3)
    metric = _metric(3)
    g = E.eap(llama, clean, corrupted, metric)  # denoise: gradient at the corrupted run
    assert g.shape.grouped and g.n_edges == 82
    clean_out, corr_out = _sender_outputs(llama, clean), _sender_outputs(llama, corrupted)
    for s, r in g.edge_list():
        sender, receiver = g.senders[s], g.receivers[r]
        eps = torch.zeros((), requires_grad=True)
        delta = (clean_out[sender] - corr_out[sender]).detach()

        def input_fn(rec, x, run, receiver=receiver, delta=delta, eps=eps):
            return x + eps * delta if rec == receiver else x

        with torch.enable_grad():
            value = metric(_hook_run(llama, corrupted, g, input_fn)).mean()
            (grad,) = torch.autograd.grad(value, eps)
        assert abs(float(grad) - float(g.scores[s, r])) < 1e-4 * max(1.0, float(g.scores.abs().max())), (
            sender,
            receiver,
        )


def _hook_faithfulness(model, clean, corrupted, metric, graph: Graph, keep: torch.Tensor) -> float:
    corr_out = _sender_outputs(model, corrupted)

    def input_fn(rec, x, run):
        r = graph.receiver_index(rec)
        for s in graph.valid[:, r].nonzero().flatten().tolist():
            if not keep[s, r]:
                name = graph.senders[s]
                x = x - (run[name] - corr_out[name])
        return x

    with torch.no_grad():
        vc = float(metric(model(clean)).mean())
        vk = float(metric(model(corrupted)).mean())
        va = float(metric(_hook_run(model, clean, graph, input_fn)).mean())
    return (va - vk) / (vc - vk)


def test_grouped_faithfulness_equals_hook_based_edge_ablation(llama):
    clean, corrupted = _pair(4, 6, seed=4)
    metric = _metric(4)
    g = E.eap_ig(llama, clean, corrupted, metric, steps=3)
    circuits = [g.top_n(n) for n in (10, 25, 60)]
    ours = E.faithfulness(llama, clean, corrupted, metric, circuits)
    for c, f in zip(circuits, ours):
        ref = _hook_faithfulness(llama, clean, corrupted, metric, g, c.circuit)
        assert abs(f.value - ref) < 1e-4, (c.n_circuit_edges, f.value, ref)
        assert abs(float(f.per_prompt.mean()) - f.value) < 1e-6
    # a random (unpruned) edge set too: pruning is not what makes them agree
    rng = torch.Generator().manual_seed(0)
    mask = (torch.rand(g.valid.shape, generator=rng) < 0.5) & g.valid
    mask[:, -1] = g.valid[:, -1]  # connect it
    f = E.faithfulness(llama, clean, corrupted, metric, mask)
    assert abs(f.value - _hook_faithfulness(llama, clean, corrupted, metric, g, mask)) < 1e-4


def test_faithfulness_mean_ablation_endpoints(llama):
    clean, corrupted = _pair(4, 6, seed=5)
    metric = _metric(4)
    g = Graph.for_model(llama)
    full, empty = E.faithfulness(
        llama,
        clean,
        corrupted,
        metric,
        [g.valid.clone(), torch.zeros_like(g.valid)],
        ablation="mean",
        require_connected=False,
    )
    assert abs(full.value - 1.0) < 1e-4
    # nothing kept under mean ablation: every receiver reads the mean corrupted residual
    gm = E.graph_model(llama)
    mean_in = gm.run(gm.embed(corrupted), False).final.mean(0, keepdim=True).expand(4, -1, -1)
    v = float(metric(gm.unembed(mean_in, False)).mean())
    assert abs(empty.metric - v) < 1e-4


def test_faithfulness_curve_batches_many_sizes(llama):
    clean, corrupted = _pair(4, 6, seed=6)
    metric = _metric(4)
    g = E.eap(llama, clean, corrupted, metric)
    curve = E.faithfulness_curve(llama, clean, corrupted, metric, g, sizes=[5, 20, g.n_edges])
    single = [
        E.faithfulness(llama, clean, corrupted, metric, g.top_n(n), require_connected=False).value
        for n in (5, 20, g.n_edges)
    ]
    assert torch.allclose(curve.values, torch.tensor(single), atol=1e-5)
    assert abs(float(curve.values[-1]) - 1.0) < 1e-4
    assert curve.n_edges[-1] == g.n_edges


# ---- exactness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_model():
    """One attention-only layer, no normalisation: the logits are linear in the logits' input,
    and a head's output is linear in its value input (patterns do not read it)."""
    return random_model(n_layers=1, attn_only=True, normalization_type=None, seed=3)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_equals_exact_edge_patching_where_the_metric_is_linear(linear_model, direction):
    clean, corrupted = _pair(3, 6, seed=7)
    metric = _metric(3)
    g = E.eap(linear_model, clean, corrupted, metric, direction=direction)
    linear = [(g.senders[s], g.receivers[r]) for s, r in g.edge_list() if g.receivers[r].endswith((".v", "logits"))]
    exact = E.patch_edges(linear_model, clean, corrupted, metric, linear, direction=direction)
    est = torch.tensor([g.score(s, r) for s, r in linear])
    assert torch.allclose(est, exact, atol=1e-4), (est, exact)
    # and on the query/key edges (softmax) the first-order term is not exact
    qk = [(g.senders[s], g.receivers[r]) for s, r in g.edge_list() if g.receivers[r].endswith((".q", ".k"))]
    exact_qk = E.patch_edges(linear_model, clean, corrupted, metric, qk, direction=direction)
    est_qk = torch.tensor([g.score(s, r) for s, r in qk])
    assert (est_qk - exact_qk).abs().max() > 1e-3 * exact_qk.abs().max()


@pytest.mark.parametrize("name", ["tiny-2l", "tiny-llama-2l", "tiny-gemma3-3l"])
def test_eap_ig_converges_to_exact_patching_of_the_input(name):
    """Integrated gradients are complete: the input node's edges together carry the whole effect
    of patching the input (the clean-corrupted difference) as the steps grow; EAP does not."""
    model = load_model(name, seed=0)
    clean, corrupted = _pair(3, 6, seed=8)
    metric = _metric(3)
    with torch.no_grad():
        vc, vk = float(metric(model(clean)).mean()), float(metric(model(corrupted)).mean())
    exact = vc - vk
    err = {}
    for steps in (1, 8, 64):
        g = E.eap_ig(model, clean, corrupted, metric, steps=steps)
        err[steps] = abs(g.node_scores()["input"] - exact)
    assert err[64] < err[8] < err[1]
    assert err[64] < 0.02 * abs(exact) + 1e-3, err
    # the per-prompt scores average to the batch scores
    assert torch.allclose(g.per_prompt.mean(0), g.scores, atol=1e-6)


def test_activation_variant_and_directions_are_consistent(llama):
    clean, corrupted = _pair(3, 6, seed=9)
    metric = _metric(3)
    a1 = E.eap_ig(llama, clean, corrupted, metric, steps=1, variant="activations")
    e = E.eap(llama, clean, corrupted, metric)
    assert torch.allclose(a1.scores, e.scores, atol=1e-5)  # one step: both are EAP
    a4 = E.eap_ig(llama, clean, corrupted, metric, steps=4, variant="activations")
    assert not torch.allclose(a4.scores, e.scores, atol=1e-5)
    noise = E.eap(llama, clean, corrupted, metric, direction="noise")
    assert noise.meta["clean"] == pytest.approx(e.meta["clean"]) and noise.meta["direction"] == "noise"


def test_a_batch_level_metric_gives_the_same_batch_scores(llama):
    clean, corrupted = _pair(4, 6, seed=11)
    metric = _metric(4)
    per = E.eap(llama, clean, corrupted, metric)
    scalar = E.eap(llama, clean, corrupted, Metric(lambda lg: metric.fn(lg).mean(), "mean", last_only=True))
    assert scalar.per_prompt is None
    assert torch.allclose(scalar.scores, per.scores, atol=1e-5)


def test_batch_size_does_not_change_scores(llama):
    clean, corrupted = _pair(5, 6, seed=10)
    metric = _metric(5)
    a = E.eap_ig(llama, clean, corrupted, metric, steps=2, batch_size=2)
    b = E.eap_ig(llama, clean, corrupted, metric, steps=2, batch_size=None)
    assert torch.allclose(a.per_prompt, b.per_prompt, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input_is_refused(llama):
    clean, corrupted = _pair(3, 6)
    metric = _metric(3)
    with pytest.raises(ValueError, match="differ in shape"):
        E.eap(llama, clean, corrupted[:, :5], metric)
    with pytest.raises(ValueError, match="steps"):
        E.eap_ig(llama, clean, corrupted, metric, steps=0)
    with pytest.raises(ValueError, match="direction"):
        E.eap(llama, clean, corrupted, metric, direction="sideways")
    with pytest.raises(ValueError, match="variant"):
        E.eap_ig(llama, clean, corrupted, metric, variant="gradients")
    with pytest.raises(ValueError, match="shape"):
        E.eap(llama, clean, corrupted, Metric(lambda lg: lg[:, -1, :3], "bad"))
    with pytest.raises(TypeError):
        E.eap(llama, clean, corrupted, "logit diff")
    with pytest.raises(ValueError, match="unknown sender"):
        E.patch_edges(llama, clean, corrupted, metric, [("L9H0", "logits")])
    with pytest.raises(ValueError, match="unknown receiver"):
        E.patch_edges(llama, clean, corrupted, metric, [("L0H0", "L1H0.k")])  # grouped: keys are L1KV0.k
    with pytest.raises(ValueError, match="not an edge"):
        E.patch_edges(llama, clean, corrupted, metric, [("L1H0", "L0H0.q")])
    g = Graph.for_model(llama)
    dangling = g.mask_of([("input", "L0H0.q")])
    with pytest.raises(ValueError, match="does not connect"):
        E.faithfulness(llama, clean, corrupted, metric, dangling)
    with pytest.raises(ValueError, match="ablation"):
        E.faithfulness(llama, clean, corrupted, metric, g.valid.clone(), ablation="zero")
    with pytest.raises(ValueError, match="score the same"):
        E.faithfulness(llama, clean, clean, metric, g.valid.clone())


@pytest.mark.slow
def test_smollm2_graph_and_scores(smollm2):
    from mechlib.ioi import make_ioi_dataset
    from mechlib.metrics import ioi_metric

    g = Graph.for_model(smollm2)
    assert g.n_edges == 70651 and g.shape.n_kv_heads == 3
    ds = make_ioi_dataset(smollm2, 2, seed=0)
    m = ioi_metric(ds)
    e = E.eap(smollm2, ds.tokens, ds.corrupted_tokens, m)
    top = e.top(3)
    exact = E.patch_edges(smollm2, ds.tokens, ds.corrupted_tokens, m, [k for k, _ in top])
    assert torch.isfinite(e.scores).all() and torch.isfinite(exact).all()


# ---- Gemma 3: post-sublayer norms, query/key norms, embedding scale, sliding windows ----------


@pytest.fixture(scope="module")
def gemma():
    return load_model("tiny-gemma3-3l", seed=0)


def _gemma_hook_patch(model, clean, corrupted, node: str):
    """The clean run with one sender's share replaced by its corrupted share, through the bridge's
    own hooks: a head's share under the post-attention norm is its ``z W_O`` times the norm's
    elementwise factor ``attn_out / sum_h z_h W_O^h``, read from the same run."""
    _, c_cache = model.run_with_cache(corrupted)
    _, k_cache = model.run_with_cache(clean)
    if node.startswith("MLP"):
        l = int(node[3:])
        name = f"blocks.{l}.hook_mlp_out"
        return model.run_with_hooks(clean, fwd_hooks=[(name, lambda a, hook: c_cache[name])])
    l, h = (int(x) for x in node[1:].split("H"))

    def share(cache):
        raw = torch.einsum("nthe,hed->nthd", cache[f"blocks.{l}.attn.hook_z"], model.W_O[l])
        return raw[:, :, h] * cache[f"blocks.{l}.hook_attn_out"] / raw.sum(2)

    delta = share(c_cache) - share(k_cache)
    return model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.hook_attn_out", lambda a, hook: a + delta)])


@pytest.mark.parametrize("node", ["L0H1", "L1H0", "L2H3", "MLP0", "MLP1"])
def test_gemma_patching_a_senders_every_edge_equals_patching_its_share_through_hooks(gemma, node):
    clean, corrupted = _pair(3, 7, seed=11)
    metric = _metric(3)
    gm = E.graph_model(gemma)
    assert gm.eng.post_norms and gm.eng.qk_norm and gm.eng.embed_scale is not None
    keep = gm.graph.valid.clone()
    keep[gm.graph.sender_index(node)] = False  # every edge out of the node carries the corrupted run's share
    f = E.faithfulness(gemma, clean, corrupted, metric, keep, require_connected=False)
    with torch.no_grad():
        vc, vk = float(metric(gemma(clean)).mean()), float(metric(gemma(corrupted)).mean())
        va = float(metric(_gemma_hook_patch(gemma, clean, corrupted, node)).mean())
    assert abs(f.value - (va - vk) / (vc - vk)) < 1e-4, (f.value, (va - vk) / (vc - vk))
    assert abs(va - vc) > 1e-4  # the patch changed the metric: the check has teeth


def test_gemma_head_shares_add_up_to_the_layer_output(gemma):
    clean, _ = _pair(2, 7, seed=12)
    gm = E.graph_model(gemma)
    out = gm.run(gm.embed(clean), last_only=False)
    _, cache = gemma.run_with_cache(clean)
    for l in range(gm.L):
        torch.testing.assert_close(out.ho[l].sum(2), cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-4)
    mean = out.mean()  # a mean run's shares are the mean of the prompts' shares
    torch.testing.assert_close(mean.ho[0], out.ho[0].mean(0, keepdim=True))
