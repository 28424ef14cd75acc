"""mechlib.attribution: every method finds a planted token; each agrees with an independent computation."""

import math

import pytest
import torch
from scipy.stats import spearmanr

from mechlib import attribution as A
from mechlib.models import random_model

PLANT, ANS, OTH = 7, 11, 12
PREFIX = "layers.0._original_component.attn._original_component."


@pytest.fixture(scope="module")
def planted():
    """A 1-layer attention-only model whose answer-minus-other logit difference is carried by one
    token (``PLANT``): every head attends to it from the last position and copies its direction 0
    to the unembedding. Other tokens have a small component along that direction (so they matter a
    little, through the same path)."""
    m = random_model(
        n_layers=1,
        attn_only=True,
        normalization_type=None,
        seed=0,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_vocab=50,
        n_ctx=32,
        compatibility_mode=False,
    )
    sd = dict(m.named_parameters())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = sd["tok_embed._original_component.weight"]
        emb[:, :4] = 0
        emb[:, 0] = 0.05 * torch.randn(emb.shape[0], generator=g)
        emb[PLANT] = 0
        emb[PLANT, 0] = 3.0
        sd["pos._original_component.weight"].zero_()
        for n in "qkvo":
            sd[PREFIX + n + "._original_component.weight"].zero_()
            sd[PREFIX + n + "._original_component.bias"].zero_()
        for h in range(2):
            sd[PREFIX + "q._original_component.bias"][h * 16] = 1.0
            sd[PREFIX + "k._original_component.weight"][h * 16, 0] = 4.0
            sd[PREFIX + "v._original_component.weight"][h * 16 + 1, 0] = 1.0
            sd[PREFIX + "o._original_component.weight"][2, h * 16 + 1] = 1.0
        unembed = sd["head._original_component.weight"]
        unembed.zero_()
        unembed[ANS, 2], unembed[OTH, 2] = 1.0, -1.0
    return m


