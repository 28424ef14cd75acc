"""mechlib.probing and mechlib.minimal_pairs: probes, control tasks, activations, minimal pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechlib import minimal_pairs as mp
from mechlib import probing
from mechlib.models import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(n_layers=2, attn_only=False, seed=0)


def _random_data(model, n_sent=60, length=12, vocab=40, seed=0, labels=None):
    """Sentences of random tokens from a small vocabulary; every position labelled; word = token id."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, min(vocab, model.cfg.d_vocab), (n_sent, length), generator=g)
    positions = [list(range(length))] * n_sent
    if labels is None:
        labels = ["x"] * (n_sent * length)
        labels[0] = "y"
    return probing.labelled_tokens(toks, positions, labels, name="random")


# ---- probes ----------------------------------------------------------------------------------


def test_linear_probe_recovers_planted_linear_feature(model):
    data = _random_data(model, n_sent=80)
    acts = probing.collect(model, data, ["blocks.1.hook_resid_pre"], progress=False)["blocks.1.hook_resid_pre"]
    # Plant: three classes given by the argmax of three fixed random directions of the activations.
    rng = np.random.default_rng(0)
    W = rng.normal(size=(acts.shape[1], 3))
    x = acts.numpy()
    planted = (x - x.mean(0)) @ W
    labels = [str(c) for c in planted.argmax(1)]
    fit = probing.fit_probe(acts, labels, data.sentence, kind="linear", seed=0)
    assert fit.accuracy > 0.9, fit
    assert fit.accuracy > fit.majority + 0.4
    # The same probe on labels shuffled across tokens stays near the majority baseline.
    shuffled = list(np.random.default_rng(1).permutation(labels))
    noise = probing.fit_probe(acts, shuffled, data.sentence, kind="linear", seed=0)
    assert noise.accuracy < fit.majority + 0.15


def test_mlp_probe_learns_a_nonlinear_feature_linear_cannot():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 16))
    labels = ["same" if s else "diff" for s in (np.sign(x[:, 0]) == np.sign(x[:, 1]))]  # XOR of two coordinates
    groups = np.arange(2000) // 10
    lin = probing.fit_probe(x, labels, groups, kind="linear", seed=0)
    mlp = probing.fit_probe(x, labels, groups, kind="mlp", seed=0, hidden=64)
    assert lin.accuracy < 0.65 and mlp.accuracy > 0.85, (lin, mlp)


def test_split_is_by_sentence_never_by_token():
    groups = np.repeat(np.arange(30), 7)
    train, test = probing.split_by_group(groups, 0.2, seed=3)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(train) + len(test) == len(groups)
    assert len(set(groups[test])) == 6
    again = probing.split_by_group(groups, 0.2, seed=3)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(probing.split_by_group(groups, 0.2, seed=4)[1], test)


# ---- control tasks ---------------------------------------------------------------------------


def test_control_labels_are_a_function_of_word_type_only():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 300, size=5000)]
    labels = list(rng.choice(["N", "V", "D", "P"], p=[0.5, 0.25, 0.15, 0.10], size=5000))
    ctrl = probing.control_labels(words, labels, seed=1)
    table: dict[str, str] = {}
    for w, c in zip(words, ctrl):
        assert table.setdefault(w, c) == c, f"type {w} got two control labels"
    # Types draw from the empirical distribution: with 300 types, N is the most frequent control label.
    per_type = list(table.values())
    shares = {k: per_type.count(k) / len(per_type) for k in "NVDP"}
    assert abs(shares["N"] - 0.5) < 0.1 and shares["N"] > shares["V"] > shares["P"] - 0.05
    assert probing.control_labels(words, labels, seed=1) == ctrl
    assert probing.control_labels(words, labels, seed=2) != ctrl
    with pytest.raises(ValueError, match="words has 2 entries but labels has 1"):
        probing.control_labels(["a", "b"], ["N"])


