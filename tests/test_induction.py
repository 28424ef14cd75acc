"""mechlib.induction: repeated tokens, head scores (vs TransformerLens detect_head), repeat loss."""

import math

import pytest
import torch

from mechlib.induction import (
    duplicate_token_targets,
    head_scores,
    induction_scores,
    induction_targets,
    previous_token_targets,
    repeat_loss,
    repeated_tokens,
)
from mechlib.models import random_model


def _word_tokenizer(n: int):
    """A whitespace word-level tokenizer 't0'..'t{n-2}' plus a special '<bos>' (id n-1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(n - 1)}
    vocab["<bos>"] = n - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", unk_token="<bos>", pad_token="<bos>", eos_token="<bos>"
    )


@pytest.fixture(scope="module")
def tok_model():
    """A tiny attention-only model with a tiny word-level tokenizer, so detect_head can run on it."""
    m = random_model(attn_only=True, n_ctx=64, seed=3)
    m.set_tokenizer(_word_tokenizer(256)) if hasattr(m, "set_tokenizer") else setattr(
        m, "tokenizer", _word_tokenizer(256)
    )
    m.cfg.default_prepend_bos = False
    m.cfg.tokenizer_prepends_bos = False
    return m


def test_repeated_tokens_shape_seed_and_special_ids(tok_model, tiny_attn):
    t = repeated_tokens(tiny_attn, batch=3, seg_len=7, seed=5)
    assert t.shape == (3, 14) and t.dtype == torch.long
    assert torch.equal(t[:, :7], t[:, 7:])
    assert torch.equal(t, repeated_tokens(tiny_attn, batch=3, seg_len=7, seed=5))
    assert not torch.equal(t, repeated_tokens(tiny_attn, batch=3, seg_len=7, seed=6))
    # the special <bos> (id 255) is never drawn, only prepended on request
    big = repeated_tokens(tok_model, batch=64, seg_len=30, seed=0)
    assert int(big.max()) < 255 and big.shape == (64, 60)
    withbos = repeated_tokens(tok_model, batch=2, seg_len=5, bos=True)
    assert withbos.shape == (2, 11) and (withbos[:, 0] == 255).all() and (withbos[:, 1:] != 255).all()
    with pytest.raises(ValueError, match="bos"):
        repeated_tokens(tiny_attn, 1, 5, bos=True)  # no tokenizer: no BOS to prepend


def test_small_vocabulary_and_no_tokenizer():
    m = random_model(attn_only=True, d_vocab=5, n_ctx=40)
    t = repeated_tokens(m, batch=4, seg_len=12, seed=0)
    assert int(t.max()) < 5
    s = head_scores(m, t)
    for g in s.values():
        assert g.dims == ("layer", "head") and g.shape == (2, 4)
        assert torch.isfinite(g.values).all() and (g.values >= 0).all() and (g.values <= 1 + 1e-5).all()


@pytest.mark.parametrize(
    "kind,name",
    [
        ("induction", "induction_head"),
        ("previous_token", "previous_token_head"),
        ("duplicate_token", "duplicate_token_head"),
    ],
)
def test_scores_agree_with_transformer_lens_detect_head(tok_model, kind, name):
    from transformer_lens.head_detector import detect_head

    tokens = repeated_tokens(tok_model, batch=3, seg_len=12, seed=1)
    # a non-repeat sequence too: targets come from the tokens themselves
    tokens[2, 20:] = torch.randint(0, 255, (4,), generator=torch.Generator().manual_seed(0))
    texts = [" ".join(f"t{i}" for i in row.tolist()) for row in tokens]
    assert torch.equal(tok_model.to_tokens(texts[0]), tokens[:1])
    theirs = detect_head(tok_model, texts, name)  # averages over prompts
    ours = head_scores(tok_model, tokens, [kind], reduce="all")[kind]
    torch.testing.assert_close(ours.values, theirs.float(), atol=1e-5, rtol=1e-4)
    # "matched" is the same attention mass divided by the queries that have a target
    targets = {
        "induction": induction_targets,
        "previous_token": previous_token_targets,
        "duplicate_token": duplicate_token_targets,
    }[kind]
    n_q = int(targets(tokens[:1]).any(-1).sum())
    one = head_scores(tok_model, tokens[:1], [kind])[kind].values
    torch.testing.assert_close(
        one, detect_head(tok_model, texts[0], name).float() * tokens.shape[1] / n_q, atol=1e-5, rtol=1e-4
    )


def test_induction_targets_from_tokens():
    t = torch.tensor([[1, 2, 3, 1, 2, 9]])
    m = induction_targets(t)[0]
    assert m[3].nonzero().flatten().tolist() == [1]  # second '1' -> the '2' after the first '1'
    assert m[4].nonzero().flatten().tolist() == [2]
    assert m[5].sum() == 0 and m[:3].sum() == 0


def test_scores_single_forward_pass_and_kinds(tiny_attn):
    calls = []
    orig = tiny_attn.run_with_cache

    def counting(*a, **k):
        calls.append(k.get("names_filter"))
        return orig(*a, **k)

    tiny_attn.run_with_cache = counting
    try:
        s = head_scores(tiny_attn, repeated_tokens(tiny_attn, 2, 10))
    finally:
        del tiny_attn.run_with_cache
    assert len(calls) == 1 and calls[0] is not None
    assert set(s) == {"induction", "previous_token", "duplicate_token"}
    with pytest.raises(ValueError, match="unknown head kind"):
        head_scores(tiny_attn, repeated_tokens(tiny_attn, 1, 4), ["copying"])


def test_too_long_for_context_is_a_clear_error(tiny_attn):
    n_ctx = tiny_attn.cfg.n_ctx
    with pytest.raises(ValueError, match="n_ctx"):
        repeated_tokens(tiny_attn, 1, n_ctx)
    with pytest.raises(ValueError, match="n_ctx"):
        induction_scores(tiny_attn, torch.zeros(1, n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="n_ctx"):
        repeat_loss(tiny_attn, torch.zeros(1, n_ctx + 2, dtype=torch.long))


def test_repeat_loss_positions_and_icl(tiny_attn):
    t = repeated_tokens(tiny_attn, 4, 10, seed=2)
    r = repeat_loss(tiny_attn, t)
    assert r.per_position.shape == (4, 19) and r.seg_len == 10 and r.offset == 0
    torch.testing.assert_close(torch.tensor(r.first), r.per_position[:, 0:9].mean())
    torch.testing.assert_close(torch.tensor(r.second), r.per_position[:, 10:19].mean())
    assert r.icl_score == pytest.approx(float(r.per_position[:, 14].mean() - r.per_position[:, 4].mean()), abs=1e-6)
    # an untrained model is near chance on both repeats
    assert abs(r.first - math.log(256)) < 1.0
    with pytest.raises(ValueError, match="repeat"):
        repeat_loss(tiny_attn, torch.arange(20)[None])


@pytest.mark.slow
def test_smollm2_has_strong_induction_heads(smollm2):
    t = repeated_tokens(smollm2, batch=2, seg_len=20, seed=0)
    assert int(t.max()) < smollm2.cfg.d_vocab and not set(t.flatten().tolist()) & set(smollm2.tokenizer.all_special_ids)
    s = head_scores(smollm2, t)
    ((top, score),) = s["induction"].top(1)
    assert score > 0.5, s["induction"]
    r = repeat_loss(smollm2, t)
    assert r.second < 0.3 * r.first


def test_repeat_pair_corrupts_only_the_first_segment_and_scores_the_second_repeat(tiny_attn):
    from mechlib.induction import repeat_pair

    pair = repeat_pair(tiny_attn, batch=3, seg_len=6, seed=2)
    assert torch.equal(pair.clean, repeated_tokens(tiny_attn, 3, 6, seed=2))
    first = slice(pair.offset, pair.offset + 6)
    assert torch.equal(pair.corrupted[:, pair.offset + 6 :], pair.clean[:, pair.offset + 6 :])
    assert not torch.equal(pair.corrupted[:, first], pair.clean[:, first])
    logits = torch.randn(3, pair.clean.shape[1], tiny_attn.cfg.d_vocab)
    expected = torch.stack(
        [
            torch.stack([logits[b, p].log_softmax(-1)[pair.clean[b, p + 1]] for p in pair.second.tolist()]).mean()
            for b in range(3)
        ]
    )
    assert torch.allclose(pair.metric(logits), expected, atol=1e-6)