def _inputs(n=6, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        toks = torch.randint(13, 50, (length + i % 3,), generator=g)
        toks[(3 * i + 1) % (length - 2)] = PLANT
        out.append(toks)
    return out


def _logit_diff(model, tokens):
    with torch.no_grad():
        lg = model(tokens[None])[0, -1]
    return float(lg[ANS] - lg[OTH])


def test_planted_model_depends_on_the_planted_token(planted):
    toks = _inputs(1)[0]
    without = toks.clone()
    without[toks == PLANT] = 20
    assert _logit_diff(planted, toks) > 2.0
    assert abs(_logit_diff(planted, without)) < 0.3


@pytest.mark.parametrize("method", ["occlusion", "gradient x input", "integrated gradients", "attention"])
def test_every_method_ranks_the_planted_token_first(planted, method):
    seqs = _inputs()
    segs = [A.from_tokens(t, model=planted) for t in seqs]
    tg = A.Target(ANS, OTH)
    fn = {
        "occlusion": lambda: A.occlusion(planted, segs, tg),
        "gradient x input": lambda: A.gradient_x_input(planted, segs, tg),
        "integrated gradients": lambda: A.integrated_gradients(planted, segs, tg, steps=64),
        "attention": lambda: A.attention_scores(planted, segs),
    }[method]
    for seg, a in zip(segs, fn()):
        assert a.method == method
        planted_word = int(seg.word_index[seg.tokens == PLANT][0])
        assert int(a.ranking()[0]) == planted_word
        rest = torch.cat([a.scores[:planted_word], a.scores[planted_word + 1 :]])
        assert a.scores[planted_word] > 3 * rest.abs().max()


def test_comprehensiveness_is_maximal_for_the_planted_token(planted):
    seqs = _inputs()
    segs = [A.from_tokens(t, model=planted) for t in seqs]
    tg = A.Target(ANS, OTH)
    occ = A.occlusion(planted, segs, tg)
    for seg, a in zip(segs, occ):
        # ranking every word first in turn: the planted one gives the largest comprehensiveness at k = 1 word
        comps = []
        for w in range(seg.n_words):
            order = torch.tensor([w] + [v for v in range(seg.n_words) if v != w])
            f = A.faithfulness(planted, [seg], tg, [order], ks=(1 / seg.n_words,))
            comps.append(float(f.comprehensiveness[0, 0]))
        planted_word = int(seg.word_index[seg.tokens == PLANT][0])
        assert max(range(seg.n_words), key=comps.__getitem__) == planted_word
        assert comps[planted_word] == pytest.approx(a.target_value - _logit_diff(planted, seg.drop([planted_word])))
    f_occ = A.faithfulness(planted, segs, tg, occ, ks=(0.1, 0.2))
    f_rand = A.faithfulness(planted, segs, tg, A.random_attribution(segs, seed=0), ks=(0.1, 0.2))
    assert float(f_occ.aopc_comprehensiveness.mean()) > float(f_rand.aopc_comprehensiveness.mean()) + 2.0
    assert bool((f_occ.comprehensiveness[:, 0] > 0.8 * f_occ.full).all())  # the planted token carries the effect


def test_occlusion_matches_a_plain_loop(planted):
    seg = A.from_tokens(_inputs(1)[0], attributable=[1, 2, 3, 4, 5], model=planted)
    a = A.occlusion(planted, [seg], A.Target(ANS, OTH))[0]
    full = _logit_diff(planted, seg.tokens)
    for w in range(seg.n_words):
        kept = torch.cat([seg.tokens[: w + 1], seg.tokens[w + 2 :]])  # word w is position w + 1
        assert float(a.scores[w]) == pytest.approx(full - _logit_diff(planted, kept), abs=1e-5)


def test_gradient_x_input_matches_autograd(tiny_llama):
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, 256, (9,), generator=g)
    seg = A.from_tokens(toks, attributable=[2, 3, 4, 5, 6])
    tg = A.Target(5, 9)
    a = A.gradient_x_input(tiny_llama, [seg], tg)[0]
    _, cache = tiny_llama.run_with_cache(toks[None], names_filter="hook_embed")
    emb = cache["hook_embed"].detach().clone().requires_grad_(True)
    lg = tiny_llama.run_with_hooks(toks[None], fwd_hooks=[("hook_embed", lambda x, hook: emb)])[0, -1]
    (lg[5] - lg[9]).backward()
    manual = (emb.grad * emb).sum(-1)[0, 2:7].double()
    torch.testing.assert_close(a.scores, manual, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("baseline", ["zero", 3])
def test_integrated_gradients_completeness(tiny_llama, baseline):
    g = torch.Generator().manual_seed(4)
    segs = [A.from_tokens(torch.randint(0, 256, (8,), generator=g), attributable=[1, 2, 3, 4, 5]) for _ in range(2)]
    tg = A.Target(5, 9)
    coarse = A.integrated_gradients(tiny_llama, segs, tg, steps=4, baseline=baseline)
    fine = A.integrated_gradients(tiny_llama, segs, tg, steps=128, baseline=baseline)
    for seg, c, f in zip(segs, coarse, fine):
        # the reported error is what it says: |sum of scores - (f(x) - f(baseline))|, both run independently
        fx = _ld(tiny_llama, seg.tokens, 5, 9)
        assert f.target_value == pytest.approx(fx, abs=1e-4)
        assert f.info["completeness_error"] == pytest.approx(
            abs(float(f.scores.sum()) - (fx - f.info["baseline_value"])), abs=1e-5
        )
        assert f.info["relative_error"] < 0.01  # the stated error of 128 Gauss-Legendre steps on this model
        assert f.info["completeness_error"] <= c.info["completeness_error"] + 1e-6
        assert f.token_scores[seg.word_index < 0].abs().max() == 0  # the template is not on the path


def _ld(model, tokens, a, b):
    with torch.no_grad():
        lg = model(tokens[None])[0, -1]
    return float(lg[a] - lg[b])


def test_attention_scores_match_the_cache(tiny_attn):
    toks = torch.arange(20, 32)
    seg = A.from_tokens(toks, attributable=[0, 1, 2, 3])
    a = A.attention_scores(tiny_attn, [seg])[0]
    _, cache = tiny_attn.run_with_cache(toks[None])
    att = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, -1] for i in range(2)]).mean((0, 1))
    torch.testing.assert_close(a.scores, att[:4].double())


