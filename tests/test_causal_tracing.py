"""Causal tracing (ROME): the intervention lists, on every backend, equal a plain loop of hooked bridge forwards."""

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


def naive_trace(model, tokens, span, target, samples, noise, window, seed, kinds, site="hook_embed"):
    """ROME's loop written out plainly: one hooked bridge forward per (kind, layer, token).

    ``site`` is the hook the noise is added at: the token embeddings (ROME), or
    ``blocks.0.hook_resid_post`` for MLP 0 counted as part of the embedding."""
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
            logits = model.run_with_hooks(batch, fwd_hooks=[(site, corrupt)] + hooks)
        return logits[:, -1].float().softmax(-1)[:, target].mean().item()

    corrupted = prob([])
    out = {}
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[0]
    for kind in kinds:
        grid = torch.zeros(n_layers, n_pos)
        for t in range(n_pos):
            for layer in range(n_layers):
                layers = (
                    [layer]
                    if kind == "resid"
                    else range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
                )
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
        assert diff < 1e-5 and diff < 1e-3 * scale, (
            f"{kind}: batched and naive differ by {diff} (effects up to {scale})"
        )
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
    slow = trace_tokens(model, tokens, (1, 3), target, backend="bridge", **kw)
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
    resid = (
        torch.stack(
            [
                (base[f"blocks.{s}.hook_resid_pre"] if s < 2 else base["blocks.1.hook_resid_post"])[b, pos:]
                for s, b in zip(starts.tolist(), index.tolist())
            ]
        )
        + bump
    )
    seen = []

    def edit(act, ctx):
        seen.append(ctx.rows.tolist())
        return act * 1.5

    got = engine.resume_rows(base, starts, pos, resid=resid, base_index=index, edits={"blocks.1.hook_mlp_out": edit})
    for i in range(5):
        want = engine.resume(
            base,
            int(starts[i]),
            pos,
            base_index=index[i : i + 1],
            resid=resid[i : i + 1],
            last_only=True,
            edits={"blocks.1.hook_mlp_out": lambda a, c: a * 1.5} if starts[i] <= 1 else {},
        )
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
        trace_fact(
            smollm2,
            "The Eiffel Tower is located in the city of",
            subject="Eiffel Tower",
            attribute=" Parisian Francophone",
        )
    with pytest.raises(ValueError, match="window"):
        trace_fact(
            smollm2, "The Eiffel Tower is located in the city of", subject="Eiffel Tower", attribute=" Paris", window=31
        )


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


# ----------------------------------------------------------------------------------------
# Per-layer MLP traces, MLP 0 as part of the embedding, severing (issue 16)
# ----------------------------------------------------------------------------------------


def _deep(arch, seed=3, n_layers=5):
    from mechlib.models import _REGISTRY, random_model

    return random_model({**_REGISTRY[arch].config, "n_layers": n_layers}, seed=seed)


def _argmax_target(model, tokens):
    with torch.no_grad():
        return int(model(tokens[None])[0, -1].argmax())


