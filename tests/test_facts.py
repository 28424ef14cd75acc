"""Tests of mechlib.facts: the dataset, subject-token spans, token roles, known facts, noise scale."""

import math
import warnings
from collections import Counter

import pytest
import torch

from mechlib.facts import (
    BEFORE_SUBJECT,
    TOKEN_ROLES,
    Fact,
    attribute_token,
    average_by_role,
    embedding_std,
    known_facts,
    list_relations,
    load_facts,
    noise_scale,
    role_positions,
    score_facts,
    subject_token_span,
    token_roles,
    tokenize_fact,
)

EIFFEL = "The Eiffel Tower is located in the city of"


# ---------------------------------------------------------------------------------------
# Dataset integrity
# ---------------------------------------------------------------------------------------


def test_dataset_size_and_relations():
    facts = load_facts()
    assert len(facts) >= 300
    counts = Counter(f.relation for f in facts)
    assert set(counts) == set(list_relations())
    assert len(counts) >= 12
    assert min(counts.values()) >= 10, counts


def test_dataset_has_no_duplicates():
    facts = load_facts()
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)
    assert len({f.prompt for f in facts}) == len(facts)


def test_dataset_entries_are_well_formed():
    for f in load_facts():
        assert f.template.count("{}") == 1, f
        assert f.attribute.startswith(" ") and not f.attribute.startswith("  ") and f.attribute.strip(), f
        assert f.attribute == f.attribute.rstrip(), f
        assert f.prompt == f.prompt.strip(), f  # ends right before the attribute
        assert f.subject == f.subject.strip() and f.subject in f.prompt, f
        assert not f.prompt.endswith(f.subject), f  # the relation words follow the subject
        s, e = f.subject_char_span
        assert f.prompt[s:e] == f.subject


def test_dataset_subjects_not_only_at_start():
    facts = load_facts()
    mid = sum(f.subject_char_span[0] > 0 for f in facts)
    assert mid >= len(facts) // 2
    assert mid < len(facts)  # some prompts also start with the subject


def test_load_facts_filters_relations():
    caps = load_facts("country_capital")
    assert caps and {f.relation for f in caps} == {"country_capital"}
    both = load_facts(["country_capital", "landmark_city"])
    assert {f.relation for f in both} == {"country_capital", "landmark_city"}
    assert len(both) == len(caps) + len(load_facts(["landmark_city"]))
    assert any(f.subject == "France" and f.attribute == " Paris" for f in caps)


def test_load_facts_unknown_relation():
    with pytest.raises(KeyError, match="capitals.*country_capital"):
        load_facts(["capitals"])


def test_fact_validates_template():
    with pytest.raises(ValueError, match="exactly one"):
        Fact("France", "r", "The capital of France is", " Paris")
    with pytest.raises(ValueError, match="exactly one"):
        Fact("France", "r", "{} and {} are", " Paris")
    f = Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Paris")
    assert f.prompt == EIFFEL
    assert f.subject_char_span == (4, 16)


# ---------------------------------------------------------------------------------------
# Token roles (pure functions)
# ---------------------------------------------------------------------------------------


def test_role_constant_order():
    assert TOKEN_ROLES == (
        "first subject token",
        "middle subject tokens",
        "last subject token",
        "first subsequent token",
        "further tokens",
        "last token",
    )
    assert BEFORE_SUBJECT not in TOKEN_ROLES


def test_token_roles_multi_token_subject():
    # "The| E|iffel| Tower| is| located| in| the| city| of": subject at [1, 4)
    roles = token_roles(10, 1, 4)
    assert roles == [
        BEFORE_SUBJECT,
        "first subject token",
        "middle subject tokens",
        "last subject token",
        "first subsequent token",
        "further tokens",
        "further tokens",
        "further tokens",
        "further tokens",
        "last token",
    ]
    pos = role_positions(10, 1, 4)
    assert pos == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5, 6, 7, 8],
        "last token": [9],
    }


def test_token_roles_overlaps():
    # one-token subject: labelled "last subject token"; both first and last rows read it
    assert token_roles(5, 2, 3) == [
        BEFORE_SUBJECT,
        BEFORE_SUBJECT,
        "last subject token",
        "first subsequent token",
        "last token",
    ]
    pos = role_positions(5, 2, 3)
    assert pos["first subject token"] == pos["last subject token"] == [2]
    assert pos["middle subject tokens"] == [] and pos["further tokens"] == []
    # subject right before the last token: the final position is the last token, and also the
    # first subsequent token for averaging
    assert token_roles(4, 0, 3)[-1] == "last token"
    assert role_positions(4, 0, 3)["first subsequent token"] == [3]
    # prompt ending with the subject
    assert token_roles(3, 1, 3) == [BEFORE_SUBJECT, "first subject token", "last token"]
    pos = role_positions(3, 1, 3)
    assert pos["first subsequent token"] == [] and pos["last subject token"] == pos["last token"] == [2]