def test_faithfulness_matches_a_manual_computation(tiny_gpt):
    toks = torch.arange(40, 52)
    seg = A.from_tokens(toks, attributable=list(range(1, 11)))
    tg = A.Target(3, 4)
    order = torch.tensor([4, 0, 9, 1, 2, 3, 5, 6, 7, 8])
    f = A.faithfulness(tiny_gpt, [seg], tg, [order], ks=(0.2, 0.5))
    full = _ld(tiny_gpt, toks, 3, 4)
    for j, m in enumerate([2, 5]):
        top = set(order[:m].tolist())
        removed = torch.tensor([t for p, t in enumerate(toks.tolist()) if p - 1 not in top or p in (0, 11)])
        only = torch.tensor([t for p, t in enumerate(toks.tolist()) if p - 1 in top or p in (0, 11)])
        assert float(f.comprehensiveness[0, j]) == pytest.approx(full - _ld(tiny_gpt, removed, 3, 4), abs=1e-5)
        assert float(f.sufficiency[0, j]) == pytest.approx(full - _ld(tiny_gpt, only, 3, 4), abs=1e-5)
    assert f.n_top.tolist() == [[2, 5]]
    assert f.aopc_comprehensiveness[0] == pytest.approx(float(f.comprehensiveness[0].mean()))