@pytest.mark.parametrize("arch", ["tiny-llama-2l", "tiny-2l"])
def test_restoring_mlp0_alone_equals_the_hand_computed_restored_run(arch):
    model = _deep(arch)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(11))
    target = _argmax_target(model, tokens)
    s0, s1, S, noise, seed = 1, 4, 3, 2.0, 7
    got = trace_tokens(model, tokens, (s0, s1), target, samples=S, noise=noise, window=1, seed=seed, kinds=("mlp",))
    # By hand: noise the subject's embeddings, put MLP 0's clean output back at token t.
    nz = torch.randn(S, s1 - s0, model.cfg.d_model, generator=torch.Generator().manual_seed(seed)) * noise
    _, clean = model.run_with_cache(tokens[None])
    for t in (s1 - 1, s0, tokens.shape[0] - 1):

        def corrupt(act, hook):
            act = act.clone()
            act[:, s0:s1] += nz
            return act

        def put_back(act, hook, t=t):
            act = act.clone()
            act[:, t] = clean["blocks.0.hook_mlp_out"][0, t]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens[None].repeat(S, 1), fwd_hooks=[("hook_embed", corrupt), ("blocks.0.hook_mlp_out", put_back)]
            )
        want = logits[:, -1].float().softmax(-1)[:, target].mean().item()
        assert got.restored["mlp"].values[0, t].item() == pytest.approx(want, abs=1e-6), t
    assert (got.effect("mlp").values[0, s0:s1].abs() > 1e-4).any(), (
        "restoring MLP 0 must move p for the test to mean anything"
    )
    # Every single layer, against ROME's loop with window 1.
    corrupted, expected = naive_trace(model, tokens, (s0, s1), target, S, noise, 1, seed, ("mlp",))
    assert torch.allclose(got.restored["mlp"].values, expected["mlp"], atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama-2l", "tiny-2l", "tiny-attn-2l"])
def test_block0_corruption_equals_noise_added_after_block0(arch):
    """corrupt="block0": block 0 runs clean and the noise is added to blocks.0.hook_resid_post
    at the subject; checked against plain bridge hooks doing exactly that."""
    model = _deep(arch, seed=5)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(12))
    target = _argmax_target(model, tokens)
    kinds = tuple(k for k in KINDS if not (k == "mlp" and model.cfg.attn_only))
    span, S, noise, seed = (2, 4), 3, 2.0, 4
    got = trace_tokens(
        model, tokens, span, target, samples=S, noise=noise, window=3, seed=seed, kinds=kinds, corrupt="block0"
    )
    corrupted, expected = naive_trace(
        model, tokens, span, target, S, noise, 3, seed, kinds, site="blocks.0.hook_resid_post"
    )
    assert got.corrupt == "block0"
    assert got.corrupted_prob == pytest.approx(corrupted, abs=1e-6)
    embed_noised = trace_tokens(
        model, tokens, span, target, samples=S, noise=noise, window=3, seed=seed, kinds=("resid",)
    )
    assert abs(embed_noised.corrupted_prob - got.corrupted_prob) > 1e-4, "the two corruptions must differ"
    for kind in kinds:
        assert (expected[kind] - corrupted).abs().max() > 1e-4, kind
        diff = (got.restored[kind].values - expected[kind]).abs().max().item()
        assert diff < 1e-5, f"{kind}: engine and bridge hooks differ by {diff}"
    # Block 0's outputs are clean in the corrupted run: restoring them alone changes nothing.
    one = trace_tokens(
        model,
        tokens,
        span,
        target,
        samples=S,
        noise=noise,
        window=1,
        seed=seed,
        kinds=tuple(k for k in kinds if k != "resid"),
        corrupt="block0",
    )
    for kind in one.kinds:
        assert torch.all(one.effect(kind).values[0] == 0), kind
        assert (one.effect(kind).values[1:, span[0] :].abs() > 1e-5).any(), kind
    # The same through the library's own bridge loop (the fallback path).
    slow = trace_tokens(
        model,
        tokens,
        span,
        target,
        samples=S,
        noise=noise,
        window=3,
        seed=seed,
        kinds=kinds,
        corrupt="block0",
        backend="bridge",
    )
    for kind in kinds:
        assert torch.allclose(slow.restored[kind].values[:, span[0] :], expected[kind][:, span[0] :], atol=1e-5), kind


@pytest.mark.parametrize("backend", ["engine", "bridge"])
def test_block0_noise_is_the_clean_block0_output_plus_noise(backend):
    """The corrupted run's residual after block 0 is the clean one plus the seeded noise, on the
    subject only (computed independently: clean resid_mid + clean MLP 0 output + noise)."""
    from mechlib.backends import RunSpec, get_backend
    from mechlib.causal_tracing import corruption

    model = _deep("tiny-llama-2l", seed=2, n_layers=3)
    tokens = torch.randint(0, model.cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(1))
    nz = corruption_noise(2, 2, model.cfg.d_model, 1.5, seed=3)
    be = get_backend(model, backend)
    hooks = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    runs = be.cache({"corrupted": RunSpec(tokens[None].repeat(2, 1), corruption(nz, 6, (1, 3), "block0"))}, hooks)
    corr = runs["corrupted"]
    _, cache = model.run_with_cache(tokens[None])
    want = (cache["blocks.0.hook_resid_mid"] + cache["blocks.0.hook_mlp_out"]).repeat(2, 1, 1)
    want[:, 1:3] += nz
    assert torch.allclose(corr["blocks.0.hook_resid_post"], want, atol=1e-5)
    assert torch.allclose(corr["blocks.0.hook_mlp_out"], cache["blocks.0.hook_mlp_out"].expand(2, -1, -1), atol=1e-5)


