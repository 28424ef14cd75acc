"""mechlib.precision: the bfloat16 opt-in for the engine's sweeps, float32 the default and the
reference; records saved apart and compared finding by finding."""

import json

import pytest
import torch

import mechlib.precision as precision
from mechlib.backends import get_backend
from mechlib.eap import graph_model
from mechlib.engine import get_engine
from mechlib.metrics import Metric
from mechlib.patching import patch
from mechlib.reports import FindingsRecord, compare_precisions, gather, record_stem


def test_float32_is_the_default_and_use_nests(monkeypatch):
    monkeypatch.delenv("MECHLIB_PRECISION", raising=False)
    assert precision.current() == "float32"
    with precision.use("bfloat16"):
        assert precision.current() == "bfloat16"
        with precision.use("float32"):
            assert precision.current() == "float32"
        assert precision.current() == "bfloat16"
    assert precision.current() == "float32"
    monkeypatch.setenv("MECHLIB_PRECISION", "BFloat16")
    assert precision.current() == "bfloat16"


def test_unknown_precisions_are_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("MECHLIB_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"\$MECHLIB_PRECISION must be one of \('float32', 'bfloat16'\)"):
        precision.current()
    with pytest.raises(ValueError, match="precision must be one of"):
        with precision.use("half"):
            pass
    with pytest.raises(ValueError, match="precision must be one of"):
        get_engine(object(), precision="float16")


def test_a_bfloat16_engine_multiplies_in_bfloat16_and_stays_near_float32(tiny_llama):
    e32, e16 = get_engine(tiny_llama), get_engine(tiny_llama, "bfloat16")
    assert e32.precision == "float32" and e16.precision == "bfloat16" and e32 is not e16
    assert get_engine(tiny_llama, "bfloat16") is e16, "each precision's engine is built once"
    assert e16.W_qkv[0].dtype == torch.bfloat16 and e16.W_U.dtype == torch.bfloat16
    assert e32.W_qkv[0].dtype == torch.float32
    tokens = torch.randint(0, tiny_llama.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    b32, b16 = e32.run(tokens), e16.run(tokens)
    assert b16["blocks.1.hook_resid_post"].dtype == torch.float32, "the residual stream stays float32"
    ref = tiny_llama(tokens)
    assert torch.allclose(b32.logits, ref, atol=1e-4), "float32 is exact"
    diff = (b16.logits - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item(), diff
    r32 = e32.resume(b32, 1, 4, last_only=True)
    r16 = e16.resume(b16, 1, 4, last_only=True)
    assert 0 < (r32 - r16).abs().max() < 0.05 * r32.abs().max()


def test_sweeps_follow_the_setting_and_edge_attribution_stays_float32(tiny_llama):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, tiny_llama.cfg.d_vocab, (2, 6), generator=g)
    corrupted = torch.randint(0, tiny_llama.cfg.d_vocab, (2, 6), generator=g)
    metric = Metric(lambda logits: logits[:, -1, 3].mean() - logits[:, -1, 5].mean(), last_only=True)
    ref = patch(tiny_llama, clean, corrupted, metric, "resid_pre", normalise=False, progress=False).values
    with precision.use("bfloat16"):
        assert get_backend(tiny_llama, "auto").engine.precision == "bfloat16"
        assert graph_model(tiny_llama).eng.precision == "float32"
        low = patch(tiny_llama, clean, corrupted, metric, "resid_pre", normalise=False, progress=False).values
    assert get_backend(tiny_llama, "auto").engine.precision == "float32"
    spread = (ref.max() - ref.min()).item()
    assert spread > 1e-3, "the grid must vary, or comparing it proves nothing"
    diff = (low - ref).abs().max().item()
    assert 0 < diff < 0.05 * spread, (diff, spread)


def _save(folder, measured, holds, interval_high=None):
    record = FindingsRecord("02_x", model="m")
    record.add("a number", measured["n"], holds=holds)
    record.add("labels", measured["labels"], holds=True)
    record.add("a float32-only claim" if precision.current() == "float32" else "a new claim", 1.0, holds=True)
    return record.save(folder)


def test_records_are_saved_apart_and_compared_finding_by_finding(tmp_path, monkeypatch):
    monkeypatch.delenv("MECHLIB_PRECISION", raising=False)
    findings = tmp_path / "findings"
    assert record_stem("02_x", "a/b") == "02_x--a_b"
    assert record_stem("02_x", "a/b", "bfloat16") == "02_x--a_b--bfloat16"
    _, text = compare_precisions(tmp_path, precision="bfloat16")
    assert "no finding to compare" in text
    p32 = _save(findings, {"n": 1.0, "labels": {"heads": ["L1H2"], "score": 0.5}}, holds=True)
    with precision.use("bfloat16"):
        p16 = _save(findings, {"n": 1.25, "labels": {"heads": ["L1H3"], "score": 0.75}}, holds=False)
        assert p16.name == "02_x--m--bfloat16.json" and p32.name == "02_x--m.json"
        assert json.loads(p16.read_text())["precision"] == "bfloat16"
        rows, _ = gather(tmp_path)
        assert {r["precision"] for r in rows} == {"bfloat16"} and len(rows) == 3
        rows, text = compare_precisions(tmp_path)
    assert json.loads(p32.read_text())["precision"] == "float32"
    rows32, _ = gather(tmp_path)
    assert {r["precision"] for r in rows32} == {"float32"} and len(rows32) == 3, "each precision gathers its own"
    by = {r["claim"]: r for r in rows}
    assert by["a number"]["max_abs_diff"] == pytest.approx(0.25)
    assert by["a number"]["holds_float32"] is True and by["a number"]["holds"] is False
    assert by["labels"]["max_abs_diff"] == pytest.approx(0.25) and by["labels"]["same_labels"] is False
    assert by["a new claim"]["holds_float32"] is None
    assert "a number: 0.25 ! holds True -> False" in text
    assert "labels: 0.25, labels differ" in text
    assert "a new claim: no float32 record" in text
    assert "largest difference 0.25 over 2 numeric findings; 1 verdict(s) moved" in text

    p32.unlink()
    _, text = compare_precisions(tmp_path, precision="bfloat16")
    assert "no float32 record for 02_x--m" in text
