"""The model registry and loader: real predictions, agreement with Hugging Face, clear errors."""

import os
import time

import pytest
import torch

import mechlib.models as models
from mechlib.models import (
    ModelUnavailableError,
    UnknownModelError,
    list_models,
    load_model,
    prepare_smollm2,
    random_model,
    set_threads,
)

PARIS = "The Eiffel Tower is located in the city of"
IOI = "When Mary and John went to the store, John gave a drink to"


def _next_token(model, prompt):
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))
    probs = logits[0, -1].softmax(-1)
    p, i = probs.max(-1)
    return model.to_string(i.reshape(1)), float(p)


# ---------------------------------------------------------------------- the real default model


@pytest.mark.slow
@pytest.mark.parametrize("prompt, token, prob", [(PARIS, " Paris", 0.70), (IOI, " Mary", 0.92)])
def test_smollm2_top1_predictions(smollm2, prompt, token, prob):
    top, p = _next_token(smollm2, prompt)
    assert top == token
    assert p == pytest.approx(prob, abs=0.05)


@pytest.mark.slow
def test_smollm2_setup(smollm2):
    assert smollm2.cfg.model_name == "smollm2-135m"
    assert (smollm2.cfg.n_layers, smollm2.cfg.n_heads, smollm2.cfg.d_model) == (30, 9, 576)
    assert smollm2.cfg.default_prepend_bos is False
    assert not smollm2.training
    # No BOS: the first token is the prompt's own.
    assert smollm2.to_str_tokens(PARIS)[0] == "The"


@pytest.mark.slow
def test_bridge_matches_dequantized_hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(prepare_smollm2()), dtype=torch.float32).eval()
    tokens = smollm2.to_tokens([PARIS, IOI], padding_side="right")[:, :11]
    with torch.no_grad():
        ours = smollm2(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    assert ours.shape == theirs.shape == (2, 11, 49152)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- registry and bad input


def test_registry_lists_the_models():
    names = list_models()
    assert models.DEFAULT_MODEL == "smollm2-135m"
    for n in ["smollm2-135m", "gpt2-small", "gpt2-xl", "tiny-attn-2l", "tiny-2l", "tiny-llama-2l"]:
        assert n in names and names[n]


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError) as err:
        load_model("gpt-3")
    msg = str(err.value)
    assert "'gpt-3'" in msg and "smollm2-135m" in msg and "gpt2-small" in msg
    assert isinstance(err.value, KeyError)


def _assert_fails_fast_with_advice(seconds=2.0):
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_model("gpt2-small")
    assert time.perf_counter() - t0 < seconds
    msg = str(err.value)
    assert "not reachable" in msg and "huggingface.co" in msg and "smollm2-135m" in msg


def test_offline_gpt2_fails_fast(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_fails_fast_with_advice()


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://10.255.255.1")  # unroutable: probe times out in 1 s
    _assert_fails_fast_with_advice(seconds=3.0)


def test_truncated_gguf_fails_checksum_and_leaves_no_cache(tmp_path):
    good = models._smollm2_gguf_path()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match="sha256.*truncated or has been modified"):
        prepare_smollm2(bad, cache=cache, verbose=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_unreadable_gguf_with_matching_checksum_leaves_no_half_written_cache(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match="could not read"):
        prepare_smollm2(bad, cache=cache, expected_sha256=models._sha256(bad), verbose=False)
    assert list(cache.iterdir()) == []  # the temporary folder was removed


def test_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a file cannot be created, even by root
    monkeypatch.setenv("MECHLIB_CACHE", str(blocker / "sub"))
    assert models.cache_dir() == blocker / "sub"
    with pytest.raises(ModelUnavailableError, match="cannot write the model cache.*MECHLIB_CACHE"):
        load_model("smollm2-135m", verbose=False)


# ---------------------------------------------------------------------- random models


def test_random_models_are_seeded_and_in_eval_mode():
    a = load_model("tiny-2l", seed=0)
    b = load_model("tiny-2l", seed=0)
    c = load_model("tiny-2l", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)
    assert not a.training and not any(m.training for m in a.modules())
    tokens = torch.randint(0, a.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), a(tokens))  # eval mode: deterministic


def test_random_model_overrides_and_registry_configs(tiny_llama):
    m = random_model(n_layers=1, attn_only=True, seed=3)
    assert m.cfg.n_layers == 1 and not m.training
    assert tiny_llama.cfg.n_key_value_heads == 2 and tiny_llama.cfg.normalization_type.startswith("RMS")


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("MECHLIB_THREADS", "2")
        assert set_threads() == 2
        with pytest.raises(ValueError, match="at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