def test_score_batches_exactly(tiny_gpt):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 7, 5, 9, 7, 5)]
    tg = [A.Target(1, 2)] * 6
    batched, _ = A.score(tiny_gpt, seqs, tg, batch_size=2)
    single = torch.tensor([_ld(tiny_gpt, s, 1, 2) for s in seqs], dtype=torch.float64)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_agreement_measures():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randn(9, generator=g).double(), torch.randn(9, generator=g).double()
        b[2] = b[5]  # a tie
        assert A.rank_correlation(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    assert A.rank_correlation(torch.arange(5.0), torch.arange(5.0)) == pytest.approx(1.0)
    assert math.isnan(A.rank_correlation(torch.zeros(4), torch.arange(4.0)))
    assert A.top_k_overlap(torch.tensor([3.0, 2, 1, 0]), torch.tensor([0.0, 2, 3, 1]), 2) == 0.5
    assert A.top_k_overlap(torch.tensor([3.0, 2, 1, 0]), torch.tensor([3.0, 2, 1, 0]), 9) == 1.0


def test_ranking_breaks_ties_at_random_but_seeded():
    a = A.Attribution("x", tuple("abcdef"), torch.tensor([0.0, 0, 0, 5, 0, 0], dtype=torch.float64))
    assert int(a.ranking(0)[0]) == 3
    assert torch.equal(a.ranking(1), a.ranking(1))
    assert len({tuple(a.ranking(s)[1:].tolist()) for s in range(10)}) > 1


def test_segment_keeps_words_and_template(tiny_gpt):
    seg = A.from_tokens(torch.arange(10, 16), attributable=[1, 3])
    assert seg.words == ("[1]", "[3]")
    assert seg.drop([0]).tolist() == [10, 12, 13, 14, 15]
    assert seg.keep([0]).tolist() == [10, 11, 12, 14, 15]
    assert seg.to_words(torch.arange(6.0)).tolist() == [1.0, 3.0]


def test_bad_input_is_refused(tiny_gpt):
    seg = A.from_tokens(torch.arange(10, 16))
    with pytest.raises(ValueError, match="other"):
        A.Target(3)
    with pytest.raises(ValueError, match="same token"):
        A.Target(3, 3)
    with pytest.raises(ValueError, match="kind"):
        A.Target(3, 4, kind="odds")
    with pytest.raises(TypeError, match="list of Segmented"):
        A.occlusion(tiny_gpt, seg, A.Target(1, 2))
    with pytest.raises(ValueError, match="targets has"):
        A.occlusion(tiny_gpt, [seg, seg], [A.Target(1, 2)] * 3)
    with pytest.raises(ValueError, match="ks"):
        A.faithfulness(tiny_gpt, [seg], A.Target(1, 2), [torch.arange(6)], ks=(0.0,))
    with pytest.raises(ValueError, match="permutation"):
        A.faithfulness(tiny_gpt, [seg], A.Target(1, 2), [torch.tensor([0, 0, 1, 2, 3, 4])])
    with pytest.raises(TypeError, match="steps"):
        A.integrated_gradients(tiny_gpt, [seg], A.Target(1, 2), steps=2.5)
    with pytest.raises(TypeError, match="tokenizer"):
        A.segment(tiny_gpt, ["a", "b"])
    with pytest.raises(TypeError, match="words"):
        A.segment(tiny_gpt, "a b")


@pytest.mark.slow
def test_segment_on_smollm2_matches_the_tokenizer(smollm2):
    seg = A.segment(smollm2, "The food was wonderful.".split(), prefix="Review:", suffix="\nSentiment:")
    whole_text = smollm2.tokenizer("Review: The food was wonderful.\nSentiment:", add_special_tokens=False)
    assert seg.tokens.tolist() == list(whole_text["input_ids"])
    assert seg.words == ("The", "food", "was", "wonderful.")
    assert smollm2.tokenizer.decode(seg.drop([3])) == "Review: The food was\nSentiment:"


def test_integrated_gradients_refine_each_input_until_complete(tiny_llama):
    g = torch.Generator().manual_seed(5)
    segs = [A.from_tokens(torch.randint(0, 256, (8,), generator=g), attributable=[1, 2, 3, 4, 5]) for _ in range(3)]
    tg = A.Target(5, 9)
    one_pass = A.integrated_gradients(tiny_llama, segs, tg, steps=2, baseline="zero")
    assert all(a.info["converged"] is None and a.info["steps"] == 2 for a in one_pass)
    refined = A.integrated_gradients(tiny_llama, segs, tg, steps=2, baseline="zero", rtol=0.01, max_steps=256)
    assert max(a.info["steps"] for a in refined) > 2  # two points are not enough here
    for seg, a in zip(segs, refined):
        assert a.info["converged"] is True
        assert a.info["completeness_error"] <= 0.01 * abs(a.target_value - a.info["baseline_value"])
        # each input's scores are exactly a one-pass run with the points it was given
        again = A.integrated_gradients(tiny_llama, [seg], tg, steps=a.info["steps"], baseline="zero")[0]
        torch.testing.assert_close(a.scores, again.scores, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_say_which_inputs_stay_above_the_tolerance(tiny_llama):
    seg = A.from_tokens(torch.arange(30, 38), attributable=[1, 2, 3, 4, 5])
    with pytest.warns(UserWarning, match=r"1 of 1 inputs stay above the completeness tolerance"):
        a = A.integrated_gradients(tiny_llama, [seg], A.Target(5, 9), steps=1, rtol=1e-9, max_steps=2)[0]
    assert a.info["converged"] is False and a.info["steps"] == 2
    with pytest.raises(ValueError, match="max_steps must be at least 4"):
        A.integrated_gradients(tiny_llama, [seg], A.Target(5, 9), steps=4, rtol=0.1, max_steps=2)
    with pytest.raises(TypeError, match="rtol must be a number"):
        A.integrated_gradients(tiny_llama, [seg], A.Target(5, 9), rtol="0.1")


def test_the_shared_template_run_once_changes_no_score(monkeypatch):
    """Inputs that share a template prefix run it once (its keys and values cached); every method
    gives the scores of full forwards (a Hugging Face Gemma 3 model, sliding windows shorter than the prefix)."""
    from mechlib.models import load_model

    model = load_model("tiny-gemma3-3l", seed=0)
    g = torch.Generator().manual_seed(3)
    template = torch.randint(3, 256, (6,), generator=g)
    segs = [
        A.from_tokens(
            torch.cat([template, torch.randint(3, 256, (n,), generator=g), torch.tensor([7])]),
            attributable=range(6, 6 + n),
        )
        for n in (4, 4, 5)
    ]
    tg = A.Target(5, 9)
    used = []
    real = A.prefix_cache
    monkeypatch.setattr(A, "prefix_cache", lambda m, t: used.append(len(t)) or real(m, t))

    def every_method():
        ig = A.integrated_gradients(model, segs, tg, steps=8, baseline="zero")
        return [
            A.occlusion(model, segs, tg),
            A.gradient_x_input(model, segs, tg),
            ig,
            [A.faithfulness(model, segs, tg, ig, ks=(0.25, 0.5)).comprehensiveness],
        ]

    cached = every_method()
    assert used and set(used) == {6}  # the template, nothing of the attributed words
    monkeypatch.setattr(A, "_shared_prefix", lambda *a, **k: None)
    full = every_method()
    for xs, ys in zip(cached, full):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(getattr(x, "scores", x), getattr(y, "scores", y), rtol=1e-4, atol=1e-5)
