"""FindingsRecord: save, gather, assert_all."""

import json

import pytest

from mechlib.reports import FindingsRecord, gather, profile


def _record(name, holds=True):
    record = FindingsRecord(name, model="tiny-2l")
    record.add("top-1 is Paris", 0.70, holds=holds, reference="0.70", source="tour", threshold=0.5)
    return record


def test_assert_all_passes_when_every_finding_holds():
    _record("00_ok").assert_all()


def test_assert_all_names_the_failing_finding():
    record = _record("00_bad")
    record.add("second claim", 1.0, holds=True)
    record.add("loss rises 5x", 1.2, holds=False, reference=">5")
    with pytest.raises(AssertionError, match="1 finding\\(s\\) do not hold") as err:
        record.assert_all()
    assert "loss rises 5x" in str(err.value) and "second claim" not in str(err.value)


def test_assert_all_without_findings_raises():
    with pytest.raises(AssertionError, match="no findings"):
        FindingsRecord("00_empty", model="tiny-2l").assert_all()


def test_save_and_gather_write_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHLIB_REPORTS", str(tmp_path))
    monkeypatch.setenv("MECHLIB_PROFILE", "quick")
    path = _record("01_a").save()
    assert path == tmp_path / "findings" / "01_a.json"
    saved = json.loads(path.read_text())
    assert saved["profile"] == "quick" and saved["findings"][0]["details"] == {"threshold": 0.5}
    _record("02_b", holds=False).save()

    rows, table = gather()
    assert [r["notebook"] for r in rows] == ["01_a", "02_b"]
    assert json.loads((tmp_path / "findings.json").read_text()) == rows
    md = (tmp_path / "findings.md").read_text()
    assert md.startswith("# Findings") and table in md
    assert "| 01_a | tiny-2l | top-1 is Paris | 0.7 | 0.70 (tour) | yes |" in md
    assert "| NO |" in md


def test_profile_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("MECHLIB_PROFILE", "fast")
    with pytest.raises(ValueError, match="quick' or 'full"):
        profile()


def test_conclude_saves_prints_then_fails_on_a_finding_that_does_not_hold(tmp_path, capsys):
    assert _record("03_ok").conclude(tmp_path) == tmp_path / "03_ok.json"
    assert "top-1 is Paris" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="1 finding"):
        _record("03_bad", holds=False).conclude(tmp_path)
    # saved before failing, so the report still shows the failure
    assert json.loads((tmp_path / "03_bad.json").read_text())["findings"][0]["holds"] is False
