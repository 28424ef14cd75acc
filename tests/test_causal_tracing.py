"""Causal tracing (ROME): the batched tracer equals a plain loop of hooked bridge forwards."""

import math

import pytest
import torch

from mechlib.causal_tracing import (
    KINDS,
    FactTrace,
    RoleTrace,
    average_by_role,
    corruption_noise,
    trace_fact,
    trace_facts,
    trace_tokens,
    window_layers,
)
from mechlib.engine import Engine

TINY = ["tiny_llama", "tiny_gpt", "tiny_attn"]
HOOK = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def naive_trace(model, tokens, span, target, samples, noise, window, seed, kinds):
    """ROME's loop written out plainly: one hooked bridge forward per (kind, layer, token)."""
    s0, s1 = span
    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, noise, seed)
    batch = tokens[None].repeat(samples, 1)
    clean_batch = tokens[None]
    _, clean_cache = model.run_with_cache(clean_batch)

    def corrupt(act, hook):
        act = act.clone()
        act[:, s0:s1] += nz
        return act

    def prob(hooks):
        with torch.no_grad():
            logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)] + hooks)
        return logits[:, -1].float().softmax(-1)[:, target].mean().item()

    corrupted = prob([])
    out = {}
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[0]
    for kind in kinds:
        grid = torch.zeros(n_layers, n_pos)
        for t in range(n_pos):
            for layer in range(n_layers):
                layers = [layer] if kind == "resid" else range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
                hooks = []
                for l in layers:
                    name = f"blocks.{l}.{HOOK[kind]}"

                    def restore(act, hook, name=name, t=t):
                        act = act.clone()
                        act[:, t] = clean_cache[name][0, t]
                        return act

                    hooks.append((name, restore))
                grid[layer, t] = prob(hooks)
        out[kind] = grid
    return corrupted, out


@pytest.mark.parametrize("fixture", TINY)
def test_batched_tracer_equals_naive_loop(fixture, request):
    model = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,), generator=g)
    target = int(model(tokens[None])[0, -1].argmax())
    kinds = tuple(k for k in KINDS if not (k == "mlp" and model.cfg.attn_only))
    span = (2, 5)  # tokens 0-1 precede the subject: the tracer skips them, the loop does not
    got = trace_tokens(model, tokens, span, target, samples=3, noise=2.0, window=2, seed=5, kinds=kinds)
    corrupted, expected = naive_trace(model, tokens, span, target, 3, 2.0, 2, 5, kinds)
    assert abs(got.corrupted_prob - corrupted) < 1e-6
    for kind in kinds:
        diff = (got.restored[kind].values - expected[kind]).abs().max().item()
        scale = (expected[kind] - corrupted).abs().max().item()
        assert scale > 1e-4, f"{kind}: the restorations must move the probability for the test to mean anything"
        assert diff < 1e-5 and diff < 1e-3 * scale, f"{kind}: batched and naive differ by {diff} (effects up to {scale})"
        # Before the subject, restoring changes nothing, exactly.
        assert torch.all(got.effect(kind).values[:, : span[0]] == 0)


@pytest.mark.parametrize("arch", ["tiny-llama-2l", "tiny-attn-2l"])
def test_batched_tracer_equals_naive_loop_on_a_deeper_model(arch):
    """Windows that lie inside the model (their first block is applied in closed form)."""
    from mechlib.models import _REGISTRY, random_model

    model = random_model({**_REGISTRY[arch].config, "n_layers": 5}, seed=3)
    tokens = torch.randint(0, model.cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(8))
    target = int(model(tokens[None])[0, -1].argmax())
    kinds = ("mlp", "attn") if not model.cfg.attn_only else ("attn",)
    got = trace_tokens(model, tokens, (1, 3), target, samples=2, noise=2.0, window=3, seed=1, kinds=kinds)
    corrupted, expected = naive_trace(model, tokens, (1, 3), target, 2, 2.0, 3, 1, kinds)
    for kind in kinds:
        diff = (got.restored[kind].values - expected[kind]).abs().max().item()
        assert (expected[kind] - corrupted).abs().max() > 1e-4, kind
        assert diff < 1e-5, f"{kind}: batched and naive differ by {diff}"