def test_block0_outputs_equal_per_prompt_runs():
    from mechlib.facts import block0_outputs

    model = _deep("tiny-llama-2l", seed=1, n_layers=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 6, 4)]
    spans = [(0, 2), (3, 6), (1, 2)]
    got = block0_outputs(model, prompts, spans, batch_size=2)  # right-padded batches
    want = []
    for p, (a, b) in zip(prompts, spans):
        _, cache = model.run_with_cache(torch.tensor([p]))
        want.append(cache["blocks.0.hook_resid_post"][0, a:b])
    assert torch.allclose(got, torch.cat(want), atol=1e-5)
    with pytest.raises(ValueError, match="span"):
        block0_outputs(model, [[1, 2]], [(1, 3)])


def test_default_noise_for_block0_is_the_spread_of_block0_outputs(tiny_llama):
    from mechlib.causal_tracing import default_noise_scale

    emb = default_noise_scale(tiny_llama)
    b0 = default_noise_scale(tiny_llama, "block0")
    _, cache = tiny_llama.run_with_cache(torch.arange(tiny_llama.cfg.d_vocab)[:, None])
    assert b0.std == pytest.approx(float(cache["blocks.0.hook_resid_post"].float().std()), rel=1e-4)
    assert emb.std == pytest.approx(float(tiny_llama.W_E.detach().float().std()), rel=1e-5)
    tr = trace_tokens(
        tiny_llama,
        torch.arange(5),
        (1, 2),
        3,
        samples=1,
        window=1,
        kinds=("resid",),
        corrupt="block0",
        allow_unpredicted=True,
    )
    assert tr.noise == pytest.approx(3 * b0.std) and "block-0" in tr.noise_source


def naive_severed(model, tokens, span, target, samples, noise, seed, variant, site="hook_embed", freeze_from=None):
    """ROME's severed loop: restore the residual at (L, last subject token); hold the MLP
    (attention) outputs at that token at their corrupted values in the layers from
    ``freeze_from(L)`` on (ROME: L + 1)."""
    s0, s1 = span
    t = s1 - 1
    nz = corruption_noise(samples, s1 - s0, model.cfg.d_model, noise, seed)
    batch = tokens[None].repeat(samples, 1)
    _, clean = model.run_with_cache(tokens[None])
    suffix = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}[variant]

    def corrupt(act, hook):
        act = act.clone()
        act[:, s0:s1] += nz
        return act

    names = [f"blocks.{l}.{suffix}" for l in range(model.cfg.n_layers)]
    cache = {}

    def save(act, hook):
        cache[hook.name] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(site, corrupt)] + [(n, save) for n in names])
    out = []
    for L in range(model.cfg.n_layers):

        def restore(act, hook, L=L):
            act = act.clone()
            act[:, t] = clean[f"blocks.{L}.hook_resid_post"][0, t]
            return act

        def freeze(act, hook):
            act = act.clone()
            act[:, t] = cache[hook.name][:, t]
            return act

        first = L + 1 if freeze_from is None else freeze_from(L)
        hooks = [(site, corrupt), (f"blocks.{L}.hook_resid_post", restore)] + [
            (names[l], freeze) for l in range(first, len(names))
        ]
        with torch.no_grad():
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)
        out.append(logits[:, -1].float().softmax(-1)[:, target].mean().item())
    return torch.tensor(out)