@pytest.mark.parametrize("span", [(0, 0), (3, 2), (-1, 2), (2, 11)])
def test_token_roles_bad_span(span):
    with pytest.raises(ValueError, match="does not fit"):
        token_roles(10, *span)
    with pytest.raises(ValueError, match="does not fit"):
        role_positions(10, *span)


def test_average_by_role():
    values = torch.arange(10.0)
    out = average_by_role(values, 1, 4)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0, 6.5, 9.0]
    # two layers, and a role that is absent comes back nan
    grid = torch.stack([torch.arange(6.0), 10 * torch.arange(6.0)])  # [layer, pos]
    out = average_by_role(grid, 0, 1)  # one-token subject at 0: no middle tokens
    assert out.shape == (2, len(TOKEN_ROLES))
    assert math.isnan(out[0, 1]) and math.isnan(out[1, 1])
    assert out[1].tolist()[0] == 0.0 and out[1].tolist()[2] == 0.0 and out[1, 4] == 30.0 and out[1, 5] == 50.0


# ---------------------------------------------------------------------------------------
# Subject spans and attributes on SmolLM2's tokenizer
# ---------------------------------------------------------------------------------------


def _span_text(model, prompt, span):
    return "".join(model.to_str_tokens(prompt)[span[0] : span[1]])


@pytest.mark.slow
def test_subject_span_multi_token_mid_prompt(smollm2):
    span = subject_token_span(smollm2, EIFFEL, "Eiffel Tower")
    assert span == (1, 4)
    assert smollm2.to_str_tokens(EIFFEL)[1:4] == [" E", "iffel", " Tower"]


@pytest.mark.slow
def test_subject_span_at_start(smollm2):
    prompt = "Wolfgang Amadeus Mozart was a famous"
    start, end = subject_token_span(smollm2, prompt, "Wolfgang Amadeus Mozart")
    assert start == 0 and end >= 3
    assert _span_text(smollm2, prompt, (start, end)) == "Wolfgang Amadeus Mozart"
    assert smollm2.to_str_tokens(prompt)[end] == " was"


@pytest.mark.slow
def test_subject_span_one_token_and_later_in_prompt(smollm2):
    prompt = "The capital of France is the city of"
    start, end = subject_token_span(smollm2, prompt, "France")
    assert end - start == 1 and smollm2.to_str_tokens(prompt)[start] == " France"
    prompt = "The book The Lord of the Rings was written by J.R.R."
    span = subject_token_span(smollm2, prompt, "The Lord of the Rings")
    assert _span_text(smollm2, prompt, span) == " The Lord of the Rings"
    assert span[0] == 2  # not the first "The"


@pytest.mark.slow
def test_subject_span_char_start_picks_occurrence(smollm2):
    prompt = "Paris is nice, and Paris is in"
    first = subject_token_span(smollm2, prompt, "Paris")
    second = subject_token_span(smollm2, prompt, "Paris", char_start=prompt.rindex("Paris"))
    assert first == (0, 1) and second[0] > first[0]
    assert _span_text(smollm2, prompt, second) == " Paris"
    with pytest.raises(ValueError, match="not at character 3"):
        subject_token_span(smollm2, prompt, "Paris", char_start=3)


@pytest.mark.slow
def test_subject_span_with_bos_and_bare_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert subject_token_span(tok, EIFFEL, "Eiffel Tower") == (1, 4)
    assert subject_token_span(tok, EIFFEL, "Eiffel Tower", prepend_bos=True) == (2, 5)
    assert subject_token_span(smollm2, EIFFEL, "Eiffel Tower", prepend_bos=True) == (2, 5)


@pytest.mark.slow
def test_subject_span_without_offset_mapping(smollm2):
    """A tokenizer without offsets (slow tokenizers) falls back to incremental decoding."""
    real = smollm2.tokenizer

    class NoOffsets:
        bos_token_id = real.bos_token_id

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError("no offsets")
            return real(text, add_special_tokens=add_special_tokens)

        def decode(self, ids):
            return real.decode(ids)

    for f in load_facts()[::40]:
        assert subject_token_span(NoOffsets(), f.prompt, f.subject) == subject_token_span(real, f.prompt, f.subject), f


@pytest.mark.slow
def test_every_fact_subject_tokens_spell_the_subject(smollm2):
    tok = smollm2.tokenizer
    for f in load_facts():
        s, e = subject_token_span(tok, f.prompt, f.subject, char_start=f.subject_char_span[0])
        ids = tok(f.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[s:e]).strip() == f.subject, f
        assert tok.decode(ids[:s]) + tok.decode(ids[s:e]) + tok.decode(ids[e:]) == f.prompt
        assert e < len(ids)  # the relation words follow the subject
        assert len(tok(f.attribute, add_special_tokens=False)["input_ids"]) == 1, f


@pytest.mark.slow
def test_subject_not_in_prompt(smollm2):
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_span(smollm2, EIFFEL, "Statue of Liberty")
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_span(smollm2, EIFFEL, "eiffel tower")  # case matters


