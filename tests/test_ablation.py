"""mechlib.ablation: zero / mean head ablation at hook_z, as hooks and as a context manager."""

import pytest
import torch

from mechlib.ablation import ablate_heads, ablation_hooks, head_means, normalize_heads


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))


def _z(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.attn.hook_z")
    return cache[f"blocks.{layer}.attn.hook_z"]


def test_zero_ablation_of_every_head_removes_all_context(tiny_attn, toks):
    """Attention-only model: with every head zeroed, the last logits depend on the last token only."""
    other = toks.clone()
    other[:, :-1] = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    every = [(l, h) for l in range(2) for h in range(4)]
    with torch.no_grad():
        assert (tiny_attn(toks)[:, -1] - tiny_attn(other)[:, -1]).abs().max() > 1e-3
        with ablate_heads(tiny_attn, every):
            a, b = tiny_attn(toks)[:, -1], tiny_attn(other)[:, -1]
    torch.testing.assert_close(a, b)


def test_hooks_and_context_manager_agree_and_touch_only_chosen_heads(tiny_attn, toks):
    with torch.no_grad():
        clean_z = _z(tiny_attn, toks, 1)
        with ablate_heads(tiny_attn, ["L1H2", (1, 0)]) as heads:
            z = _z(tiny_attn, toks, 1)
            ctx_logits = tiny_attn(toks)
        hook_logits = tiny_attn.run_with_hooks(toks, fwd_hooks=ablation_hooks(tiny_attn, [(1, 0), "L1H2"]))
        after = tiny_attn(toks)
    assert heads == [(1, 0), (1, 2)]
    assert (z[:, :, [0, 2]] == 0).all()
    torch.testing.assert_close(z[:, :, [1, 3]], clean_z[:, :, [1, 3]])
    torch.testing.assert_close(ctx_logits, hook_logits)
    torch.testing.assert_close(after, tiny_attn(toks))  # hooks are gone after the context


def test_mean_ablation_from_reference_per_position_and_pooled(tiny_attn, toks):
    ref = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_z = _z(tiny_attn, ref, 0)
        with ablate_heads(tiny_attn, "L0H3", "mean", reference=ref):
            z = _z(tiny_attn, toks, 0)
        torch.testing.assert_close(z[:, :, 3], ref_z[:, :, 3].mean(0, keepdim=True).expand(3, -1, -1))
        # a shorter pass cannot use per-position means: pooled over batch and positions
        with ablate_heads(tiny_attn, "L0H3", "mean", reference=ref):
            z6 = _z(tiny_attn, toks[:, :6], 0)
        torch.testing.assert_close(z6[:, :, 3], ref_z[:, :, 3].mean((0, 1))[None, None].expand(3, 6, -1))
        with pytest.raises(ValueError, match="per-position"):
            with ablate_heads(tiny_attn, "L0H3", "mean", reference=ref, per_position=True):
                tiny_attn(toks[:, :6])


def test_mean_ablation_with_explicit_and_grouped_means(tiny_attn, toks):
    d_head = tiny_attn.cfg.d_head
    const = torch.full((1, 1, 1, d_head), 0.5)
    with torch.no_grad():
        with ablate_heads(tiny_attn, [(1, 1)], "mean", means=const):
            z = _z(tiny_attn, toks, 1)
        assert (z[:, :, 1] == 0.5).all()
        groups = ["a", "b", "a"]
        means = head_means(tiny_attn, toks, layers=[1], groups=groups)
        ref_z = _z(tiny_attn, toks, 1)
        assert means[1].shape == ref_z.shape
        torch.testing.assert_close(means[1][0], ref_z[[0, 2]].mean(0))
        torch.testing.assert_close(means[1][1], ref_z[1])
        with ablate_heads(tiny_attn, [(1, 1)], "mean", means=means):
            z = _z(tiny_attn, toks, 1)
        torch.testing.assert_close(z[:, :, 1], means[1][:, :, 1])


def test_bad_heads_and_arguments_are_clear_errors(tiny_attn, toks):
    with pytest.raises(ValueError, match="empty"):
        ablation_hooks(tiny_attn, [])
    with pytest.raises(ValueError, match="head 4 is out of range"):
        ablation_hooks(tiny_attn, ["L1H4"])
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        with ablate_heads(tiny_attn, [(2, 0)]):
            pass
    with pytest.raises(ValueError, match="cannot read a head"):
        normalize_heads(tiny_attn, ["head five"])
    with pytest.raises(ValueError, match="method"):
        ablation_hooks(tiny_attn, ["L0H0"], method="resample")
    with pytest.raises(ValueError, match="exactly one of reference"):
        ablation_hooks(tiny_attn, ["L0H0"], method="mean")
    with pytest.raises(ValueError, match="no entry for layer 0"):
        ablation_hooks(tiny_attn, ["L0H0"], method="mean", means={1: torch.zeros(1, 1, 4, 16)})


@pytest.mark.slow
def test_ablating_smollm2_induction_heads_hurts_the_second_repeat(smollm2):
    from mechlib.induction import induction_scores, repeat_loss, repeated_tokens

    t = repeated_tokens(smollm2, batch=2, seg_len=20, seed=1)
    top = [(c["layer"], c["head"]) for c, _ in induction_scores(smollm2, t).top(6)]
    clean = repeat_loss(smollm2, t).second
    with ablate_heads(smollm2, top):
        ablated = repeat_loss(smollm2, t).second
    assert ablated > clean + 0.5


def test_path_ablation_patches_only_the_named_activation(tiny_attn, toks):
    from mechlib.ablation import path_ablation_hooks

    with torch.no_grad():
        with ablate_heads(tiny_attn, ["L0H1"]):
            _, abl = tiny_attn.run_with_cache(
                toks, names_filter=lambda n: n in ("blocks.1.attn.hook_k", "blocks.1.attn.hook_q")
            )
        hooks = path_ablation_hooks(tiny_attn, toks, ["L0H1"], into="blocks.1.attn.hook_k")
        with tiny_attn.hooks(fwd_hooks=hooks):
            _, patched = tiny_attn.run_with_cache(
                toks, names_filter=lambda n: n in ("blocks.1.attn.hook_k", "blocks.1.attn.hook_q")
            )
        _, clean = tiny_attn.run_with_cache(
            toks, names_filter=lambda n: n in ("blocks.1.attn.hook_k", "blocks.1.attn.hook_q")
        )
    torch.testing.assert_close(patched["blocks.1.attn.hook_k"], abl["blocks.1.attn.hook_k"])
    torch.testing.assert_close(patched["blocks.1.attn.hook_q"], clean["blocks.1.attn.hook_q"])
    assert (patched["blocks.1.attn.hook_k"] - clean["blocks.1.attn.hook_k"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no activation named"):
        path_ablation_hooks(tiny_attn, toks, ["L0H1"], into="blocks.1.attn.hook_nothing")
    with pytest.raises(ValueError, match="built for tokens"):
        tiny_attn.run_with_hooks(toks[:, :5], fwd_hooks=hooks)


def test_matched_random_heads_are_same_layer_controls(tiny_attn):
    from mechlib.ablation import matched_random_heads

    chosen = [(0, 1), (1, 0), (1, 3)]
    ctrl = matched_random_heads(tiny_attn, chosen, seed=0)
    assert sorted(l for l, _ in ctrl) == [0, 1, 1] and not set(ctrl) & set(chosen)
    assert ctrl == matched_random_heads(tiny_attn, chosen, seed=0)
    with pytest.raises(ValueError, match="control"):
        matched_random_heads(tiny_attn, [(0, 0), (0, 1), (0, 2)])