@pytest.mark.parametrize("corrupt,site", [("embed", "hook_embed"), ("block0", "blocks.0.hook_resid_post")])
def test_severing_freezes_only_layers_above_the_restored_one_never_mlp0(corrupt, site):
    model = _deep("tiny-llama-2l", seed=4)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(3))
    target = _argmax_target(model, tokens)
    span, S, noise, seed = (1, 4), 3, 2.0, 2
    got = trace_tokens(
        model,
        tokens,
        span,
        target,
        samples=S,
        noise=noise,
        window=1,
        seed=seed,
        kinds=("resid",),
        severed=("mlp", "attn"),
        corrupt=corrupt,
    )
    for variant in ("mlp", "attn"):
        want = naive_severed(model, tokens, span, target, S, noise, seed, variant, site=site)
        assert torch.allclose(got.severed[variant].values, want, atol=1e-5), variant
        # Freezing from layer 0 on (MLP 0 included) is the same: the restored state overrides it.
        all_frozen = naive_severed(
            model, tokens, span, target, S, noise, seed, variant, site=site, freeze_from=lambda L: 0
        )
        assert torch.allclose(all_frozen, want, atol=1e-5), variant
    eff = got.severed_effect().values
    assert (eff[:-1, 0] - eff[:-1, 1]).abs().max() > 1e-4  # severing MLPs matters below the top


def test_role_trace_keeps_per_fact_values_and_intervals(tiny_gpt):
    from mechlib.facts import TOKEN_ROLES
    from mechlib.stats import mean_ci

    g = torch.Generator().manual_seed(2)
    traces = []
    for span in [(1, 4), (0, 1), (2, 3), (1, 3)]:
        tokens = torch.randint(0, 256, (6,), generator=g)
        target = _argmax_target(tiny_gpt, tokens)
        traces.append(trace_tokens(tiny_gpt, tokens, span, target, samples=2, noise=2.0, window=1, severed=("mlp",)))
    avg = average_by_role(traces)
    last = [tr.effect("mlp").values[:, tr.subject_end - 1] for tr in traces]
    v = avg.values("mlp", "last subject token")
    assert v.shape == (4, tiny_gpt.cfg.n_layers)
    assert torch.allclose(v, torch.stack(last))
    est = avg.ci("mlp", "last subject token", 0)
    ref = mean_ci(torch.stack(last)[:, 0])
    assert (est.value, est.low, est.high, est.n) == pytest.approx((ref.value, ref.low, ref.high, ref.n))
    both = avg.ci("mlp", "last subject token", [0, 1])
    assert both.value == pytest.approx(float(torch.stack(last).mean()))
    assert avg.stderr("mlp", "last subject token", 0) == pytest.approx(float(torch.stack(last)[:, 0].std() / 2))
    # Middle subject tokens: only the 3-token subject has one.
    assert avg.values("mlp", "middle subject tokens").shape[0] == 1 == avg.role_counts["middle subject tokens"]
    assert avg.ci("mlp", "middle subject tokens", 1).method == "single"
    sev = avg.severed_values("mlp")
    assert torch.allclose(sev, torch.stack([tr.severed_effect().values[:, 1] for tr in traces]))
    assert avg.ci("severed:none", "last subject token", 0).value == pytest.approx(float(avg.severed.values[0, 0]))
    assert avg.total_effect_ci().value == pytest.approx(avg.total_effect, rel=1e-6)
    assert avg.per_fact["mlp"].shape == (4, tiny_gpt.cfg.n_layers, len(TOKEN_ROLES))
    with pytest.raises(ValueError, match="role"):
        avg.ci("mlp", "subject", 0)
    with pytest.raises(ValueError, match="layers"):
        avg.ci("mlp", "last token", 7)
    with pytest.raises(ValueError, match="last subject token"):
        avg.ci("severed:mlp", "last token", 0)
    other = trace_tokens(tiny_gpt, torch.arange(6), (1, 2), 0, samples=1, noise=2.0, window=2, allow_unpredicted=True)
    with pytest.raises(ValueError, match="window"):
        average_by_role(traces + [other])


# ----------------------------------------------------------------------------------------
# Bad input and unpredicted attributes (issue 11)
# ----------------------------------------------------------------------------------------