def test_selectivity_of_a_probe_on_random_type_labels_is_about_zero(model):
    # Task labels that are themselves a random function of word type: the task *is* a control task,
    # so task and control accuracy agree within noise and selectivity is about 0.
    base = _random_data(model, n_sent=80, vocab=60, seed=5)
    data = base.relabel(probing.control_labels(base.words, ["a", "b", "c"] * (len(base) // 3), seed=99))
    result = probing.sweep(
        model, data, hooks=["blocks.1.hook_resid_pre"], probes=["linear"], seeds=(0, 1, 2), progress=False
    )
    sel = result.selectivity.ci(layer=0, probe="linear")
    assert abs(sel.value) < 0.1, sel
    assert result.accuracy.samples.shape == (3, 1, 1)
    assert result.control.values[0, 0] > 0.5  # type identity is decodable in a random model: memorised


def test_sweep_returns_labelled_grids_with_seed_samples(model):
    data = _random_data(model, n_sent=30, seed=1)
    data = data.relabel([str(int(w) % 3) for w in data.words])  # a function of the token: decodable
    result = probing.sweep(model, data, probes=["linear", "mlp"], seeds=(0, 1), progress=False)
    n_rows = model.cfg.n_layers + 1
    assert result.accuracy.dims == ("layer", "probe")
    assert result.accuracy.shape == (n_rows, 2)
    assert result.accuracy.labels["probe"] == ["linear", "mlp"]
    assert torch.allclose(result.selectivity.samples, result.accuracy.samples - result.control.samples)
    assert torch.allclose(result.accuracy.values, result.accuracy.samples.mean(0))
    est = result.accuracy.ci(layer=0, probe="linear")
    assert est.n == 2 and est.low <= est.value <= est.high
    assert 0 <= result.peak("accuracy", "mlp") < n_rows
    train, test = probing.split_by_group(data.sentence, 0.2, seed=1)
    seen = np.mean([data.words[i] in {data.words[j] for j in train} for i in test])
    assert result.meta["seen_type_share"][1] == pytest.approx(seen)
    import matplotlib

    matplotlib.use("Agg")
    assert result.plot() is not None


# ---- activations -----------------------------------------------------------------------------


def test_collect_matches_a_single_unpadded_run_and_is_cached(model, monkeypatch):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (5, 9, 3, 7)]
    positions = [[0, 4], [1, 8, 3], [2], [6]]
    data = probing.labelled_tokens(seqs, positions, list("abcdefg"))
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    acts = probing.collect(model, data, hooks, batch_size=3, progress=False)
    row = 0
    for seq, pos in zip(seqs, positions):
        _, cache = model.run_with_cache(seq[None], names_filter=lambda n: n in hooks)
        for p in pos:
            for h in hooks:
                assert torch.allclose(acts[h][row], cache[h][0, p], atol=1e-5), (h, row)
            row += 1
    calls = []
    orig = model.run_with_cache
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: calls.append(1) or orig(*a, **k))
    again = probing.collect(model, data, hooks[:1], progress=False)
    assert not calls and torch.equal(again[hooks[0]], acts[hooks[0]])
    probing.clear_cache(model)
    probing.collect(model, data, hooks[:1], progress=False)
    assert calls


def test_resid_hooks_cover_every_layer(model):
    hooks = probing.resid_hooks(model)
    assert len(hooks) == model.cfg.n_layers + 1
    assert hooks[0] == "blocks.0.hook_resid_pre" and hooks[-1].endswith("hook_resid_post")


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(model):
    x = torch.randn(10, 4)
    groups = list(range(10))
    with pytest.raises(ValueError, match="labels has 9 entries but features has 10 rows"):
        probing.fit_probe(x, ["a", "b"] * 4 + ["a"], groups)
    with pytest.raises(ValueError, match="one class only"):
        probing.fit_probe(x, ["a"] * 10, groups)
    with pytest.raises(ValueError, match="groups has 3 entries"):
        probing.fit_probe(x, ["a", "b"] * 5, [0, 1, 2])
    with pytest.raises(ValueError, match="probe kind"):
        probing.fit_probe(x, ["a", "b"] * 5, groups, kind="svm")
    data = _random_data(model, n_sent=4)
    with pytest.raises(ValueError, match="unknown hook 'blocks.0.hook_nothing'"):
        probing.collect(model, data, ["blocks.0.hook_nothing"], progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        probing.sweep(model, data, hooks=["blocks.9.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError, match="one class only"):
        probing.sweep(model, data.relabel(["x"] * len(data)), progress=False)
    with pytest.raises(ValueError, match="labels has 3 entries but positions name 4"):
        probing.labelled_tokens([torch.arange(5)], [[0, 1, 2, 3]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="tokens has 2 sentences but positions has 1"):
        probing.labelled_tokens([torch.arange(5), torch.arange(3)], [[0]], ["a"])
    with pytest.raises(ValueError, match="out of range"):
        probing.labelled_tokens([torch.arange(5)], [[7]], ["a"])
    with pytest.raises(TypeError, match="integer token ids"):
        probing.labelled_tokens([torch.rand(5)], [[0]], ["a"])
    with pytest.raises(TypeError, match="LabelledTokens"):
        probing.collect(model, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="two classes"):
        probing.position_sweep(model, torch.zeros(4, 3, dtype=torch.long), [0, 0, 0, 0], [0, 1, 2, 3], progress=False)


def test_position_sweep_finds_the_position_that_carries_the_label(model):
    # Label = which of two tokens sits at position 2; the other positions are random filler.
    g = torch.Generator().manual_seed(0)
    n = 60
    toks = torch.randint(10, 60, (n, 4), generator=g)
    label = torch.arange(n) % 2
    toks[:, 2] = torch.where(label == 1, 3, 4)
    acc, shuf = probing.position_sweep(model, toks, label, torch.arange(n), seeds=(0,), k=16, progress=False)
    assert acc.dims == ("layer", "pos") and acc.shape == (model.cfg.n_layers, 4)
    assert float(acc.values[:, 2].min()) > 0.95
    assert float(acc.values[:, :2].max()) < 0.8  # before the label's token, nothing to decode
    assert float(shuf.values[:, 2].max()) < 0.8
    sub, _ = probing.position_sweep(
        model,
        toks,
        label,
        torch.arange(n),
        positions=[2, -1],
        seeds=(0,),
        k=16,
        n_label_shuffles=0,
        pos_labels=list("abcd"),
        progress=False,
    )
    assert sub.labels["pos"] == ["c", "d"] and torch.equal(sub.values[:, 0], acc.values[:, 2])


# ---- minimal pairs ---------------------------------------------------------------------------


@pytest.mark.parametrize("phenomenon", mp.PHENOMENA)
def test_minimal_pairs_are_distinct_balanced_and_differ_in_one_word(phenomenon):
    pairs = mp.make_pairs(phenomenon, 60, seed=0)
    assert len(pairs) == 60 and len({p.good for p in pairs}) == 60
    assert sum(p.number == "sg" for p in pairs) == 30
    for p in pairs:
        g, b = p.good.split(), p.bad.split()
        assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) == 1, p
        assert p.good.startswith(p.prefix + p.good_word) and p.bad.startswith(p.prefix + p.bad_word)
    assert mp.make_pairs(phenomenon, 60, seed=0) == pairs
    assert mp.make_pairs(phenomenon, 60, seed=1) != pairs


def test_agreement_pairs_put_an_attractor_of_the_other_number():
    for p in mp.make_pairs("agreement_attractor", 50) + mp.make_pairs("agreement_relative_clause", 50):
        sg = {s for s, _ in mp.NOUNS}
        assert (p.parts["subject"] in sg) == (p.number == "sg")
        assert (p.parts["attractor"] in sg) != (p.number == "sg")
        assert p.good_word in (" is", " was") if p.number == "sg" else p.good_word in (" are", " were")


def test_without_attractor_keeps_subject_verbs_and_predicate():
    pairs = mp.make_pairs("agreement_attractor", 10) + mp.make_pairs("agreement_relative_clause", 10)
    for p, twin in zip(pairs, mp.without_attractor(pairs)):
        assert twin.phenomenon == "agreement_simple" and twin.number == p.number
        assert twin.good == f"The {p.parts['subject']}{p.good_word} {p.parts['predicate']}."
        assert p.good.endswith(twin.good[len(twin.prefix) :]) and p.bad.endswith(twin.bad[len(twin.prefix) :])
    with pytest.raises(ValueError, match="agreement pairs"):
        mp.without_attractor(mp.make_pairs("determiner_noun", 1))


def test_minimal_pair_bad_input():
    with pytest.raises(ValueError, match="phenomenon must be one of"):
        mp.make_pairs("island_effects", 5)
    with pytest.raises(ValueError, match="n must be a positive int"):
        mp.make_pairs("determiner_noun", 0)
    with pytest.raises(ValueError, match="pairs is empty"):
        mp.score_pairs(None, [])


@pytest.mark.slow
def test_score_pairs_and_agreement_prompts_on_smollm2(smollm2):
    pairs = mp.make_pairs("agreement_simple", 4, seed=0)
    scores = mp.score_pairs(smollm2, pairs, batch_size=3, progress=False)
    # Independent: the mean next-token loss of one unpadded sentence times its predicted tokens.
    for i, p in enumerate(pairs):
        toks = smollm2.to_tokens(p.good)
        with torch.no_grad():
            loss = smollm2(toks, return_type="loss")
        assert abs(float(-loss) * (toks.shape[1] - 1) - float(scores.good[i])) < 1e-3
    acc = mp.accuracy(scores)
    assert set(acc) == {"agreement_simple"} and acc["agreement_simple"].n == 4
    data = mp.agreement_prompts(smollm2, 20, seed=0)
    assert data.clean.shape == data.corrupted.shape == (20, len(data.pos_labels))
    diff = data.clean != data.corrupted
    assert diff[:, data.subject_pos].all() and diff.sum() == 20  # only the subject differs
    assert torch.equal(data.number, torch.arange(20) % 2)


def test_sweep_fits_its_linear_probes_as_fit_probe_does_alone(model):
    data = _random_data(model, labels=[["a", "b", "c"][i % 3] for i in range(60 * 12)])
    hooks = probing.resid_hooks(model)[:2]
    result = probing.sweep(model, data, hooks=hooks, probes=["linear"], seeds=(0, 1), progress=False)
    acts = probing.collect(model, data, hooks, progress=False)
    for si, seed in enumerate((0, 1)):
        split = probing.split_by_group(data.sentence, 0.2, seed)
        ctrl = probing.control_labels(data.words, data.labels, seed)
        for li, h in enumerate(hooks):
            task = probing.fit_probe(acts[h], data.labels, data.sentence, split=split)
            con = probing.fit_probe(acts[h], ctrl, data.sentence, split=split)
            assert abs(float(result.accuracy.samples[si, li, 0]) - task.accuracy) < 0.01
            assert abs(float(result.control.samples[si, li, 0]) - con.accuracy) < 0.01
