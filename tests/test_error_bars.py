"""Error bars on head scores: per-prompt values, stderr() and ci() (mechlib.results.PromptGrid).

Every head-score result (induction / previous-token / duplicate-token scores, direct logit
attribution per head, attention per head, patching grids) keeps its per-prompt values; here they
are checked against per-prompt scores computed by hand with plain loops, and their intervals
against :func:`mechlib.stats.mean_ci` of those hand-computed values. An interval must also be able
to fail: a score whose mean clears a threshold but whose interval does not is a claim that does
not hold.
"""

import math

import pytest
import torch

from mechlib.induction import head_scores, repeat_loss, repeated_tokens
from mechlib.reports import FindingsRecord
from mechlib.results import PromptGrid
from mechlib.stats import mean_ci


def _tokens(model, batch=5, seg_len=6):
    tokens = repeated_tokens(model, batch, seg_len, seed=3)
    # one sequence with no repeat at all (no induction target: NaN there, left out of the mean)
    tokens[-1] = torch.arange(1, tokens.shape[1] + 1)
    # and one with a single accidental repeat, so sequences have different numbers of targets
    tokens[-2, seg_len:] = torch.arange(200, 200 + seg_len)
    tokens[-2, seg_len + 2] = tokens[-2, 1]
    return tokens