def test_an_attribute_the_model_does_not_predict_is_refused_unless_allowed(tiny_llama):
    tokens = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        probs = tiny_llama(tokens[None])[0, -1].softmax(-1)
    worst, best = int(probs.argmin()), int(probs.argmax())
    assert probs[worst] < 0.1 * probs[best]
    with pytest.raises(ValueError, match=f"does not predict.*top next token '{best}'.*allow_unpredicted"):
        trace_tokens(tiny_llama, tokens, (1, 3), worst, samples=1, noise=1.0, window=1)
    tr = trace_tokens(tiny_llama, tokens, (1, 3), worst, samples=1, noise=1.0, window=1, allow_unpredicted=True)
    assert tr.top_token == best and tr.top_prob == pytest.approx(float(probs[best]), rel=1e-4)
    assert tr.clean_prob == pytest.approx(float(probs[worst]), rel=1e-3)
    with pytest.raises(ValueError, match="does not predict"):  # the bridge backend checks too
        trace_tokens(tiny_llama, tokens, (1, 3), worst, samples=1, noise=1.0, window=1, backend="bridge")
    with pytest.raises(TypeError, match="allow_unpredicted"):
        trace_tokens(tiny_llama, tokens, (1, 3), best, samples=1, noise=1.0, window=1, allow_unpredicted="yes")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(noise=True), TypeError, "noise"),
        (dict(noise="3"), TypeError, "noise"),
        (dict(samples=True), TypeError, "samples"),
        (dict(samples=2.0), TypeError, "samples"),
        (dict(window=True), TypeError, "window"),
        (dict(window=1.5), TypeError, "window"),
        (dict(seed=0.5), TypeError, "seed"),
        (dict(subject=2), TypeError, "subject"),
        (dict(subject="12"), TypeError, "subject"),
        (dict(subject=(1, 3, 4)), ValueError, "subject"),
        (dict(subject=(1,)), ValueError, "subject"),
        (dict(subject=(1.0, 3)), TypeError, "subject start"),
        (dict(target=True), TypeError, "target"),
        (dict(target=5.0), TypeError, "target"),
        (dict(kinds="mlp"), TypeError, "kinds"),
        (dict(severed="mlp"), TypeError, "severed"),
        (dict(corrupt="mlp0"), ValueError, "corrupt"),
        (dict(max_rows=0), ValueError, "max_rows"),
    ],
)
def test_bad_tracing_arguments_name_the_argument(tiny_gpt, kwargs, exc, match):
    args = dict(tokens=torch.arange(6), subject=(1, 3), target=5, noise=1.0, window=1, samples=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        trace_tokens(tiny_gpt, args.pop("tokens"), args.pop("subject"), args.pop("target"), **args)


def test_trace_fact_refuses_a_non_string_subject(tiny_gpt):
    with pytest.raises(TypeError, match="subject must be a string"):
        trace_fact(tiny_gpt, "The Eiffel Tower is in", subject=2, attribute=" Paris")


@pytest.mark.slow
def test_smollm2_unpredicted_attribute_says_what_the_model_predicts(smollm2):
    prompt = "The Eiffel Tower is located in the city of"
    with pytest.raises(ValueError, match=r"does not predict.*' Paris'.*leading space") as no_space:
        trace_fact(smollm2, prompt, subject="Eiffel Tower", attribute="Paris", samples=1, kinds=("resid",))
    with pytest.raises(ValueError, match=r"does not predict.*ends in a space"):
        trace_fact(smollm2, prompt + " ", subject="Eiffel Tower", attribute="Paris", samples=1, kinds=("resid",))
    assert "top next token ' Paris'" in str(no_space.value)


@pytest.mark.slow
def test_smollm2_block0_noise_scale_matches_per_prompt_runs(smollm2):
    from mechlib.facts import load_facts, noise_scale, subject_token_span

    facts = load_facts("country_capital")[:5]
    got = noise_scale(smollm2, facts, at="block0")
    rows = []
    for f in facts:
        s0, s1 = subject_token_span(smollm2, f.prompt, f.subject)
        _, cache = smollm2.run_with_cache(smollm2.to_tokens(f.prompt))
        rows.append(cache["blocks.0.hook_resid_post"][0, s0:s1])
    assert got.std == pytest.approx(float(torch.cat(rows).std()), rel=1e-4)
    assert "block-0" in got.measured_on and got.n_tokens == sum(r.shape[0] for r in rows)


def test_positions_restrict_the_trace_to_chosen_tokens(tiny_llama):
    tokens = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(4))
    target = _argmax_target(tiny_llama, tokens)
    kw = dict(samples=2, noise=2.0, window=1, seed=1, severed=("mlp",))
    full = trace_tokens(tiny_llama, tokens, (1, 4), target, **kw)
    part = trace_tokens(tiny_llama, tokens, (1, 4), target, positions=["last subject token", -1, 0], **kw)
    for kind in full.kinds:
        for t in (0, 3, 6):
            assert torch.allclose(part.restored[kind].values[:, t], full.restored[kind].values[:, t], atol=1e-6), (
                kind,
                t,
            )
        assert torch.isnan(part.restored[kind].values[:, [1, 2, 4, 5]]).all()
    assert torch.allclose(part.severed["mlp"].values, full.severed["mlp"].values, atol=1e-6)
    assert part.peak("mlp").index in (0, 3, 6)
    slow = trace_tokens(tiny_llama, tokens, (1, 4), target, positions=[3], backend="bridge", **kw)
    assert torch.allclose(slow.restored["mlp"].values[:, 3], full.restored["mlp"].values[:, 3], atol=1e-5)
    avg = average_by_role([part])
    assert torch.allclose(avg.values("mlp", "last subject token")[0], full.effect("mlp").values[:, 3])
    assert avg.values("mlp", "first subsequent token").shape[0] == 0  # not traced: no fact has it
    with pytest.raises(TypeError, match="positions"):
        trace_tokens(tiny_llama, tokens, (1, 4), target, positions="last token", **kw)
    with pytest.raises(ValueError, match="not a token role"):
        trace_tokens(tiny_llama, tokens, (1, 4), target, positions=["subject"], **kw)
    with pytest.raises(ValueError, match="positions"):
        trace_tokens(tiny_llama, tokens, (1, 4), target, positions=[9], **kw)


