"""mechlib.self_explain: the data, the tolerant parser (malformed answers counted, not dropped), the prompts."""

import pytest
import torch

from mechlib import attribution as A
from mechlib import self_explain as se


def test_reviews_are_balanced_and_split_by_pair():
    items = se.reviews()
    assert len(items) >= 200
    assert len({r.text for r in items}) == len(items)
    for split in ("dev", "test"):
        part = se.reviews(split)
        assert sum(r.label == "positive" for r in part) == sum(r.label == "negative" for r in part)
    dev_pairs = {r.pair for r in se.reviews("dev")}
    assert not dev_pairs & {r.pair for r in se.reviews("test")}
    assert all(r.label in se.LABELS and 2 <= len(r.words) <= 16 for r in items)


def test_balanced_subset():
    sub = se.balanced(se.reviews("test"), 10, seed=3)
    assert len(sub) == 10 and sum(r.label == "positive" for r in sub) == 5
    assert sub == se.balanced(se.reviews("test"), 10, seed=3)
    with pytest.raises(ValueError, match="even"):
        se.balanced(se.reviews("test"), 7)
    with pytest.raises(ValueError, match="split"):
        se.reviews("train")


@pytest.mark.parametrize(
    "text,label,conf,words",
    [
        (
            "Sentiment: positive\nConfidence: 0.9\nWords: great (0.8), food (0.3)",
            "positive",
            0.9,
            (("great", 0.8), ("food", 0.3)),
        ),
        (
            "Words: dull: 0.9, plot: 0.4\nSentiment: Negative\nConfidence: 70%",
            "negative",
            0.7,
            (("dull", 0.9), ("plot", 0.4)),
        ),
        (
            '**Sentiment:** **NEGATIVE**  \n**Confidence:** 85\n**Words:** "rude" (90%), "cold" (0.5)',
            "negative",
            0.85,
            (("rude", 0.9), ("cold", 0.5)),
        ),
        (
            'The sentiment of this review is positive. The 3 words that mattered most were "tender" and "perfectly".',
            "positive",
            None,
            (("tender", None), ("perfectly", None)),
        ),
    ],
)
def test_parser_reads_varied_answers(text, label, conf, words):
    e = se.parse(text)
    assert e.label == label
    assert e.confidence == (pytest.approx(conf) if conf is not None else None)
    assert e.words == words


@pytest.mark.parametrize(
    "text,problems",
    [
        ("", ("no label", "no confidence", "no words")),
        ("I am not sure what you mean.", ("no label", "no confidence", "no words")),
        ("It is positive and negative at once.", ("no label", "no confidence", "no words")),
        (
            "Sentiment: <positive or negative>\nConfidence: <a number between 0 and 1>",
            ("no label", "no confidence", "no words"),
        ),
        ("Sentiment: positive\nConfidence: 1.5\nWords:", ("confidence out of range", "no words")),
        ('Sentiment: negative\nConfidence: 0.4\nWords: "awful", "slow"', ("no importances",)),
        ("Sentiment: positive. Confidence: 0.8. The 3 words are great", ("no words",)),
    ],
)
def test_parser_reports_what_it_cannot_read(text, problems):
    e = se.parse(text)
    assert e.problems == problems
    if "no label" in problems:
        assert e.label is None
    if "no words" in problems:
        assert e.words == ()


def test_parser_refuses_non_strings():
    with pytest.raises(TypeError, match="text"):
        se.parse(None)


def test_summarize_counts_every_failure():
    answers = [
        se.parse(t)
        for t in [
            "Sentiment: positive\nConfidence: 0.9\nWords: tasty (0.9), bland (0.2)",
            "no idea",
            "Sentiment: negative",
        ]
    ]
    items = [
        se.Review("a", "The soup was tasty.", "positive", "test", 0),
        se.Review("b", "Cold and bland soup.", "negative", "test", 0),
        se.Review("c", "Awful.", "negative", "test", 1),
    ]
    s = se.summarize(answers, items)
    assert s == {
        "n": 3,
        "no_label": 1,
        "no_confidence": 2,
        "no_words": 2,
        "no_importances": 0,
        "confidence_out_of_range": 0,
        "correct": 2,
        "listed_in_sentence": 1,
        "listed_not_in_sentence": 1,
    }


def test_as_attribution_ranks_listed_words_first():
    e = se.parse("Sentiment: negative\nConfidence: 0.8\nWords: Bland (0.4), COLD (0.9), spoon (0.5)")
    words = "Cold and bland soup, very cold.".split()
    a = se.as_attribution(e, words)
    assert isinstance(a, A.Attribution)
    assert a.info["not_in_sentence"] == ["spoon"]
    # "cold" occurs twice (both get its importance), then "bland"; unlisted words tie at 0
    assert a.scores.tolist() == [2.0, 0.0, 1.0, 0.0, 0.0, 2.0]
    for seed in range(5):
        assert set(a.ranking(seed)[:2].tolist()) == {0, 5} and int(a.ranking(seed)[2]) == 2


@pytest.mark.slow
def test_prompts_and_batched_generation(smollm2):
    prompt = se.chat_prompt(smollm2, "The soup was cold.", "P-E", k=3)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "3 words" in prompt and "The soup was cold." in prompt
    seg = se.classification_input(smollm2, "The soup was cold.")
    assert seg.words == ("The", "soup", "was", "cold.")
    assert smollm2.tokenizer.decode(seg.tokens).endswith("<|im_start|>assistant\nSentiment:")
    # one BOS-like <|im_start|> at the start, as the chat template writes it (no second one added)
    assert seg.tokens[0] == seg.tokens.new_tensor(1) and seg.tokens[1] != 1
    prompts = [se.chat_prompt(smollm2, t, "plain") for t in ["Awful.", "The soup was tasty and warm.", "Fine food."]]
    batched = se.generate(smollm2, prompts, max_new_tokens=6, batch_size=3)
    single = [se.generate(smollm2, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    # the bridge and its Hugging Face model agree, so generation explains the same model
    with torch.no_grad():
        a = smollm2(seg.tokens[None])[0, -1]
        b = smollm2.original_model(seg.tokens[None]).logits[0, -1]
    torch.testing.assert_close(a - a.mean(), b - b.mean(), atol=1e-3, rtol=1e-3)


def test_has_chat_template_without_a_tokenizer():
    from types import SimpleNamespace

    assert not se.has_chat_template(SimpleNamespace(tokenizer=None))
    assert not se.has_chat_template(SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None)))
    assert se.has_chat_template(SimpleNamespace(tokenizer=SimpleNamespace(chat_template="{{ messages }}")))


@pytest.mark.slow
def test_a_base_model_gets_the_question_as_plain_text(smollm2):
    """A base model (no chat template, e.g. gemma3-270m) still gets a decision to attribute; only
    the self-explanation prompts need the template."""
    import copy
    from types import SimpleNamespace

    tok = copy.deepcopy(smollm2.tokenizer)
    tok.chat_template = None
    base = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(default_prepend_bos=False))
    assert se.has_chat_template(smollm2) and not se.has_chat_template(base)
    seg = se.classification_input(base, "The soup was cold.")
    assert seg.words == ("The", "soup", "was", "cold.")
    assert tok.decode(seg.tokens) == (
        "Is the sentiment of this review positive or negative?\nReview: The soup was cold.\nSentiment:"
    )
    with pytest.raises(TypeError, match="chat template"):
        se.chat_prompt(base, "The soup was cold.")
