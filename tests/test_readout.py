import pytest
import torch

from mechlib.models import load_model
from mechlib.readout import keeps_last_logits, last_logits


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