def test_embedding_noise_is_measured_on_what_hook_embed_sees_gemma_scale():
    """Gemma multiplies its embeddings by sqrt(d_model); the noise reference must include it,
    or the corruption is that many times too weak."""
    from mechlib.causal_tracing import default_noise_scale
    from mechlib.facts import embedding_std
    from mechlib.models import load_model

    model = load_model("tiny-gemma3-3l")
    ids = torch.arange(model.cfg.d_vocab)
    _, cache = model.run_with_cache(ids[None], names_filter=["hook_embed"])
    seen = float(cache["hook_embed"].float().std())
    assert abs(seen / float(model.W_E.detach().float().std()) - 1) > 0.5, "the test model must scale its embeddings"
    assert embedding_std(model, ids) == pytest.approx(seen, rel=1e-4)
    if getattr(model, "tokenizer", None) is None:
        assert default_noise_scale(model).std == pytest.approx(seen, rel=1e-4)
    else:  # measured on the facts' subject tokens, as hook_embed sees them in their prompts
        from mechlib.facts import load_facts, noise_scale, subject_token_span

        facts = load_facts("country_capital")[:3]
        rows = []
        for f in facts:
            s0, s1 = subject_token_span(model, f.prompt, f.subject)
            _, c = model.run_with_cache(model.to_tokens(f.prompt), names_filter=["hook_embed"])
            rows.append(c["hook_embed"][0, s0:s1])
        assert noise_scale(model, facts).std == pytest.approx(float(torch.cat(rows).float().std()), rel=1e-4)
    tokens = torch.randint(0, model.cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(2))
    target = _argmax_target(model, tokens)
    got = trace_tokens(model, tokens, (1, 3), target, samples=2, noise=2.0, window=2, seed=0, kinds=("resid", "mlp"))
    corrupted, expected = naive_trace(model, tokens, (1, 3), target, 2, 2.0, 2, 0, ("resid", "mlp"))
    for kind in ("resid", "mlp"):
        assert torch.allclose(got.restored[kind].values[:, 1:], expected[kind][:, 1:], atol=1e-5), kind


