"""The engine mirrors the bridge exactly, and resuming from a base run is exact."""

import pytest
import torch

from mechlib.engine import HOOKS_PER_LAYER, Engine, UnsupportedModelError, get_engine

TINY = ["tiny_llama", "tiny_gpt", "tiny_attn", "tiny_gemma"]


@pytest.fixture(scope="module")
def tiny_gemma():
    """A random 3-layer Gemma 3 (sliding window 4 on layers 0-1, global layer 2), via the bridge."""
    from mechlib.models import load_model

    return load_model("tiny-gemma3-3l", seed=0)


@pytest.mark.parametrize("fixture", TINY)
def test_every_activation_matches_the_bridge(fixture, request):
    model = request.getfixturevalue(fixture)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    base = Engine(model).run(tokens)
    assert torch.allclose(base.logits, logits, atol=1e-5)
    compared = 0
    for name, act in base.acts.items():
        assert name in cache.keys(), f"engine fires {name}, the bridge has no such hook"
        assert act.shape == cache[name].shape, name
        assert torch.allclose(act, cache[name], atol=1e-5), f"{name} differs by {(act - cache[name]).abs().max()}"
        compared += 1
    per_layer = 8 if model.cfg.attn_only else 12
    assert compared >= model.cfg.n_layers * per_layer


