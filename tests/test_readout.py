import pytest
import torch

from mechlib.models import load_model
from mechlib.readout import activations, keeps_last_logits, last_logits, prefix_cache, shared_prefix_length


@pytest.fixture(scope="module")
def tiny_gemma():
    return load_model("tiny-gemma3-3l", seed=0)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_last_logits_equal_the_full_forward_with_hooks_and_gradients(name, request):
    model = request.getfixturevalue(name)
    tokens = torch.randint(0, int(model.cfg.d_vocab), (3, 7), generator=torch.Generator().manual_seed(0))
    hook = ("blocks.0.hook_resid_post", lambda x, hook: x * 1.3)
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[hook])[:, -1]
        plain = model(tokens)[:, -1]
        torch.testing.assert_close(last_logits(model, tokens, fwd_hooks=[hook]), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(last_logits(model, tokens), plain, rtol=0, atol=1e-5)
    assert not torch.allclose(ref, plain)  # the hook acted

    grads = []
    for fn in (
        lambda e: model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: e)])[:, -1],
        lambda e: last_logits(model, tokens, fwd_hooks=[("hook_embed", lambda x, hook: e)]),
    ):
        _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
        e = cache["hook_embed"].detach().clone().requires_grad_(True)
        fn(e)[:, 5].sum().backward()
        grads.append(e.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_which_models_unembed_only_the_last_position(tiny_llama, tiny_gemma):
    assert keeps_last_logits(tiny_gemma)  # a Hugging Face Gemma3ForCausalLM takes logits_to_keep
    assert not keeps_last_logits(tiny_llama)  # a TransformerLens-native model does not: sliced instead


def test_last_logits_rejects_unbatched_tokens(tiny_llama):
    with pytest.raises(ValueError, match=r"tokens must be \[batch, pos\]"):
        last_logits(tiny_llama, torch.arange(5))


@pytest.mark.parametrize("n_prefix", [2, 6])  # 6: longer than tiny Gemma's 4-token sliding window
def test_a_shared_prefix_run_once_gives_the_full_forward(tiny_gemma, n_prefix):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 256, (3, 9), generator=g)
    tokens[:, :n_prefix] = tokens[0, :n_prefix]
    tokens[1, n_prefix] = (tokens[0, n_prefix] + 1) % 256  # rows part right after the prefix
    assert shared_prefix_length(tokens) == n_prefix
    prefix = prefix_cache(tiny_gemma, tokens[0, :n_prefix])
    assert len(prefix) == n_prefix
    with torch.no_grad():
        torch.testing.assert_close(last_logits(tiny_gemma, tokens, prefix=prefix), last_logits(tiny_gemma, tokens))
    # hooks see the positions after the prefix; gradients reach them as in the full forward
    _, cache = tiny_gemma.run_with_cache(tokens, names_filter="hook_embed")
    grads = []
    for use_prefix in (False, True):
        e = cache["hook_embed"].detach().clone().requires_grad_(True)
        if use_prefix:
            hook = ("hook_embed", lambda x, hook, e=e: e[:, n_prefix:] * 1.1)
        else:  # the prefix's embeddings as they are (the cache holds them), the rest changed
            hook = ("hook_embed", lambda x, hook, e=e: torch.cat([e[:, :n_prefix], e[:, n_prefix:] * 1.1], 1))
        out = last_logits(tiny_gemma, tokens, fwd_hooks=[hook], prefix=prefix if use_prefix else None)
        out[:, 5].sum().backward()
        grads.append(e.grad[:, n_prefix:])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
    # the same Prefix serves further calls (each copies the cache)
    with torch.no_grad():
        torch.testing.assert_close(
            last_logits(tiny_gemma, tokens[:2], prefix=prefix), last_logits(tiny_gemma, tokens[:2])
        )


def test_shared_prefix_length_leaves_the_read_position():
    assert shared_prefix_length([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])]) == 2
    assert shared_prefix_length([torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2])]) == 1
    assert shared_prefix_length([torch.tensor([5, 2]), torch.tensor([1, 2])]) == 0
    assert shared_prefix_length([]) == 0


def test_a_prefix_the_rows_do_not_begin_with_is_refused(tiny_gemma, tiny_llama):
    tokens = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8]])
    prefix = prefix_cache(tiny_gemma, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="every row of tokens must begin with the prefix"):
        last_logits(tiny_gemma, tokens, prefix=prefix)
    with pytest.raises(ValueError, match="go on after them"):
        last_logits(tiny_gemma, tokens[:1, :2], prefix=prefix)
    with pytest.raises(ValueError, match=r"one row"):
        prefix_cache(tiny_gemma, tokens)
    assert prefix_cache(tiny_llama, torch.tensor([5, 6])) is None  # no Hugging Face model under it: no cache


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_activations_equal_run_with_cache_without_unembedding_every_position(name, request, monkeypatch):
    model = request.getfixturevalue(name)
    tokens = torch.randint(0, int(model.cfg.d_vocab), (2, 6), generator=torch.Generator().manual_seed(4))
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        _, ref = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        seen = []
        forward = model.run_with_cache
        monkeypatch.setattr(
            model, "run_with_cache", lambda *a, **k: seen.append(k.get("logits_to_keep")) or forward(*a, **k)
        )
        got = activations(model, tokens, lambda n: n in names)
    assert seen == [1 if keeps_last_logits(model) else None]
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)
