"""Activation patching matches transformer_lens.patching; path and attribution patching are exact
where they must be; bad input gets clear errors."""

import pytest
import torch

from mechlib.attribution_patching import attribution_patch, compare
from mechlib.metrics import Metric, answer_prob, logit_diff, normalised
from mechlib.patching import TARGETS, PatchResult, patch
from mechlib.path_patching import path_patch, path_patch_sweep

TL_NAMES = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "head_out": "get_act_patch_attn_head_out_all_pos",
    "head_out_by_pos": "get_act_patch_attn_head_out_by_pos",
    "q": "get_act_patch_attn_head_q_all_pos",
    "q_by_pos": "get_act_patch_attn_head_q_by_pos",
    "k": "get_act_patch_attn_head_k_all_pos",
    "k_by_pos": "get_act_patch_attn_head_k_by_pos",
    "v": "get_act_patch_attn_head_v_all_pos",
    "v_by_pos": "get_act_patch_attn_head_v_by_pos",
    "pattern": "get_act_patch_attn_head_pattern_all_pos",
    "pattern_by_pos": "get_act_patch_attn_head_pattern_by_pos",
}


def _pair(model, batch=3, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    return clean, corrupted


def _raw(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def _as_tl(grid, target):
    """Our layer x head x pos -> TL's layer x pos x head (patterns stay layer x head x pos)."""
    v = grid.values
    if v.ndim == 3 and TARGETS[target].kind == "head":
        v = v.permute(0, 2, 1)
    return v


CASES = [("tiny_llama", t) for t in sorted(TL_NAMES)] + [
    ("tiny_gpt", t) for t in ("resid_pre", "mlp_out", "head_out_by_pos", "v")
]
NOISE = {"resid_pre", "head_out_by_pos", "k_by_pos", "pattern_by_pos"}


@pytest.mark.parametrize("fixture,target", CASES)
def test_matches_transformer_lens(fixture, target, request):
    """Same grid as transformer_lens.patching.get_act_patch_* (denoising), within 1e-4; for some
    targets also noising (= TL with the clean and corrupted roles swapped)."""
    from transformer_lens import patching as tlp

    model = request.getfixturevalue(fixture)
    clean, corrupted = _pair(model, batch=2, pos=5)
    tl = getattr(tlp, TL_NAMES[target])
    metric = Metric(_raw, last_only=True)
    ours = patch(model, clean, corrupted, metric, target, normalise=False, progress=False)
    _, clean_cache = model.run_with_cache(clean)
    ref = tl(model, corrupted, clean_cache, _raw)
    assert _as_tl(ours, target).shape == ref.shape
    assert torch.allclose(_as_tl(ours, target), ref, atol=1e-4), (_as_tl(ours, target) - ref).abs().max()
    assert ref.std() > 1e-3, "the grid must vary, or matching it proves nothing"
    if fixture == "tiny_llama" and target in NOISE:
        noised = patch(model, clean, corrupted, metric, target, direction="noise", normalise=False, progress=False)
        _, corr_cache = model.run_with_cache(corrupted)
        ref_noise = tl(model, clean, corr_cache, _raw)
        assert torch.allclose(_as_tl(noised, target), ref_noise, atol=1e-4)


@pytest.mark.parametrize("target", ["resid_pre", "head_out_by_pos", "k_by_pos", "pattern"])
def test_bridge_fallback_and_full_logit_metrics_agree_with_the_engine(tiny_llama, target):
    clean, corrupted = _pair(tiny_llama, seed=3)
    fast = patch(tiny_llama, clean, corrupted, Metric(_raw, last_only=True), target, progress=False)
    slow = patch(tiny_llama, clean, corrupted, _raw, target, progress=False, backend="bridge")
    assert torch.allclose(fast.values, slow.values, atol=1e-4)
    assert slow.meta["calls"] < fast.values.numel(), "the fallback batches cells too"


def test_resid_mid_is_a_true_intervention(tiny_llama):
    """Patching resid_mid of the last layer at the last position from the clean run gives the
    clean run's output exactly (the bridge's own hook_resid_mid does not: see the report)."""
    clean, corrupted = _pair(tiny_llama, seed=4)
    g = patch(tiny_llama, clean, corrupted, Metric(_raw, last_only=True), "resid_mid", progress=False)
    assert g.values[-1, -1].item() == pytest.approx(1.0, abs=1e-4)
    assert g.values[-1, :-1].abs().max() < 1e-4  # earlier positions cannot reach the last one


def test_normalisation_and_grid_labels(tiny_gpt):
    clean, corrupted = _pair(tiny_gpt, seed=5)
    metric = Metric(_raw, last_only=True)
    raw = patch(tiny_gpt, clean, corrupted, metric, "resid_post", normalise=False, progress=False)
    norm = patch(tiny_gpt, clean, corrupted, metric, "resid_post", progress=False)
    vc, vk = raw.meta["clean"], raw.meta["corrupted"]
    assert torch.allclose(norm.values, (raw.values - vk) / (vc - vk), atol=1e-5)
    assert norm.values[-1, -1].item() == pytest.approx(1.0, abs=1e-4)  # the last residual = the clean run
    noised = patch(tiny_gpt, clean, corrupted, metric, "resid_post", direction="noise", progress=False)
    assert noised.values[-1, -1].item() == pytest.approx(0.0, abs=1e-4)
    # normalised() does the same for any metric
    nm = normalised(metric, vc, vk)
    assert float(nm.scalar(tiny_gpt(clean).detach())) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="same"):
        normalised(metric, 1.0, 1.0)


def test_subsets_are_nan_and_top_and_plot_work(tiny_llama):
    clean, corrupted = _pair(tiny_llama, seed=6)
    g = patch(
        tiny_llama,
        clean,
        corrupted,
        Metric(_raw, last_only=True),
        "head_out_by_pos",
        layers=[1],
        heads=[0, 2],
        positions=[-1, 2],
        progress=False,
    )
    assert isinstance(g, PatchResult) and g.dims == ("layer", "head", "pos")
    done = ~torch.isnan(g.values)
    assert int(done.sum()) == 4 and bool(done[1, 0, 6]) and bool(done[1, 2, 2]) and not bool(done[0].any())
    top = g.top(10)
    assert len(top) == 4 and all(c["layer"] == 1 for c, _ in top)
    assert g.heads().labels["head"][:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    import matplotlib

    matplotlib.use("Agg")
    assert g.plot() is not None
    kv = patch(tiny_llama, clean, corrupted, Metric(_raw, last_only=True), "v", progress=False)
    assert kv.dims == ("layer", "kv_head") and kv.values.shape == (2, tiny_llama.cfg.n_key_value_heads)
    assert kv.label(layer=1, kv_head=0) == "L1KV0"


def test_bad_input_gets_clear_errors(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    metric = Metric(_raw, last_only=True)
    with pytest.raises(ValueError, match="differ in shape"):
        patch(tiny_llama, clean, corrupted[:, :-1], metric, progress=False)
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        patch(tiny_llama, clean[0], corrupted[0], metric, progress=False)
    with pytest.raises(ValueError, match="returned shape"):
        patch(tiny_llama, clean, corrupted, lambda lg: lg[:, -1], "head_out", progress=False)
    with pytest.raises(KeyError, match="unknown patching target"):
        patch(tiny_llama, clean, corrupted, metric, "hook_zz", progress=False)
    with pytest.raises(ValueError, match="layer"):
        patch(tiny_llama, clean, corrupted, metric, layers=[5], progress=False)
    with pytest.raises(ValueError, match="head"):
        patch(tiny_llama, clean, corrupted, metric, heads=[9], progress=False)
    with pytest.raises(ValueError, match="key/value heads"):
        patch(tiny_llama, clean, corrupted, metric, "k", heads=[3], progress=False)
    with pytest.raises(ValueError, match="position"):
        patch(tiny_llama, clean, corrupted, metric, positions=[40], progress=False)
    with pytest.raises(ValueError, match="direction"):
        patch(tiny_llama, clean, corrupted, metric, direction="sideways", progress=False)
    with pytest.raises(ValueError, match="same"):
        patch(tiny_llama, clean, clean, metric, progress=False)  # nothing to normalise by
    with pytest.raises(ValueError, match="receiver"):
        path_patch(tiny_llama, clean, corrupted, metric, ["L0H1"], ["L7H0"])
    with pytest.raises(ValueError, match="sender"):
        path_patch(tiny_llama, clean, corrupted, metric, ["L0H9"], "logits")
    with pytest.raises(ValueError, match="component"):
        path_patch(tiny_llama, clean, corrupted, metric, ["L0H1"], ["L1H0"], component="z")


def test_metric_builders_check_answers():
    logits = torch.zeros(2, 3, 10)
    logits[:, -1, 4] = 3.0
    m = logit_diff(None, torch.tensor([4, 4]), torch.tensor([1, 2]))
    assert m.last_only and m(logits).tolist() == [3.0, 3.0]
    p = answer_prob(None, 4)
    assert p(logits).shape == (2,) and float(p(logits)[0]) > 0.5
    assert not logit_diff(None, 4, 1, pos=torch.tensor([1, 2])).last_only
    with pytest.raises(ValueError, match="answers"):
        logit_diff(None, torch.tensor([4, 4, 4]), torch.tensor([1, 2]))(logits)
    with pytest.raises(ValueError, match="returned shape"):
        Metric(lambda lg: lg[:, -1, :2]).evaluate(logits)
    with pytest.raises(ValueError, match="logits"):
        Metric(lambda lg: lg.sum()).evaluate(logits[0])


@pytest.mark.slow
def test_multi_token_answer_is_refused(smollm2):
    with pytest.raises(ValueError, match="one token"):
        logit_diff(smollm2, " Mary", " Bartholomewson")
    m = logit_diff(smollm2, " Mary", " John")
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert float(m(smollm2(tokens).detach())) > 2.0


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_path_patching_equals_a_hand_built_direct_path(tiny_llama, backend):
    """Sender L0H1 -> receiver L1Hh's query with MLPs frozen is exactly: add the sender's
    clean-minus-corrupted write to L1's residual, recompute only L1Hh's query, run on."""
    model = tiny_llama
    clean, corrupted = _pair(model, seed=7)
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)
    metric = Metric(_raw, last_only=True)
    delta = (cc["blocks.0.attn.hook_z"][:, :, 1] - kc["blocks.0.attn.hook_z"][:, :, 1]) @ model.W_O[0, 1]
    store = {}

    def record(a, hook):
        store["q"] = a.clone()

    model.run_with_hooks(
        corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: a + delta), ("blocks.1.attn.hook_q", record)]
    )
    sweep = path_patch_sweep(
        model,
        clean,
        corrupted,
        metric,
        ["L1H2"],
        direction="denoise",
        freeze_mlps=True,
        normalise=False,
        progress=False,
        backend=backend,
    )
    values = []
    for h in range(model.cfg.n_heads):

        def put(a, hook, h=h):
            a = a.clone()
            a[:, :, h] = store["q"][:, :, h]
            return a

        ref = float(_raw(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_q", put)]).detach()))
        got = path_patch(
            model,
            clean,
            corrupted,
            metric,
            [(0, 1)],
            [(1, h)],
            direction="denoise",
            freeze_mlps=True,
            normalise=False,
            backend=backend,
        )
        assert got.value == pytest.approx(ref, abs=1e-4)
        values.append(ref)
    assert max(values) - min(values) > 1e-3
    # the batched sweep gives each sender's single path patch
    single = path_patch(
        model,
        clean,
        corrupted,
        metric,
        [(0, 3)],
        ["L1H2"],
        direction="denoise",
        freeze_mlps=True,
        normalise=False,
        backend=backend,
    )
    assert sweep.values[0, 3].item() == pytest.approx(single.value, abs=1e-4)
    assert torch.isnan(sweep.values[1]).all()  # no path from layer 1 into layer 1


@pytest.mark.parametrize("receivers", [["L1H2", "L1H0"], "logits"])
def test_path_patch_many_equals_one_call_per_sender_set(tiny_llama, receivers):
    from mechlib.path_patching import path_patch_many

    clean, corrupted = _pair(tiny_llama, seed=9)
    metric = Metric(lambda lg: lg[:, -1, 3] - lg[:, -1, 5], last_only=True)
    sets = [["L0H1"], ["L0H0", "L0H3"], [(0, 2)]]
    if receivers == "logits":
        sets.append(["L1H1"])
    many = path_patch_many(tiny_llama, clean, corrupted, metric, sets, receivers)
    for s, r in zip(sets, many, strict=True):
        alone = path_patch(tiny_llama, clean, corrupted, metric, s, receivers)
        assert r.senders == alone.senders and r.receivers == alone.receivers
        assert r.value == pytest.approx(alone.value, abs=1e-5)
        assert torch.allclose(r.per_prompt, alone.per_prompt, atol=1e-5)
    assert len({round(r.value, 4) for r in many}) == len(sets), "different senders must differ"
    with pytest.raises(TypeError, match="each a list of heads"):
        path_patch_many(tiny_llama, clean, corrupted, metric, ["L0H1", "L0H2"], receivers)
    with pytest.raises(ValueError, match="sender_sets\\[1\\]"):
        path_patch_many(tiny_llama, clean, corrupted, metric, [["L0H1"], ["L9H0"]], receivers)


def test_path_patching_to_logits_and_kv_receivers(tiny_llama):
    model = tiny_llama
    clean, corrupted = _pair(model, seed=8)
    metric = Metric(_raw, last_only=True)
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)

    def z_hook(layer, heads_from_corrupted):
        def fn(a, hook):
            out = cc[hook.name].clone()  # frozen to the clean run ...
            for h in heads_from_corrupted:
                out[:, :, h] = kc[hook.name][:, :, h]  # ... except the senders
            return out

        return (f"blocks.{layer}.attn.hook_z", fn)

    # One sender into the logits: its corrupted output, every later head frozen, MLPs recomputed.
    ref = float(_raw(model.run_with_hooks(clean, fwd_hooks=[z_hook(0, [1]), z_hook(1, [])]).detach()))
    got = path_patch(model, clean, corrupted, metric, ["L0H1"], "logits", normalise=False)
    assert got.value == pytest.approx(ref, abs=1e-4)
    # Every head a sender: nothing is frozen, so it is all heads' outputs patched at once.
    every = [(l, h) for l in range(2) for h in range(model.cfg.n_heads)]
    ref_all = float(_raw(model.run_with_hooks(clean, fwd_hooks=[z_hook(0, range(4)), z_hook(1, range(4))]).detach()))
    got_all = path_patch(model, clean, corrupted, metric, every, "logits", normalise=False)
    assert got_all.value == pytest.approx(ref_all, abs=1e-4)
    assert abs(got_all.value - got.value) > 1e-3
    # k/v receivers on a grouped-query model patch the receiver's KV head, shared by its group.
    kv = path_patch(model, clean, corrupted, metric, ["L0H0"], ["L1H3"], component="k")
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert kv.meta["kv_receivers"] == {f"L1KV{3 // group}": [f"L1H{3 // group * group + j}" for j in range(group)]}


@pytest.mark.parametrize("target", ["head_out_by_pos", "resid_pre", "k", "pattern_by_pos"])
def test_attribution_patching_engine_equals_bridge(tiny_llama, target):
    clean, corrupted = _pair(tiny_llama, seed=9)
    metric = Metric(_raw, last_only=True)
    a = attribution_patch(tiny_llama, clean, corrupted, metric, target)
    b = attribution_patch(tiny_llama, clean, corrupted, metric, target, backend="bridge")
    assert torch.allclose(a.values, b.values, atol=1e-4)
    exact = patch(tiny_llama, clean, corrupted, metric, target, progress=False)
    cmp = compare(a, exact)
    assert cmp.n == exact.values.numel() and -1.0 <= cmp.correlation <= 1.0


def test_attribution_is_the_directional_derivative(tiny_gpt):
    """Each cell's estimate minus the base score is grad . (a_clean - a_corrupted): check it against
    a finite difference through the bridge's hooks, and the grid against exact patching."""
    model = tiny_gpt
    clean, corrupted = _pair(model, seed=10)
    metric = Metric(_raw, last_only=True)
    approx = attribution_patch(model, clean, corrupted, metric, "resid_pre", normalise=False)
    base = float(_raw(model(corrupted).detach()))
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)
    eps = 1e-2
    for layer, pos in [(1, 6), (1, 2), (0, 4)]:
        name = f"blocks.{layer}.hook_resid_pre"
        delta = cc[name][:, pos] - kc[name][:, pos]

        def nudge(a, hook, s, pos=pos, delta=delta):
            a = a.clone()
            a[:, pos] += s * eps * delta
            return a

        up = float(
            _raw(model.run_with_hooks(corrupted, fwd_hooks=[(name, lambda a, hook: nudge(a, hook, 1))]).detach())
        )
        down = float(
            _raw(model.run_with_hooks(corrupted, fwd_hooks=[(name, lambda a, hook: nudge(a, hook, -1))]).detach())
        )
        fd = (up - down) / (2 * eps)
        est = float(approx.values[layer, pos]) - base
        assert est == pytest.approx(fd, rel=0.05, abs=1e-3), (layer, pos, est, fd)


