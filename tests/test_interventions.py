"""The intervention language: sites and operations are validated when built, and each operation
does what it says, checked against hand-written TransformerLens hooks on the bridge."""

import pytest
import torch

from mechlib.backends import get_backend
from mechlib.interventions import (
    POINTS,
    Freeze,
    Intervention,
    Noise,
    Patch,
    Plan,
    Record,
    Replace,
    Site,
    Zero,
    intervention_list,
)


def _pair(model, batch=3, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    return clean, corrupted


def _logits(model, tokens, hooks):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_sites_and_operations_are_checked_when_built():
    s = Site("z", 3, head=1, positions=[5, -1])
    assert s.hook == "blocks.3.attn.hook_z" and s.positions == (5, -1) and s.first_position(8) == 5
    assert Site("embed").hook == "hook_embed" and Site("k", 0, head=2).spec.kv
    with pytest.raises(ValueError, match="unknown hook point"):
        Site("hook_z", 3)
    with pytest.raises(ValueError, match="no head axis"):
        Site("resid_pre", 3, head=1)
    with pytest.raises(TypeError, match="whole number"):
        Site("z", 2.0)
    with pytest.raises(ValueError, match="needs a layer"):
        Site("z")
    with pytest.raises(ValueError, match="no layer"):
        Site("embed", 0)
    with pytest.raises(ValueError, match="at least 0"):
        Site("z", -1)
    with pytest.raises(ValueError, match="empty"):
        Site("z", 1, positions=[])
    with pytest.raises(TypeError, match="tuple of ints"):
        Site("z", 1, positions=3)
    with pytest.raises(ValueError, match="non-negative"):
        Site("z", 1, rows=[-1])
    with pytest.raises(ValueError, match="std"):
        Noise(-0.1)
    with pytest.raises(TypeError, match="run"):
        Patch("")
    with pytest.raises(TypeError, match="float"):
        Replace(torch.zeros(1, 1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="axes"):
        Intervention(Site("z", 0, head=1), Replace(torch.zeros(1, 1, 8)))
    with pytest.raises(TypeError, match="op must be"):
        Intervention(Site("z", 0), "zero")
    with pytest.raises(TypeError, match="wrap one"):
        intervention_list(Intervention(Site("z", 0), Zero()))
    assert Intervention(Site("z", 0), Zero()) == Intervention(Site("z", 0), Zero())  # data: comparable, hashable
    assert set(POINTS) >= {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"}


def test_backends_check_sites_against_the_model(tiny_llama, tiny_attn):
    be = get_backend(tiny_llama, "bridge")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        be.check([[Intervention(Site("z", 5), Zero())]])
    with pytest.raises(ValueError, match="key/value heads"):
        be.check([[Intervention(Site("k", 0, head=tiny_llama.cfg.n_key_value_heads), Zero())]])
    with pytest.raises(ValueError, match="attention-only"):
        get_backend(tiny_attn).check([[Intervention(Site("mlp_out", 0), Zero())]])


def test_identical_interventions_of_different_lists_merge():
    a = Intervention(Site("z", 1), Freeze("base"))
    lists = [[a, Intervention(Site("z", 1, head=h), Patch("src"))] for h in range(3)]
    plan = Plan(lists, batch=2)
    first, second = plan.by_hook["blocks.1.attn.hook_z"]
    assert len(first) == 1 and first[0].rows.tolist() == [0, 1, 2, 3, 4, 5]  # one write for every list
    assert len(second) == 3 and second[2].rows.tolist() == [4, 5]


def test_operations_match_hand_written_hooks(tiny_llama):
    """Each operation through the bridge backend equals the same edit written as a TL hook."""
    model = tiny_llama
    clean, corrupted = _pair(model)
    _, cc = model.run_with_cache(clean)
    be = get_backend(model, "bridge")
    runs = be.cache({"clean": clean, "corrupted": corrupted}, ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"])
    z = "blocks.1.attn.hook_z"
    mean = cc[z].mean(0, keepdim=True)
    noise = Noise(0.5, seed=3)

    def edit(fn):
        def hook(a, hook):
            a = a.clone()
            fn(a)
            return a

        return hook

    def put_noise(a):
        a[:, 2:4] += noise.draw((3, 7) + tuple(a.shape[2:]))[:, 2:4]

    cases = [
        (
            [Intervention(Site("z", 1, head=2, positions=(-1,)), Patch("clean"))],
            [(z, edit(lambda a: a[:, 6, 2].copy_(cc[z][:, 6, 2])))],
        ),
        ([Intervention(Site("z", 1, head=0), Zero())], [(z, edit(lambda a: a[:, :, 0].zero_()))]),
        (
            [Intervention(Site("z", 1, head=3), Replace(mean))],
            [(z, edit(lambda a: a[:, :, 3].copy_(mean[:, :, 3].expand(3, -1, -1))))],
        ),
        (
            [Intervention(Site("resid_post", 0, positions=(2, 3)), noise)],
            [("blocks.0.hook_resid_post", edit(put_noise))],
        ),
        (
            [Intervention(Site("z", 1), Patch("clean")), Intervention(Site("z", 1, head=1), Freeze("corrupted"))],
            [(z, lambda a, hook: torch.cat([cc[z][:, :, :1], a[:, :, 1:2], cc[z][:, :, 2:]], dim=2))],
        ),
        (
            [Intervention(Site("z", 1, head=1, rows=(0, 2)), Zero())],
            [(z, edit(lambda a: a[0::2, :, 1].zero_()))],
        ),  # rows 0 and 2 of 3
    ]
    score = lambda lg: lg[:, -1, 3] - lg[:, -1, 5]  # noqa: E731
    out = be.run(runs, [c[0] for c in cases], base="corrupted", score=score, last_only=False)
    for (_, hooks), got in zip(cases, out.values):
        want = score(_logits(model, corrupted, hooks))
        assert torch.allclose(got, want, atol=1e-5), (got, want)
    base = score(_logits(model, corrupted, []))
    assert (out.values - base).abs().amax(-1).min() > 1e-4, "every edit must move the score"
    assert out.values[5, 1].item() == pytest.approx(base[1].item(), abs=1e-5)  # row 1 untouched


def test_record_reads_the_activation_after_earlier_operations(tiny_llama):
    model = tiny_llama
    clean, corrupted = _pair(model, seed=1)
    _, kc = model.run_with_cache(corrupted)
    for name in ("engine", "bridge"):
        be = get_backend(model, name)
        runs = be.cache({"clean": clean, "corrupted": corrupted}, [])
        lists = [
            [Intervention(Site("resid_pre", 1), Record("pre"))],
            [Intervention(Site("z", 0, head=1), Zero()), Intervention(Site("z", 0, head=1), Record("z"))],
        ]
        recs = be.run(runs, lists, base="corrupted").records
        assert torch.allclose(recs[(0, "pre")], kc["blocks.1.hook_resid_pre"], atol=1e-5), name
        assert recs[(1, "z")].abs().max() == 0 and recs[(1, "z")].shape == kc["blocks.0.attn.hook_z"][:, :, 1].shape