def test_severed_trace_equals_the_bridge_loop():
    from mechlib.models import random_model

    model = random_model(n_layers=4, seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(2))
    target = int(model(tokens[None])[0, -1].argmax())
    kw = dict(samples=2, noise=2.0, window=3, seed=0, severed=("mlp", "attn"), kinds=("resid",))
    fast = trace_tokens(model, tokens, (1, 3), target, **kw)
    slow = trace_tokens(model, tokens, (1, 3), target, method="bridge", **kw)
    assert fast.severed_token == 2
    assert set(fast.severed) == {"none", "mlp", "attn"}
    for variant in fast.severed:
        assert torch.allclose(fast.severed[variant].values, slow.severed[variant].values, atol=1e-6), variant
    # Freezing the later MLPs changes the early-layer restorations (and not the last layer's).
    eff = fast.severed_effect()
    assert (eff.values[0, 0] - eff.values[0, 1]).abs() > 1e-5
    assert torch.allclose(eff.values[-1, 0], eff.values[-1, 1])
    assert torch.allclose(fast.severed["none"].values, fast.restored["resid"].values[:, 2])


def test_resume_rows_equals_resume_per_start_layer(tiny_llama):
    engine = Engine(tiny_llama)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    base = engine.run(tokens)
    pos = 3
    starts = torch.tensor([2, 0, 1, 1, 0])
    index = torch.tensor([0, 1, 1, 0, 0])
    bump = torch.randn(5, 8 - pos, tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(4))
    resid = torch.stack([
        (base[f"blocks.{s}.hook_resid_pre"] if s < 2 else base["blocks.1.hook_resid_post"])[b, pos:] for s, b in zip(starts.tolist(), index.tolist())
    ]) + bump
    seen = []

    def edit(act, ctx):
        seen.append(ctx.rows.tolist())
        return act * 1.5

    got = engine.resume_rows(base, starts, pos, resid=resid, base_index=index, edits={"blocks.1.hook_mlp_out": edit})
    for i in range(5):
        want = engine.resume(base, int(starts[i]), pos, base_index=index[i : i + 1], resid=resid[i : i + 1], last_only=True,
                             edits={"blocks.1.hook_mlp_out": lambda a, c: a * 1.5} if starts[i] <= 1 else {})
        assert torch.allclose(got[i], want[0], atol=1e-5), i
    assert sorted(seen[0]) == [1, 2, 3, 4]  # rows starting at layer <= 1; row 0 starts above
    with pytest.raises(ValueError, match="start_layers"):
        engine.resume_rows(base, torch.tensor([0, 3]), pos, resid=resid[:2])


def test_resume_with_a_permuted_base_index_of_the_same_size(tiny_llama):
    # A base_index as long as the base's batch but not in order must still gather the prefix.
    engine = Engine(tiny_llama)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    base = engine.run(tokens)
    swapped = engine.resume(base, 1, 3, base_index=torch.tensor([1, 0]))
    assert torch.allclose(swapped, base.logits[[1, 0]], atol=1e-5)


def test_window_layers_centre_and_clip():
    assert window_layers(12, 10, 30) == range(7, 17)
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(3, 1, 30) == range(3, 4)
    assert len(window_layers(5, 3, 30)) == 3 and 5 in window_layers(5, 3, 30)


def test_average_by_role_and_peaks(tiny_gpt):
    g = torch.Generator().manual_seed(1)
    traces = []
    for span in [(1, 4), (0, 1)]:
        tokens = torch.randint(0, 256, (6,), generator=g)
        target = int(tiny_gpt(tokens[None])[0, -1].argmax())
        traces.append(trace_tokens(tiny_gpt, tokens, span, target, samples=2, noise=2.0, window=2))
    avg = average_by_role(traces)
    assert isinstance(avg, RoleTrace) and avg.n_facts == 2
    assert avg.role_counts["middle subject tokens"] == 1  # only the 3-token subject has one
    assert avg.role_counts["last subject token"] == 2
    resid = avg.effect("resid")
    assert resid.dims == ("layer", "role") and resid.shape == (2, 6)
    # last subject token: mean of position 3 of the first trace and position 0 of the second
    want = (traces[0].effect("resid").values[:, 3] + traces[1].effect("resid").values[:, 0]) / 2
    assert torch.allclose(resid.values[:, 2], want)
    assert torch.allclose(resid.values[:, 1], traces[0].effect("resid").values[:, 2])
    assert math.isclose(avg.total_effect, sum(t.total_effect for t in traces) / 2, rel_tol=1e-6)
    peak = avg.peak("attn")
    assert peak.value == pytest.approx(float(torch.nan_to_num(avg.effect("attn").values, nan=-1).max()))
    fp = traces[0].peak("mlp")
    assert fp.value == pytest.approx(float(traces[0].effect("mlp").values.max()))
    assert fp.role == traces[0].roles[fp.index]
    import matplotlib

    matplotlib.use("Agg")
    assert traces[0].plot() is not None and avg.plot() is not None