@pytest.mark.slow
def test_attribute_token(smollm2):
    assert smollm2.to_string([attribute_token(smollm2, " Paris")]) == " Paris"
    with pytest.raises(ValueError, match=r"4 tokens, \[' Tall', 'ah', 'as', 'see'\]"):
        attribute_token(smollm2, " Tallahassee")


def test_no_tokenizer_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="no tokenizer"):
        subject_token_span(tiny_llama, EIFFEL, "Eiffel Tower")
    with pytest.raises(ValueError, match="no tokenizer"):
        attribute_token(tiny_llama, " Paris")


@pytest.mark.slow
def test_tokenize_fact(smollm2):
    fact = Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Paris")
    tf = tokenize_fact(smollm2, fact)
    assert torch.equal(tf.tokens, smollm2.to_tokens(EIFFEL)[0].cpu())
    assert (tf.subject_start, tf.subject_end) == (1, 4) and tf.subject_positions == [1, 2, 3]
    assert tf.str_tokens == smollm2.to_str_tokens(EIFFEL)
    assert tf.roles == token_roles(10, 1, 4) and tf.role_positions == role_positions(10, 1, 4)
    assert smollm2.to_string([tf.attribute_token]) == " Paris"
    with pytest.raises(ValueError, match="2 tokens"):
        tokenize_fact(smollm2, Fact("Alaska", "r", "The capital of {} is", " Juneau"))


# ---------------------------------------------------------------------------------------
# Known facts and noise scale
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_known_facts_small(smollm2):
    eiffel = Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Paris")
    wrong = Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Rome")
    capital = Fact("France", "country_capital", "The capital of {} is the city of", " Paris")
    tokyo = Fact("Japan", "country_capital", "The capital of {} is the city of", " Tokyo")
    facts = [eiffel, wrong, capital, tokyo]
    known = known_facts(smollm2, facts, batch_size=2, progress=False)
    assert [k.fact for k in known] == [eiffel, capital, tokyo]
    # the probability is the clean next-token probability of the attribute
    with torch.no_grad():
        p = smollm2(smollm2.to_tokens(EIFFEL))[0, -1].softmax(-1)[attribute_token(smollm2, " Paris")]
    assert known[0].probability == pytest.approx(float(p), abs=1e-5)
    assert 0.5 < known[0].probability < 1.0
    # batching does not change the numbers
    single = score_facts(smollm2, facts, batch_size=1, progress=False)
    batched = score_facts(smollm2, facts, batch_size=64, progress=False)
    for a, b in zip(single, batched):
        assert a.fact == b.fact and a.rank == b.rank and a.top_token == b.top_token
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
    assert batched[1].rank > 0 and batched[1].top_token == " Paris" and not batched[1].known


@pytest.mark.slow
def test_known_facts_multi_token_attribute(smollm2):
    facts = [
        Fact("Florida", "us_state_capital", "The capital of the state of {} is", " Tallahassee"),
        Fact("France", "country_capital", "The capital of {} is the city of", " Paris"),
    ]
    with pytest.warns(UserWarning, match="skipped 1 fact"):
        scores = score_facts(smollm2, facts, progress=False)
    assert [s.fact.subject for s in scores] == ["France"]
    with pytest.raises(ValueError, match="Tallahassee"):
        score_facts(smollm2, facts, progress=False, on_multi_token="raise")
    with pytest.raises(ValueError, match="batch_size"):
        score_facts(smollm2, facts, batch_size=0)


@pytest.mark.slow
def test_smollm2_knows_many_capitals(smollm2):
    caps = load_facts("country_capital")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attribute must be one token for SmolLM2
        known = known_facts(smollm2, caps, progress=False)
    assert len(known) >= len(caps) // 2


def test_embedding_std_matches_hook_embed(tiny_llama):
    ids = torch.tensor([3, 5, 5, 200, 17])
    _, cache = tiny_llama.run_with_cache(ids[None], names_filter="hook_embed")
    expected = float(cache["hook_embed"][0].std())
    assert embedding_std(tiny_llama, ids) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no token ids"):
        embedding_std(tiny_llama, [])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        embedding_std(tiny_llama, [256])


@pytest.mark.slow
def test_noise_scale(smollm2):
    facts = load_facts("landmark_city")[:20]
    scale = noise_scale(smollm2, facts)
    ids = []
    for f in facts:
        tf = tokenize_fact(smollm2, f)
        ids += tf.tokens[tf.subject_start : tf.subject_end].tolist()
    assert scale.n_tokens == len(ids) and scale.n_vectors_unique == len(set(ids))
    assert scale.std == pytest.approx(float(smollm2.W_E.detach()[torch.tensor(ids)].std()), rel=1e-6)
    assert 0.01 < scale.std < 1.0
    assert scale.noise() == pytest.approx(3 * scale.std) and scale.noise(2.0) == pytest.approx(2 * scale.std)
    assert "20 fact prompts" in scale.measured_on
    with pytest.raises(ValueError, match="at least one fact"):
        noise_scale(smollm2, [])
