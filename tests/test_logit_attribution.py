"""Tests for mechlib.logit_attribution: answer directions, DLA that sums to the logit diff, logit lens."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from mechlib.ioi import logit_diff, make_ioi_dataset  # noqa: E402
from mechlib.logit_attribution import (  # noqa: E402
    answer_directions,
    direct_logit_attribution,
    ioi_logit_attribution,
    logit_lens,
    to_answer_ids,
)

TINY = ["tiny_attn", "tiny_gpt", "tiny_llama"]


@pytest.fixture(scope="module")
def tiny_gemma3():
    """Gemma 3's block: post-attention and post-MLP norms between each sublayer and the residual stream."""
    from mechlib.models import load_model

    return load_model("tiny-gemma3-3l", seed=0)


def _tokens(seed=0, batch=5, seq=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


@pytest.mark.parametrize("name", [*TINY, "tiny_gemma3"])
def test_dla_sums_to_actual_logit_diff(name, request):
    model = request.getfixturevalue(name)
    toks = _tokens()
    pos = torch.tensor([8, 3, 5, -1, 2])
    ans, wrong = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10])
    r = direct_logit_attribution(model, toks, ans, wrong, pos=pos, top_k_neurons=5, batch_size=2, progress=False)
    logits = model(toks)
    idx, p = torch.arange(5), torch.tensor([8, 3, 5, 8, 2])
    expected = logits[idx, p][idx, ans] - logits[idx, p][idx, wrong]
    assert torch.allclose(r.actual, expected, atol=1e-5)
    assert r.actual.abs().min() > 1e-3  # a non-trivial target
    assert torch.allclose(r.total + r.unembed_bias, r.actual, atol=1e-4)
    assert r.remainder.abs().max() < 1e-4
    L, H = model.cfg.n_layers, model.cfg.n_heads
    labels = r.components.labels["component"]
    assert labels[0] == "embed" and f"L{L - 1} attn" in labels and r.heads.shape == (L, H)
    # Heads (plus output bias) add up to their layer; neurons (plus b_out) to theirs.
    for layer in range(L):
        attn = r.components.values[labels.index(f"L{layer} attn")]
        assert torch.allclose(r.heads.values[layer].sum() + r.attn_bias[layer], attn, atol=1e-5)
        if not model.cfg.attn_only:
            mlp = r.components.values[labels.index(f"L{layer} mlp")]
            assert torch.allclose(r.neurons.meta["all"][layer].sum() + r.mlp_bias[layer], mlp, atol=1e-5)
    if model.cfg.attn_only:
        assert r.neurons.values.numel() == 0
    else:
        assert len(r.neurons.labels["neuron"]) == 5 and r.neurons.labels["neuron"][0].startswith("L")