def _hand_scores(model, tokens, kind):
    """Per-sequence scores [batch, layer, head] from plain loops over queries and keys."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = torch.full((tokens.shape[0], L, H), float("nan"))
    for b in range(tokens.shape[0]):
        t = tokens[b].tolist()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[b : b + 1])
        for layer in range(L):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float()  # [head, q, k]
            masses = []
            for q in range(len(t)):
                if kind == "induction":
                    keys = [k for k in range(1, q + 1) if t[k - 1] == t[q] and k - 1 < q]
                elif kind == "duplicate_token":
                    keys = [k for k in range(q) if t[k] == t[q]]
                else:
                    keys = [q - 1] if q >= 1 else []
                if keys:
                    masses.append(pattern[:, q, keys].sum(-1))
            if masses:
                out[b, layer] = torch.stack(masses).mean(0)
    return out


@pytest.mark.parametrize("kind", ["induction", "previous_token", "duplicate_token"])
def test_head_scores_keep_per_sequence_values_and_their_interval(tiny_llama, kind):
    tokens = _tokens(tiny_llama)
    hand = _hand_scores(tiny_llama, tokens, kind)
    g = head_scores(tiny_llama, tokens, [kind])[kind]
    assert isinstance(g, PromptGrid) and g.per_prompt.shape == (tokens.shape[0], *g.values.shape)
    torch.testing.assert_close(g.per_prompt, hand, atol=1e-5, rtol=1e-4, equal_nan=True)
    defined = hand[~torch.isnan(hand).all(-1).all(-1)]
    assert defined.std(0).max() > 1e-3  # the reference varies over sequences: the comparison can fail
    torch.testing.assert_close(g.values, defined.mean(0), atol=1e-5, rtol=1e-4)
    lo, hi = g.ci(0.95)
    se = g.stderr()
    for layer in range(tiny_llama.cfg.n_layers):
        for head in range(tiny_llama.cfg.n_heads):
            ref = mean_ci(defined[:, layer, head])
            est = g.estimate(layer=layer, head=head)
            assert est.n == defined.shape[0]
            assert est.value == pytest.approx(ref.value, abs=1e-5)
            assert est.low == pytest.approx(ref.low, abs=1e-5) and est.high == pytest.approx(ref.high, abs=1e-5)
            # the vectorised grid interval is the same bootstrap, cell by cell
            assert float(lo.values[layer, head]) == pytest.approx(ref.low, abs=1e-5)
            assert float(hi.values[layer, head]) == pytest.approx(ref.high, abs=1e-5)
            assert float(se.values[layer, head]) == pytest.approx(ref.stderr, abs=1e-5)
    assert (lo.values <= g.values + 1e-6).all() and (g.values <= hi.values + 1e-6).all()


def test_no_target_sequence_is_left_out(tiny_attn):
    tokens = _tokens(tiny_attn)
    g = head_scores(tiny_attn, tokens, ["induction"])["induction"]
    assert torch.isnan(g.per_prompt[-1]).all() and not torch.isnan(g.per_prompt[:-1]).any()
    assert g.estimate(layer=0, head=0).n == tokens.shape[0] - 1
    none = head_scores(tiny_attn, tokens[-1:], ["duplicate_token"])["duplicate_token"]
    assert torch.isnan(none.values).all()


def test_reduce_all_per_sequence_mean_is_the_grid(tiny_attn):
    tokens = _tokens(tiny_attn)
    g = head_scores(tiny_attn, tokens, ["previous_token"], reduce="all")["previous_token"]
    torch.testing.assert_close(g.per_prompt.mean(0), g.values)
    singles = torch.stack(
        [
            head_scores(tiny_attn, tokens[i : i + 1], ["previous_token"], reduce="all")["previous_token"].values
            for i in range(len(tokens))
        ]
    )
    torch.testing.assert_close(g.per_prompt, singles, atol=1e-5, rtol=1e-4)


def test_an_interval_can_fail():
    # A broken score: its mean clears 0.5, but it is noise over prompts. A point check would pass;
    # the interval does not clear, so the claim does not hold.
    per = torch.tensor([0.95, 0.05, 0.9, 0.15, 0.98, 0.2, 0.92, 0.3])[:, None, None]
    g = PromptGrid.from_prompts(per, ("layer", "head"))
    assert float(g.values[0, 0]) > 0.5
    record = FindingsRecord("test", model="none")
    assert not record.check("noisy head clears 0.5", g.estimate(layer=0, head=0), above=0.5).holds
    lo, _ = g.ci()
    assert float(lo.values[0, 0]) < 0.5
    # the same mean with little spread does clear it
    steady = PromptGrid.from_prompts(
        torch.full((8, 1, 1), float(g.values[0, 0])) + 0.01 * torch.randn(8, 1, 1), ("layer", "head")
    )
    assert record.check("steady head clears 0.5", steady.estimate(layer=0, head=0), above=0.5).holds


def test_random_model_has_no_induction_head(tiny_llama):
    # an untrained model's best "induction head" does not clear the notebooks' threshold
    tokens = repeated_tokens(tiny_llama, 6, 10, seed=0)
    g = head_scores(tiny_llama, tokens, ["induction"])["induction"]
    ((top, _),) = g.top(1)
    record = FindingsRecord("test", model="tiny-llama-2l")
    assert not record.check("top induction head > 0.5", g.estimate(**top), above=0.5).holds


def test_prompt_grid_checks_its_input():
    with pytest.raises(ValueError, match="per_prompt must be"):
        PromptGrid(torch.zeros(2, 3), ("layer", "head"), per_prompt=torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="no per-prompt values"):
        PromptGrid(torch.zeros(2, 3), ("layer", "head")).ci()
    g = PromptGrid.from_prompts(torch.rand(4, 2, 3), ("layer", "head"))
    with pytest.raises(KeyError, match="give every axis"):
        g.estimate(layer=0)
    with pytest.raises(IndexError):
        g.estimate(layer=2, head=0)
    with pytest.raises(ValueError, match="confidence"):
        g.ci(1.5)


def test_dla_heads_and_components_keep_per_prompt_values(tiny_llama):
    from mechlib.logit_attribution import direct_logit_attribution

    toks = torch.randint(0, tiny_llama.cfg.d_vocab, (6, 7), generator=torch.Generator().manual_seed(1))
    r = direct_logit_attribution(tiny_llama, toks, [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], progress=False)
    assert torch.equal(r.heads.per_prompt, r.per_prompt_heads.permute(2, 0, 1))
    assert torch.equal(r.components.per_prompt, r.per_prompt_components.T)
    ref = mean_ci(r.per_prompt_heads[1, 2])
    assert r.per_prompt_heads[1].std(-1).max() > 1e-3
    est = r.heads.estimate(layer=1, head=2)
    assert (est.value, est.low, est.high) == pytest.approx((ref.value, ref.low, ref.high), abs=1e-6)
    lo, hi = r.components.ci()
    assert (lo.values <= r.components.values + 1e-6).all() and (r.components.values <= hi.values + 1e-6).all()


def test_head_attention_keeps_per_prompt_values(tiny_llama):
    from mechlib.patching import head_attention

    tokens = torch.randint(0, 200, (5, 8), generator=torch.Generator().manual_seed(2))
    g = head_attention(tiny_llama, tokens, ["L1H2", (0, 3)], 7, {"first": 0, "prev": 6})
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(tokens)
    hand = cache["blocks.1.attn.hook_pattern"][:, 2, 7, 0].float()
    assert hand.std() > 1e-3
    torch.testing.assert_close(g.at(head="L1H2", key="first"), hand, atol=1e-6, rtol=1e-5)
    assert torch.equal(g.per_prompt, g.meta["per_prompt"].permute(2, 0, 1))
    assert g.estimate(head="L1H2", key="first").value == pytest.approx(mean_ci(hand).value, abs=1e-6)


def test_repeat_loss_per_sequence_intervals(tiny_attn):
    tokens = repeated_tokens(tiny_attn, 4, 6, seed=1)
    r = repeat_loss(tiny_attn, tokens)
    o, L = r.offset, r.seg_len
    first = torch.stack([r.per_position[b, o : o + L - 1].mean() for b in range(4)])
    assert torch.allclose(r.first_per_sequence(), first) and r.first_per_sequence().mean() == pytest.approx(r.first)
    assert r.second_per_sequence().mean() == pytest.approx(r.second, rel=1e-5)
    assert r.first_ci() == mean_ci(first) and r.second_ci().n == 4


def test_attribution_correlation_interval_over_prompts(tiny_llama):
    from mechlib.attribution_patching import attribution_patch, compare
    from mechlib.patching import patch

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 200, (6, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, 200, (6,), generator=g)

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 7]

    exact = patch(tiny_llama, clean, corrupted, metric, "head_out", direction="noise", progress=False)
    approx = attribution_patch(tiny_llama, clean, corrupted, metric, "head_out", direction="noise")
    cmp = compare(approx, exact)
    est = cmp.correlation_ci()
    assert est.value == pytest.approx(cmp.correlation) and est.n == 6
    assert est.low <= est.high and est.low < 1.0 and not math.isnan(est.low)
    # a broken attribution (cells shuffled, prompt by prompt the same way) does not clear 0.6
    perm = torch.randperm(exact.values.numel(), generator=torch.Generator().manual_seed(5))
    shuffled = approx.per_prompt.reshape(6, -1)[:, perm].reshape(approx.per_prompt.shape)
    broken = type(approx)(shuffled.mean(0), approx.dims, approx.labels, meta=dict(approx.meta), per_prompt=shuffled)
    assert compare(broken, exact).correlation_ci().low < 0.6