def test_bad_input_is_a_clear_error(tiny_gpt, tiny_attn):
    tokens = torch.arange(6)
    with pytest.raises(ValueError, match="noise"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=0.0)
    with pytest.raises(ValueError, match="noise"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=-1.0)
    with pytest.raises(ValueError, match="window"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=1.0, window=tiny_gpt.cfg.n_layers + 1)
    with pytest.raises(ValueError, match="window"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=1.0, window=0)
    with pytest.raises(ValueError, match="samples"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=1.0, window=2, samples=0)
    with pytest.raises(ValueError, match="subject span"):
        trace_tokens(tiny_gpt, tokens, (4, 9), 5, noise=1.0, window=2)
    with pytest.raises(ValueError, match="kinds"):
        trace_tokens(tiny_gpt, tokens, (1, 3), 5, noise=1.0, window=2, kinds=("mlps",))
    with pytest.raises(ValueError, match="attention-only"):
        trace_tokens(tiny_attn, tokens, (1, 3), 5, noise=1.0, window=2, kinds=("mlp",))
    with pytest.raises(ValueError, match="tokenizer"):
        trace_fact(tiny_gpt, "The Eiffel Tower is in", subject="Eiffel Tower", attribute=" Paris", noise=1.0, window=2)


@pytest.mark.slow
def test_text_errors_on_smollm2(smollm2):
    with pytest.raises(ValueError, match="does not occur"):
        trace_fact(smollm2, "The Eiffel Tower is located in the city of", subject="Louvre", attribute=" Paris")
    with pytest.raises(ValueError, match="tokens"):
        trace_fact(smollm2, "The Eiffel Tower is located in the city of", subject="Eiffel Tower", attribute=" Parisian Francophone")
    with pytest.raises(ValueError, match="window"):
        trace_fact(smollm2, "The Eiffel Tower is located in the city of", subject="Eiffel Tower", attribute=" Paris", window=31)


@pytest.mark.slow
def test_one_smollm2_fact_traces_and_restoring_the_top_state_gives_the_clean_probability(smollm2):
    import time

    t0 = time.perf_counter()
    tr = trace_fact(smollm2, "The capital of France is the city of", subject="France", attribute=" Paris", samples=1)
    elapsed = time.perf_counter() - t0
    assert isinstance(tr, FactTrace)
    n_layers = smollm2.cfg.n_layers
    assert tr.restored["resid"].shape == (n_layers, len(tr.str_tokens))
    assert tr.str_tokens[tr.subject_start] == " France" and tr.subject_end == tr.subject_start + 1
    assert tr.clean_prob > 0.5 and tr.corrupted_prob < tr.clean_prob
    # The last layer's residual at the last token IS the output: restoring it restores p_clean.
    assert abs(tr.restored["resid"].values[n_layers - 1, -1].item() - tr.clean_prob) < 1e-5
    # Restoring the whole last token from layer 0 (its residual after block 0 depends on the
    # subject only through attention) helps less than restoring it near the top.
    assert tr.effect("resid").values[n_layers - 1, -1] > tr.effect("resid").values[0, -1]
    assert elapsed < 120, f"one fact took {elapsed:.0f} s (a few seconds on an idle 2-core machine)"


@pytest.mark.slow
def test_trace_facts_progress_and_noise(smollm2, capsys):
    from mechlib.facts import load_facts

    facts = load_facts("country_capital")[:2]
    traces = trace_facts(smollm2, facts, samples=1, kinds=("resid",), noise=0.3, progress=False)
    assert len(traces) == 2 and all(t.noise == 0.3 for t in traces)
    assert "causal tracing" not in capsys.readouterr().err