def test_head_attribution_matches_manual_projection(tiny_llama):
    """Independent check on a GQA model: z @ W_O[h], divided by the final RMS scale, along W_U diff."""
    toks = _tokens(1, batch=3)
    r = direct_logit_attribution(tiny_llama, toks, [3, 4, 5], [6, 7, 8], progress=False)
    _, cache = tiny_llama.run_with_cache(toks)
    d = answer_directions(tiny_llama, [3, 4, 5], [6, 7, 8])
    scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
    for layer in range(tiny_llama.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
        out = torch.einsum("bhd,hdm->bhm", z, tiny_llama.W_O[layer]) / scale[:, :, None]
        manual = (out * d[:, None]).sum(-1).mean(0)
        assert torch.allclose(r.heads.values[layer], manual, atol=1e-5)


def test_single_token_direction_adds_b_U(tiny_gpt):
    toks = _tokens(2)
    r = direct_logit_attribution(tiny_gpt, toks, 7, progress=False)
    logits = tiny_gpt(toks)[:, -1, 7]
    assert r.metric == "logit"
    assert torch.allclose(r.total + r.unembed_bias, logits, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_logit_lens_last_layer_is_model_output(name, request):
    model = request.getfixturevalue(name)
    toks = _tokens(3)
    ans = torch.tensor([1, 2, 3, 4, 5])
    lens = logit_lens(model, toks, ans, 9, pos=-2, batch_size=2, progress=False)
    logits = model(toks)[:, -2]
    idx = torch.arange(5)
    assert lens.logit.labels["layer"] == ["embed"] + [f"L{i}" for i in range(model.cfg.n_layers)]
    assert torch.allclose(lens.per_prompt["logit"][-1], logits[idx, ans], atol=1e-4)
    assert torch.allclose(lens.per_prompt["prob"][-1], logits.softmax(-1)[idx, ans], atol=1e-5)
    rank = (logits > logits[idx, ans][:, None]).sum(-1).float()
    assert torch.equal(lens.per_prompt["rank"][-1], rank)
    assert torch.allclose(lens.per_prompt["logit_diff"][-1], logits[idx, ans] - logits[:, 9], atol=1e-4)
    # Earlier readings differ from the output (they are not just copies of the final one).
    assert not torch.allclose(lens.per_prompt["logit"][0], lens.per_prompt["logit"][-1], atol=1e-3)
    assert lens.rank.shape == (model.cfg.n_layers + 1,)


@pytest.mark.parametrize("name", TINY)
def test_logit_lens_matches_ln_final_and_unembed_by_hand(name, request):
    """Every reading, not only the last, equals ln_final (statistics recomputed) + W_U + b_U by hand."""
    model = request.getfixturevalue(name)
    toks = _tokens(4, batch=3)
    ans = torch.tensor([7, 8, 9])
    lens = logit_lens(model, toks, ans, pos=-1, progress=False)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        rms = str(model.cfg.normalization_type).startswith("RMS")
        ref = []
        for n in names:
            x = cache[n][:, -1].float()
            if not rms:
                x = x - x.mean(-1, keepdim=True)
            x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
            x = x * model.ln_final.weight + (
                model.ln_final.bias if getattr(model.ln_final, "bias", None) is not None else 0
            )
            logits = x @ model.W_U + model.b_U
            ref.append(logits[torch.arange(3), ans])
        ref = torch.stack(ref)
    assert ref.std() > 1e-3  # the reference varies: the test can fail
    assert torch.allclose(lens.per_prompt["logit"], ref, atol=1e-4)


def test_dla_refuses_a_model_outside_compatibility_mode():
    from mechlib.models import random_model

    model = random_model(compatibility_mode=False)
    with pytest.raises(ValueError, match=r"model is not in compatibility mode.*enable_compatibility_mode\(\)"):
        direct_logit_attribution(model, _tokens(batch=2), [1, 2], progress=False)
    # The logit lens applies the real final norm, so it needs no folding: it still runs.
    assert logit_lens(model, _tokens(batch=2), [1, 2], progress=False).logit.shape == (model.cfg.n_layers + 1,)


def test_answer_ids_and_errors(smollm2, tiny_attn):
    ids = to_answer_ids(smollm2, [" Mary", " John"])
    assert ids.tolist() == [smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")]
    assert to_answer_ids(smollm2, " Paris", 3).tolist() == [smollm2.to_single_token(" Paris")] * 3
    d = answer_directions(smollm2, [" Mary"], [" John"])
    assert torch.allclose(d[0], smollm2.W_U[:, ids[0]] - smollm2.W_U[:, ids[1]])
    with pytest.raises(ValueError, match=r"is 3 tokens, \[.T., .iff., .any.\].*leading space"):
        to_answer_ids(smollm2, "Tiffany")
    with pytest.raises(ValueError, match="must be one token"):
        to_answer_ids(smollm2, " Tiffany")
    with pytest.raises(ValueError, match="2 answers for 3 prompts"):
        direct_logit_attribution(tiny_attn, _tokens(batch=3), [1, 2], progress=False)
    with pytest.raises(ValueError, match="2 answers for 3 prompts"):
        logit_lens(tiny_attn, _tokens(batch=3), [1, 2, 3], [4, 5], progress=False)
    with pytest.raises(ValueError, match="positions for 3 prompts"):
        direct_logit_attribution(tiny_attn, _tokens(batch=3), 1, pos=[1, 2], progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        direct_logit_attribution(tiny_attn, _tokens(batch=3), " Mary", progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        to_answer_ids(tiny_attn, [1, 999])
    with pytest.raises(ValueError, match="different lengths"):
        direct_logit_attribution(smollm2, ["The cat sat on the", "Hello"], " mat", progress=False)
    r = direct_logit_attribution(
        smollm2, "When Mary and John went to the store, John gave a drink to", " Mary", " John", progress=False
    )
    assert r.actual.shape == (1,) and r.actual.item() > 2


def test_smollm2_ioi_dla_and_lens(smollm2):
    ds = make_ioi_dataset(smollm2, 8, seed=4)
    r = ioi_logit_attribution(smollm2, ds, progress=False)
    actual = logit_diff(smollm2(ds.tokens), ds)
    assert torch.allclose(r.actual, actual, atol=1e-4)
    assert r.unembed_bias.abs().max() == 0  # SmolLM2: RMSNorm, no b_U, so nothing is left over
    assert r.remainder.abs().max() < 1e-3 and r.actual.mean() > 1.0
    assert r.heads.shape == (30, 9) and len(r.components.labels["component"]) == 61
    assert "components sum" in r.summary()
    lens = logit_lens(smollm2, ds.tokens, ds.io_ids, ds.s_ids, pos=ds.pos("END"), progress=False)
    assert torch.allclose(lens.per_prompt["logit_diff"][-1], actual, atol=1e-3)
    # The answer forms late: far down the ranking in the first layers, near the top at the end.
    assert lens.rank.values[1:10].min() > 100 and lens.rank.values[-1] < 3
    fig = r.plot()
    fig2 = lens.plot()
    assert len(fig.axes) >= 2 and len(fig2.axes) >= 4