@pytest.mark.parametrize("fixture", TINY)
@pytest.mark.parametrize("hook", ["attn.hook_z", "hook_resid_pre", "attn.hook_v", "attn.hook_pattern"])
def test_resume_with_an_edit_equals_the_hooked_bridge(fixture, hook, request):
    model = request.getfixturevalue(fixture)
    engine = Engine(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    base = engine.run(tokens)
    layer, pos = 1, 4
    name = f"blocks.{layer}.{hook}"

    # Not a pure rescaling: Gemma's post-attention RMSNorm would undo that (hook_z * 3 is a no-op).
    def scale_suffix(act, ctx):  # positions >= pos only (the suffix the engine recomputes)
        if hook == "attn.hook_pattern":
            return act * 0.5
        return act * 3.0 + 0.1

    def bridge_hook(act, hook):
        act = act.clone()
        if name.endswith("hook_pattern"):
            act[:, :, pos:] *= 0.5
        else:
            act[:, pos:] = act[:, pos:] * 3.0 + 0.1
        return act

    expected = model.run_with_hooks(tokens, fwd_hooks=[(name, bridge_hook)])
    got = engine.resume(base, layer, pos, edits={name: scale_suffix})
    assert not torch.allclose(expected, base.logits, atol=1e-3), "the edit must change the output"
    assert torch.allclose(got, expected, atol=1e-5)
    # Many interventions batched against repeated base prompts give the same rows.
    index = torch.tensor([1, 0, 1])
    batched = engine.resume(base, layer, pos, edits={name: scale_suffix}, base_index=index, last_only=True)
    assert torch.allclose(batched, expected[index, -1], atol=1e-5)


def test_bad_hook_names_and_ranges_are_clear_errors(tiny_llama):
    engine = Engine(tiny_llama)
    base = engine.run(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(KeyError, match="do not exist"):
        engine.resume(base, 0, 0, edits={"blocks.7.attn.hook_z": lambda a, c: a})
    with pytest.raises(KeyError, match="do not exist"):
        engine.run(torch.zeros(1, 4, dtype=torch.long), edits={"blocks.0.hook_typo": lambda a, c: a})
    with pytest.raises(ValueError, match="start_pos"):
        engine.resume(base, 0, 4)
    with pytest.raises(ValueError, match="context"):
        engine.run(torch.zeros(1, tiny_llama.cfg.n_ctx + 1, dtype=torch.long))


def test_gemma3_parts_are_mirrored_not_skipped(tiny_gemma):
    """The tiny Gemma exercises every addition: each one changes the output if left out."""
    engine = Engine(tiny_gemma)
    cfg = tiny_gemma.cfg
    assert engine.embed_scale is not None and float(engine.embed_scale) == pytest.approx(cfg.d_model**0.5)
    assert engine.qk_norm and engine.post_norms
    assert engine.layer_window == [4, 4, None]
    assert engine.layer_scale == [24**-0.5] * 3  # query_pre_attn_scalar, not d_head
    assert engine.extras == ("embed_scale", "qk_norm", "post_norms", "sliding_window", "attn_scale")
    tokens = torch.randint(0, cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(2))
    _, cache = tiny_gemma.run_with_cache(tokens)
    # The bridge's sliding layers see 4 keys; its global layer sees all of them.
    assert torch.all(cache["blocks.0.attn.hook_pattern"][:, :, 9, :6] == 0)
    assert torch.all(cache["blocks.2.attn.hook_pattern"][:, :, 9, :6] > 0)
    base = engine.run(tokens).logits
    for attr, off in [
        ("layer_window", [None] * 3),
        ("embed_scale", None),
        ("qk_norm", False),
        ("post_attn_w", []),
        ("post_mlp_w", []),
        ("layer_scale", [0.25] * 3),
    ]:
        saved = getattr(engine, attr)
        setattr(engine, attr, off)
        try:
            assert not torch.allclose(engine.run(tokens).logits, base, atol=1e-3), f"{attr} made no difference"
        finally:
            setattr(engine, attr, saved)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt", "tiny_attn"])
def test_llama_and_gpt2_style_models_use_no_gemma_extras(fixture, request):
    assert Engine(request.getfixturevalue(fixture)).extras == ()


def test_unsupported_models_are_refused(tiny_llama):
    from mechlib.models import random_model

    raw = random_model(compatibility_mode=False, seed=0)
    with pytest.raises(UnsupportedModelError, match="compatibility"):
        Engine(raw)
    assert get_engine(raw) is None


def test_get_engine_rebuilds_after_weights_change():
    from mechlib.models import random_model

    model = random_model(seed=3)
    first = get_engine(model)
    assert get_engine(model) is first
    with torch.no_grad():
        model.W_E.mul_(2.0) if model.W_E.is_leaf else next(model.parameters()).mul_(2.0)
    second = get_engine(model)
    assert second is not first


@pytest.fixture(scope="module")
def gemma3():
    from mechlib.models import load_model

    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_every_activation_matches_the_bridge(gemma3):
    tokens = gemma3.to_tokens(["The Eiffel Tower is in the city of", "When Mary and John went to the store, John"])
    logits, cache = gemma3.run_with_cache(tokens)
    base = Engine(gemma3).run(tokens)
    assert torch.allclose(base.logits, logits, atol=1e-4), (base.logits - logits).abs().max()
    # float32 rounding, relative to each hook's scale: Gemma's residual stream reaches the
    # hundreds (post-norm weights up to ~12), where one float32 ulp is already ~1e-5.
    worst = max(float((act - cache[name]).abs().max() / cache[name].abs().max()) for name, act in base.acts.items())
    print(
        f"gemma3-270m engine vs bridge: logits max abs diff {(base.logits - logits).abs().max():.2e}, "
        f"worst hook relative diff {worst:.2e}"
    )
    for name, act in base.acts.items():
        scale = cache[name].abs().max()
        assert (act - cache[name]).abs().max() <= 1e-5 * scale, f"{name} differs by {(act - cache[name]).abs().max()}"
    assert len(base.acts) >= gemma3.cfg.n_layers * len(HOOKS_PER_LAYER)


@pytest.mark.slow
def test_smollm2_logits_match_the_bridge(smollm2):
    tokens = smollm2.to_tokens("The Eiffel Tower is located in the city of")
    expected = smollm2(tokens)
    base = Engine(smollm2).run(tokens, keep=())
    assert torch.allclose(base.logits, expected, atol=1e-4)


@pytest.mark.parametrize("fixture", TINY)
def test_last_only_runs_the_top_block_on_the_last_token_and_stays_exact(fixture, request, monkeypatch):
    model = request.getfixturevalue(fixture)
    engine = Engine(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(6))
    base = engine.run(tokens)
    top = model.cfg.n_layers - 1
    edits = {"blocks.0.hook_attn_out": lambda a, c: a * 2.0, f"blocks.{top}.attn.hook_v": lambda a, c: a * 0.5}
    trimmed = []
    forward = engine._forward

    def spy(*args, **kwargs):
        trimmed.append(kwargs.get("last_at_top", False))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", spy)
    full = engine.resume(base, 0, 4, edits=edits)
    last = engine.resume(base, 0, 4, edits=edits, last_only=True)
    assert trimmed == [False, True]
    assert not torch.allclose(full[:, -1], base.logits[:, -1], atol=1e-3), "the edits must change the output"
    assert torch.allclose(last, full[:, -1], atol=1e-5)
    # Rows starting at different layers (one only unembedded) come back in their own order.
    resid = torch.stack([base["blocks.0.hook_resid_pre"][0, 4:], base[f"blocks.{top}.hook_resid_post"][1, 4:]])
    rows = engine.resume_rows(
        base, torch.tensor([0, top + 1]), 4, resid=resid, base_index=torch.tensor([0, 1]), edits=edits
    )
    assert torch.allclose(rows[0], full[0, -1], atol=1e-5)
    assert torch.allclose(rows[1], base.logits[1, -1], atol=1e-5)
    # An edit after the top block's queries at an earlier token must not reach the last token:
    # the engine computes that block in full for it (a trimmed block would edit the last token).
    bump = {f"blocks.{top}.hook_attn_out": lambda a, c: torch.cat([a[:, :1] + 100.0, a[:, 1:]], dim=1)}
    assert torch.allclose(engine.resume(base, top, 4, edits=bump, last_only=True), base.logits[:, -1], atol=1e-5)
    assert trimmed[-1] is False


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt"])
def test_mlp_helper_reproduces_the_mlp_output(fixture, request):
    model = request.getfixturevalue(fixture)
    engine = Engine(model)
    base = engine.run(torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(7)))
    for l in range(model.cfg.n_layers):
        got = engine.mlp(l, base[f"blocks.{l}.hook_resid_mid"])
        assert torch.allclose(got, base[f"blocks.{l}.hook_mlp_out"], atol=1e-6)


def test_mlp_helper_refuses_attention_only_models(tiny_attn):
    with pytest.raises(ValueError, match="attention-only"):
        Engine(tiny_attn).mlp(0, torch.zeros(1, 1, tiny_attn.cfg.d_model))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_a_cached_run_unembeds_only_what_is_read(fixture, request, monkeypatch):
    """A run kept for its activations never unembeds; the last position alone unembeds one row of
    positions; both equal the bridge's logits."""
    from mechlib.backends import get_backend

    model = request.getfixturevalue(fixture)
    engine = Engine(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(2))
    unembedded = []
    unembed = engine.unembed
    monkeypatch.setattr(engine, "unembed", lambda r: unembedded.append(tuple(r.shape[:-1])) or unembed(r))
    base = engine.run(tokens)
    _ = base["blocks.0.hook_resid_pre"]
    assert unembedded == []
    with torch.no_grad():
        ref = model(tokens)
    torch.testing.assert_close(base.last_logits(), ref[:, -1], atol=1e-5, rtol=0)
    assert unembedded == [(2,)]
    torch.testing.assert_close(base.logits, ref, atol=1e-5, rtol=0)
    assert unembedded == [(2,), (2, 7)]
    _ = base.logits, base.last_logits()  # kept: no second unembedding
    assert unembedded == [(2,), (2, 7)]
    # the backend's cached runs: logits on demand, the last position through last_logits
    be = get_backend(model, "engine")
    monkeypatch.setattr(be.engine, "unembed", lambda r: unembedded.append(tuple(r.shape[:-1])) or unembed(r))
    runs = be.cache({"a": tokens}, ["blocks.0.hook_resid_pre"])
    assert unembedded[2:] == []
    torch.testing.assert_close(runs.last_logits("a"), ref[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(runs.logits["a"], ref, atol=1e-5, rtol=0)
    assert unembedded[2:] == [(2,), (2, 7)] and list(runs.logits) == ["a"]
