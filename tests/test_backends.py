"""Backends agree: every hook point x every operation on the engine equals the bridge (the
reference) on three architectures; nnsight equals the engine on SmolLM2 (slow). Routing, the
resid_mid fix, metadata and error bars."""

import warnings

import pytest
import torch

from mechlib.ablation import ablation_hooks, run_ablated
from mechlib.attribution_patching import attribution_patch
from mechlib.backends import BackendUnavailableError, get_backend
from mechlib.interventions import POINTS, Freeze, Intervention, Noise, Patch, Record, Replace, Site, Zero
from mechlib.metrics import Metric
from mechlib.patching import evaluate_circuit, patch
from mechlib.path_patching import path_patch, path_patch_sweep


def _pair(model, batch=3, pos=7, seed=0, vocab=None):
    g = torch.Generator().manual_seed(seed)
    v = vocab or model.cfg.d_vocab
    return torch.randint(0, v, (batch, pos), generator=g), torch.randint(0, v, (batch, pos), generator=g)


def _raw(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def _points(model):
    pts = [
        "resid_pre",
        "q",
        "k",
        "v",
        "pattern",
        "z",
        "attn_out",
        "resid_mid",
        "mlp_pre",
        "mlp_post",
        "mlp_out",
        "resid_post",
    ]
    if model.cfg.attn_only:
        pts = [p for p in pts if not p.startswith("mlp") and p != "resid_mid"]
    return pts


def _every_op_lists(points, layers, T, means=None):
    """Every operation at every point and layer; ``Replace`` by ``means[hook]`` where given."""
    lists = []
    for p in points:
        for l in layers:
            h = 1 if POINTS[p].has_head else None
            lists += [
                [Intervention(Site(p, l, head=h, positions=(T - 3,)), Patch("clean"))],
                [Intervention(Site(p, l, head=h), Zero())],
                [Intervention(Site(p, l, positions=(2, T - 2), rows=(0, 2)), Noise(0.5, seed=1))],
                [
                    Intervention(Site(p, l, head=h), Freeze("corrupted")),
                    Intervention(Site(p, l, head=h, positions=(-1,)), Patch("clean")),
                ],
            ]
            if means is not None:
                lists.append([Intervention(Site(p, l, head=h), Replace(means[f"blocks.{l}.{POINTS[p].hook}"]))])
    lists.append([Intervention(Site("embed", positions=(1, 2)), Noise(0.3, seed=2))])
    lists.append([])
    return lists


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt", "tiny_attn"])
def test_engine_equals_bridge_for_every_point_and_operation(fixture, request):
    model = request.getfixturevalue(fixture)
    clean, corrupted = _pair(model)
    points = _points(model)
    hooks = [f"blocks.{l}.{POINTS[p].hook}" for l in range(2) for p in points]
    _, cc = model.run_with_cache(clean)
    means = {h: cc[h].mean(0, keepdim=True) for h in hooks}  # replace by the clean run's mean
    lists = _every_op_lists(points, range(model.cfg.n_layers), clean.shape[1], means)
    out = {}
    for name in ("engine", "bridge"):
        be = get_backend(model, name)
        assert be.name == name
        runs = be.cache({"clean": clean, "corrupted": corrupted}, hooks)
        out[name] = be.run(runs, lists, base="corrupted", score=_raw, min_rows=8)
    assert out["engine"].values.shape == (len(lists), 3)
    diff = (out["engine"].values - out["bridge"].values).abs().amax(-1)
    bad = [(str(lists[i][0]), float(diff[i])) for i in range(len(lists)) if diff[i] > 1e-4]
    assert not bad, bad
    base = out["bridge"].values[-1]  # the empty list: the corrupted run itself
    moved = (out["bridge"].values[:-1] - base).abs().amax(-1) > 1e-4
    assert moved.float().mean() > 0.8, "most interventions must change the score, or agreement proves little"
    assert out["engine"].calls > 1 and out["bridge"].calls == 1


def test_resid_mid_is_a_true_intervention_on_the_bridge(tiny_llama):
    """The bridge's own hook_resid_mid reaches the MLP but not the residual stream; the bridge backend
    routes resid_mid through attn_out, so patching it agrees with the engine (issue 11)."""
    clean, corrupted = _pair(tiny_llama, seed=4)
    metric = Metric(_raw, last_only=True)
    slow = patch(tiny_llama, clean, corrupted, metric, "resid_mid", progress=False, backend="bridge")
    fast = patch(tiny_llama, clean, corrupted, metric, "resid_mid", progress=False, backend="engine")
    assert slow.meta["backend"] == "bridge" and fast.meta["backend"] == "engine"
    assert torch.allclose(slow.values, fast.values, atol=1e-4), (slow.values - fast.values).abs().max()
    assert slow.values[-1, -1].item() == pytest.approx(1.0, abs=1e-4)  # the clean run's last residual: clean output
    # the raw hook really is not an intervention point: editing it there gives another answer
    _, cc = tiny_llama.run_with_cache(clean)
    name = "blocks.1.hook_resid_mid"

    def put(a, hook):
        a = a.clone()
        a[:, -1] = cc[name][:, -1]
        return a

    raw = float(_raw(tiny_llama.run_with_hooks(corrupted, fwd_hooks=[(name, put)]).detach()).mean())
    norm = (raw - slow.meta["corrupted"]) / (slow.meta["clean"] - slow.meta["corrupted"])
    assert abs(norm - 1.0) > 1e-3
    a = attribution_patch(tiny_llama, clean, corrupted, metric, "resid_mid", backend="bridge")
    b = attribution_patch(tiny_llama, clean, corrupted, metric, "resid_mid", backend="engine")
    assert torch.allclose(a.values, b.values, atol=1e-4)


def test_routing_and_metadata(tiny_llama):
    from mechlib.models import load_model

    assert get_backend(tiny_llama).name == "engine"
    assert get_backend(tiny_llama, "bridge").name == "bridge"
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend(tiny_llama, "gpu")
    plain = load_model("tiny-llama-2l", seed=0, compatibility_mode=False)
    assert get_backend(plain).name == "bridge"  # the engine mirrors compatibility-mode numerics only
    with pytest.raises(BackendUnavailableError, match="engine cannot run"):
        get_backend(plain, "engine")
    with pytest.raises(BackendUnavailableError, match="no Hugging Face form"):
        get_backend(tiny_llama, "nnsight")
    clean, corrupted = _pair(tiny_llama, seed=2)
    metric = Metric(_raw, last_only=True)
    with pytest.warns(DeprecationWarning, match="use_engine"):
        old = patch(tiny_llama, clean, corrupted, metric, "head_out", progress=False, use_engine=False)
    assert old.meta["backend"] == "bridge"
    with pytest.raises(ValueError, match="not both"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch(tiny_llama, clean, corrupted, metric, "head_out", progress=False, use_engine=False, backend="engine")
    pp = path_patch(tiny_llama, clean, corrupted, metric, ["L0H1"], "logits", backend="bridge")
    assert pp.meta["backend"] == "bridge"


def test_every_technique_agrees_across_backends(tiny_llama):
    clean, corrupted = _pair(tiny_llama, batch=4, seed=5)
    metric = Metric(_raw, last_only=True)
    e = path_patch_sweep(tiny_llama, clean, corrupted, metric, ["L1H2"], component="k", progress=False)
    b = path_patch_sweep(
        tiny_llama, clean, corrupted, metric, ["L1H2"], component="k", progress=False, backend="bridge"
    )
    assert torch.allclose(e.values, b.values, atol=1e-4, equal_nan=True)
    heads = ["L0H1", "L1H2"]
    ce = evaluate_circuit(tiny_llama, clean, heads, metric, reference=corrupted, groups=[0, 0, 1, 1])
    cb = evaluate_circuit(tiny_llama, clean, heads, metric, reference=corrupted, groups=[0, 0, 1, 1], backend="bridge")
    assert ce.meta["backend"] == "engine" and cb.meta["backend"] == "bridge"
    assert torch.allclose(ce.per_prompt, cb.per_prompt, atol=1e-4)
    # the ablation as interventions equals the ablation as hooks
    hooks = ablation_hooks(tiny_llama, ["L0H0", "L1H3"], "mean", reference=corrupted)
    want = _raw(tiny_llama.run_with_hooks(clean, fwd_hooks=hooks).detach())
    for name in ("engine", "bridge"):
        got = run_ablated(tiny_llama, clean, ["L0H0", "L1H3"], "mean", reference=corrupted, metric=_raw, backend=name)
        assert torch.allclose(got, want, atol=1e-4), name


def test_error_bars_over_prompts(tiny_llama):
    from transformer_lens.utilities.statistics import standard_error

    clean, corrupted = _pair(tiny_llama, batch=6, seed=6)
    metric = Metric(_raw, last_only=True)
    g = patch(tiny_llama, clean, corrupted, metric, "head_out_by_pos", layers=[1], progress=False)
    assert g.per_prompt.shape == (6, *g.values.shape)
    assert torch.allclose(g.per_prompt.mean(0), g.values, atol=1e-5, equal_nan=True)
    se = g.stderr()
    assert torch.allclose(se.values, standard_error(g.per_prompt, dim=0), atol=1e-6, equal_nan=True)
    assert torch.isnan(se.values[0]).all() and (se.values[1] > 0).all()
    lo, hi = g.ci(0.95)
    done = ~torch.isnan(g.values)
    assert (lo.values[done] <= g.values[done] + 1e-6).all() and (hi.values[done] >= g.values[done] - 1e-6).all()
    assert (hi.values[done] - lo.values[done]).max() > 0
    import matplotlib

    matplotlib.use("Agg")
    assert g.plot_top(5) is not None
    with pytest.raises(ValueError, match="per-prompt"):
        patch(tiny_llama, clean, corrupted, lambda lg: _raw(lg).mean(), "head_out", progress=False).ci()
    a = attribution_patch(tiny_llama, clean, corrupted, metric, "head_out")
    assert torch.allclose(a.per_prompt.mean(0), a.values, atol=1e-4)
    pp = path_patch(tiny_llama, clean, corrupted, metric, ["L0H1"], "logits")
    est = pp.ci()
    assert est.value == pytest.approx(pp.value, abs=1e-5) and est.low <= pp.value <= est.high and pp.stderr() > 0
    c = evaluate_circuit(tiny_llama, clean, ["L1H0"], metric, reference=corrupted)
    assert c.ci().value == pytest.approx(c.circuit_value, abs=1e-5)
    assert c.faithfulness_ci().value == pytest.approx(c.faithfulness, abs=1e-5)


def test_records_stop_early_on_the_engine(tiny_llama):
    clean, corrupted = _pair(tiny_llama, seed=7)
    be = get_backend(tiny_llama, "engine")
    runs = be.cache({"clean": clean, "corrupted": corrupted}, [])
    out = be.run(runs, [[Intervention(Site("q", 0), Record("q"))]], base="clean")
    _, cache = tiny_llama.run_with_cache(clean)
    assert out.values is None and torch.allclose(out.records[(0, "q")], cache["blocks.0.attn.hook_q"], atol=1e-5)


# ---- nnsight on the real model (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_nnsight_equals_the_engine_on_smollm2(smollm2):
    clean, corrupted = _pair(smollm2, batch=3, pos=6, seed=0, vocab=5000)
    points = [p for p in _points(smollm2) if p != "pattern"]
    hooks = [f"blocks.{l}.{POINTS[p].hook}" for l in (3, 20) for p in points]
    lists = _every_op_lists(points, (3, 20), 6)
    vals = {}
    for name in ("engine", "nnsight"):
        be = get_backend(smollm2, name)
        runs = be.cache({"clean": clean, "corrupted": corrupted}, hooks)
        vals[name] = be.run(runs, lists, base="corrupted", score=_raw).values
    assert (vals["engine"] - vals["nnsight"]).abs().max() < 1e-4
    assert vals["engine"].std() > 0.1
    metric = Metric(_raw, last_only=True)
    e = patch(smollm2, clean, corrupted, metric, "head_out_by_pos", layers=[20, 29], progress=False)
    n = patch(smollm2, clean, corrupted, metric, "head_out_by_pos", layers=[20, 29], progress=False, backend="nnsight")
    assert n.meta["backend"] == "nnsight"
    assert torch.allclose(e.values, n.values, atol=1e-4, equal_nan=True)
    # a Hugging Face model with no bridge at all (what a model too big for one machine looks like)
    from mechlib.backends.nnsight import NNsightModel, _hf_source

    hf = NNsightModel(_hf_source(smollm2))
    h = patch(hf, clean, corrupted, metric, "head_out_by_pos", layers=[20, 29], progress=False)
    assert h.meta["backend"] == "nnsight" and h.labels["pos"] == n.labels["pos"]
    assert torch.allclose(e.values, h.values, atol=1e-4, equal_nan=True)
    with pytest.raises(BackendUnavailableError, match="pattern"):
        patch(smollm2, clean, corrupted, metric, "pattern", layers=[0], progress=False, backend="nnsight")


@pytest.mark.slow
def test_nnsight_remote_fails_at_once_offline(smollm2):
    import time

    from mechlib.backends.nnsight import NNsightBackend, _hf_source, language_model

    lm = language_model(_hf_source(smollm2))
    t0 = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="NDIF"):
        NNsightBackend(lm, remote=True)
    assert time.perf_counter() - t0 < 10