# ----------------------------------------------------------------------------------------
# One implementation, every backend (issue 9)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("corrupt", ["embed", "block0"])
@pytest.mark.parametrize("arch", ["tiny-llama-2l", "tiny-2l", "tiny-attn-2l"])
def test_engine_backend_equals_bridge_backend(arch, corrupt):
    """Every kind, window and severed variant: the engine's resumed rows equal the bridge's full
    hooked forwards of the same intervention lists, and each trace names its backend."""
    model = _deep(arch, seed=6, n_layers=4)
    tokens = torch.randint(0, model.cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(13))
    target = _argmax_target(model, tokens)
    kinds = tuple(k for k in KINDS if not (k == "mlp" and model.cfg.attn_only))
    severed = ("attn",) if model.cfg.attn_only else ("mlp", "attn")
    kw = dict(samples=2, noise=2.0, window=3, seed=1, kinds=kinds, severed=severed, corrupt=corrupt)
    fast = trace_tokens(model, tokens, (2, 4), target, backend="engine", **kw)
    slow = trace_tokens(model, tokens, (2, 4), target, backend="bridge", **kw)
    assert (fast.backend, slow.backend) == ("engine", "bridge")
    assert fast.restored["resid"].meta["backend"] == "engine"
    assert fast.corrupted_prob == pytest.approx(slow.corrupted_prob, abs=1e-6)
    for kind in kinds:
        ref = slow.restored[kind].values
        assert (ref - slow.corrupted_prob).abs().max() > 1e-4, kind  # the restorations move p
        assert (fast.restored[kind].values - ref).abs().max() < 1e-4, kind
    assert set(fast.severed) == {"none", *severed}
    for variant in fast.severed:
        assert (fast.severed[variant].values - slow.severed[variant].values).abs().max() < 1e-4, variant
    assert (slow.severed_effect().values[:-1, 0] - slow.severed_effect().values[:-1, 1]).abs().max() > 1e-5


def test_auto_backend_is_recorded_and_method_is_a_deprecated_alias(tiny_llama):
    tokens = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4))
    target = _argmax_target(tiny_llama, tokens)
    kw = dict(samples=1, noise=1.0, window=1, kinds=("resid",))
    assert trace_tokens(tiny_llama, tokens, (1, 3), target, **kw).backend == "engine"
    with pytest.warns(DeprecationWarning, match="backend="):
        old = trace_tokens(tiny_llama, tokens, (1, 3), target, method="bridge", **kw)
    assert old.backend == "bridge"
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        trace_tokens(tiny_llama, tokens, (1, 3), target, method="bridge", backend="engine", **kw)
    with pytest.raises(ValueError, match="backend"):
        trace_tokens(tiny_llama, tokens, (1, 3), target, backend="gpu", **kw)


@pytest.mark.slow
def test_nnsight_backend_traces_like_the_engine_on_smollm2(smollm2):
    kw = dict(
        subject="Eiffel Tower",
        attribute=" Paris",
        samples=1,
        kinds=("resid", "mlp"),
        severed=("mlp",),
        positions=["last subject token", -1],
    )
    prompt = "The Eiffel Tower is located in the city of"
    fast = trace_fact(smollm2, prompt, backend="engine", **kw)
    hf = trace_fact(smollm2, prompt, backend="nnsight", **kw)
    assert hf.backend == "nnsight"
    assert hf.corrupted_prob == pytest.approx(fast.corrupted_prob, abs=1e-4)
    for kind in fast.kinds:
        assert torch.allclose(hf.restored[kind].values, fast.restored[kind].values, atol=1e-4, equal_nan=True), kind
    for variant in fast.severed:
        assert torch.allclose(hf.severed[variant].values, fast.severed[variant].values, atol=1e-4), variant