def test_head_attention_reads_the_pattern(tiny_llama):
    from mechlib.patching import head_attention

    tokens, _ = _pair(tiny_llama, seed=11)
    _, cache = tiny_llama.run_with_cache(tokens)
    q = torch.tensor([6, 5, 6])
    g = head_attention(tiny_llama, tokens, ["L1H2", (0, 3)], q, {"first": 0, "k": torch.tensor([2, 3, 4])})
    assert g.dims == ("head", "key") and g.labels["head"] == ["L1H2", "L0H3"]
    pat = cache["blocks.1.attn.hook_pattern"][torch.arange(3), 2, q]
    assert g.values[0, 0].item() == pytest.approx(float(pat[:, 0].mean()), abs=1e-5)
    assert g.values[0, 1].item() == pytest.approx(float(pat[torch.arange(3), torch.tensor([2, 3, 4])].mean()), abs=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        head_attention(tiny_llama, tokens, ["L4H0"], 6, {"a": 0})


def test_evaluate_circuit(tiny_attn):
    from mechlib.patching import evaluate_circuit

    clean, corrupted = _pair(tiny_attn, batch=4, seed=12)
    metric = Metric(lambda lg: lg[:, -1, 3] - lg[:, -1, 5], last_only=True)
    every = [(l, h) for l in range(2) for h in range(tiny_attn.cfg.n_heads)]
    whole = evaluate_circuit(tiny_attn, clean, every, metric, reference=corrupted)
    assert whole.faithfulness == pytest.approx(1.0, abs=1e-5)
    part = evaluate_circuit(tiny_attn, clean, every[:2], metric, reference=corrupted, groups=[0, 0, 1, 1])
    assert part.per_prompt.shape == (4,) and abs(part.circuit_value - part.model_value) > 1e-4


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_circuit_evaluator_equals_one_call_per_circuit_and_computes_means_once(tiny_llama, backend, monkeypatch):
    import mechlib.circuits as circuits
    from mechlib.patching import CircuitEvaluator, evaluate_circuit

    clean, corrupted = _pair(tiny_llama, batch=4, seed=3)
    metric = Metric(lambda lg: lg[:, -1, 3] - lg[:, -1, 5], last_only=True)
    every = [(l, h) for l in range(2) for h in range(tiny_llama.cfg.n_heads)]
    wanted = [every, every[:2], ["L1H1", "L0H0", "L0H3"]]
    alone = [
        evaluate_circuit(tiny_llama, clean, c, metric, reference=corrupted, groups=[0, 0, 1, 1], backend=backend)
        for c in wanted
    ]
    calls = []
    real = circuits.head_means
    monkeypatch.setattr(circuits, "head_means", lambda *a, **k: calls.append(1) or real(*a, **k))
    score = CircuitEvaluator(tiny_llama, clean, metric, reference=corrupted, groups=[0, 0, 1, 1], backend=backend)
    together = score.many(wanted)
    assert [score(c).circuit_value for c in wanted[:2]] == [t.circuit_value for t in together[:2]]
    assert len(calls) == 1, "the means are computed once for every circuit"
    for a, t in zip(alone, together):
        assert a.heads == t.heads and a.model_value == pytest.approx(t.model_value, abs=1e-6)
        assert torch.allclose(a.per_prompt, t.per_prompt, atol=1e-5)
    assert together[0].faithfulness == pytest.approx(1.0, abs=1e-5)
    assert len({round(t.circuit_value, 4) for t in together}) == 3, "different circuits must score differently"
    with pytest.raises(TypeError, match="each a list of heads"):
        score.many(["L1H1", "L0H0"])
    assert score.many([]) == []


def test_grid_top_skips_nan_cells_in_every_order():
    from mechlib.results import Grid

    g = Grid(torch.tensor([[0.5, float("nan")], [-2.0, 0.1]]), ("layer", "head"))
    assert [(c, round(v, 3)) for c, v in g.top(10)] == [
        ({"layer": 0, "head": 0}, 0.5),
        ({"layer": 1, "head": 1}, 0.1),
        ({"layer": 1, "head": 0}, -2.0),
    ]
    assert [round(v, 3) for _, v in g.top(2, largest=False)] == [-2.0, 0.1]
    assert [round(v, 3) for _, v in g.top(2, absolute=True)] == [-2.0, 0.5]
    assert [round(v, 3) for _, v in g.top(2, absolute=True, largest=False)] == [0.1, 0.5]
    assert g.top_labels(1) == ["L0H0"]
