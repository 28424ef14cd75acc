"""mechlib.views renders CircuitsVis widgets from the embedded bundle, with no network call."""

import urllib.request
from pathlib import Path

import pytest
import torch

from mechlib.views import OfflineView, attention_heads, attention_patterns


@pytest.fixture
def no_network(monkeypatch):
    """Any urlopen (circuitsvis's online probe included) fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network call attempted: urlopen{args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import circuitsvis.utils.render as render

    monkeypatch.setattr(render.request, "urlopen", refuse)
    return calls


def _bundle_head() -> str:
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return bundle.read_text(encoding="utf-8")[:2000]


def _assert_embedded(html: str) -> None:
    assert "unpkg.com" not in html and "cdn/esm.js" not in html, "the view loads its script from a CDN"
    assert _bundle_head() in html, "the circuitsvis bundle is not inlined"
    assert "CircuitsVis.render(" in html


def test_attention_patterns_offline_with_labels(tiny_attn, no_network):
    tokens = torch.tensor([3, 17, 42, 3, 17])
    view = attention_patterns(tiny_attn, tokens, heads=[(1, 2), "L0H3"])
    html = view._repr_html_()
    _assert_embedded(html)
    assert no_network == []
    assert view.data["head_names"] == ["L1H2", "L0H3"]
    assert view.data["tokens"] == ["3", "17", "42", "3", "17"]
    assert "AttentionHeads" in html and '"L1H2"' in html
    # The values shown are the model's own patterns.
    _, cache = tiny_attn.run_with_cache(tokens[None])
    torch.testing.assert_close(view.data["attention"][0], cache["blocks.1.attn.hook_pattern"][0, 2].float())
    torch.testing.assert_close(view.data["attention"][1], cache["blocks.0.attn.hook_pattern"][0, 3].float())


def test_attention_patterns_whole_layer_default(tiny_attn, no_network):
    view = attention_patterns(tiny_attn, torch.arange(6)[None], layer=1)
    assert view.data["head_names"] == [f"L1H{h}" for h in range(tiny_attn.cfg.n_heads)]
    assert tuple(view.data["attention"].shape) == (tiny_attn.cfg.n_heads, 6, 6)


@pytest.mark.slow
def test_attention_patterns_string_tokens_smollm2(smollm2, no_network):
    prompt = "When Mary and John went to the store, John gave a drink to"
    view = attention_patterns(smollm2, prompt, heads=[(17, 0)])
    assert view.data["tokens"] == smollm2.to_str_tokens(prompt)
    assert view.data["tokens"][1] == " Mary"
    _assert_embedded(view._repr_html_())


def test_attention_heads_low_level_and_save(tmp_path, no_network):
    pattern = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]
    view = attention_heads(pattern[None], ["a", "b", "c"], ["L0H0"])
    assert isinstance(view, OfflineView)
    _assert_embedded(str(view))
    page = view.save(tmp_path / "view.html").read_text()
    assert view.html in page and page.startswith("<!DOCTYPE html>")


def test_bad_inputs_raise_clear_errors(tiny_attn):
    with pytest.raises(ValueError, match="does not exist"):
        attention_patterns(tiny_attn, torch.arange(4), heads=[(2, 0)])
    with pytest.raises(ValueError, match="no tokenizer"):
        attention_patterns(tiny_attn, "some text", heads=[(0, 0)])
    with pytest.raises(ValueError, match="one sequence"):
        attention_patterns(tiny_attn, torch.zeros(2, 4, dtype=torch.long), heads=[(0, 0)])
    with pytest.raises(ValueError, match="token labels"):
        attention_heads(torch.rand(1, 3, 3), ["a", "b"])
