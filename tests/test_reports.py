"""FindingsRecord: save, gather, assert_all."""

import json

import pytest

from mechlib.reports import FindingsRecord, gather, profile, record_stem


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
    assert path == tmp_path / "findings" / "01_a--tiny-2l.json"
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
    assert _record("03_ok").conclude(tmp_path) == tmp_path / "03_ok--tiny-2l.json"
    assert "top-1 is Paris" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="1 finding"):
        _record("03_bad", holds=False).conclude(tmp_path)
    # saved before failing, so the report still shows the failure
    assert json.loads((tmp_path / "03_bad--tiny-2l.json").read_text())["findings"][0]["holds"] is False


def test_check_holds_only_when_the_whole_interval_clears_the_threshold():
    from mechlib.stats import Estimate

    record = FindingsRecord("00_iv", model="tiny-2l")
    assert record.check("clear", Estimate(0.8, 0.6, 0.9, 10), above=0.5).holds
    assert not record.check("point above, interval not", Estimate(0.8, 0.4, 0.9, 10), above=0.5).holds
    assert record.check("below", Estimate(0.1, 0.0, 0.2, 10), below=0.3).holds
    assert not record.check("both", Estimate(0.5, 0.35, 0.6, 10), above=0.3, below=0.55).holds
    saved = record.to_dict()["findings"][0]
    assert saved["interval"]["low"] == 0.6 and saved["details"] == {"above": 0.5}
    with pytest.raises(ValueError, match="threshold"):
        record.check("no threshold", Estimate(0.5, 0.4, 0.6, 3))
    with pytest.raises(TypeError, match="Estimate"):
        record.check("a float", 0.5, above=0.1)


def test_load_returns_the_saved_record_and_its_details(tmp_path):
    record = _record("02_x")
    record.add("circuit", 0.5, holds=True, circuit=["L1H0", "L0H1"])
    record.save(tmp_path)
    back = FindingsRecord.load("02_x", "tiny-2l", tmp_path)
    assert back.findings == record.findings and back.model == "tiny-2l"
    assert back.detail("circuit") == ["L1H0", "L0H1"]
    with pytest.raises(KeyError, match="threshold"):
        back.detail("heads")  # the message lists the details there are
    assert FindingsRecord.load("02_x", "other-model", tmp_path) is None
    bad = tmp_path / f"{record_stem('03_y', 'tiny-2l')}.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a findings record"):
        FindingsRecord.load("03_y", "tiny-2l", tmp_path)


def _rows(records):
    """Findings rows as gather() returns them: records is {(notebook, model): {claim: holds}}."""
    return [
        {"notebook": nb, "model": m, "claim": c, "holds": h, "measured": 1.0}
        for (nb, m), claims in records.items()
        for c, h in claims.items()
    ]


def test_across_models_sorts_claims_by_where_they_hold():
    from mechlib.reports import across_models, render_across_models

    rows = _rows(
        {
            ("01_a", "model-x"): {"both": True, "x only": True, "neither": False, "x alone ran it": True},
            ("01_a", "model-y"): {"both": True, "x only": False, "neither": False},
            ("02_b", "model-x"): {"both": True},
            ("02_b", "model-y"): {"both": True},
        }
    )
    first, second = across_models(rows)
    assert first["notebook"] == "01_a" and first["models"] == ["model-x", "model-y"] and first["claims"] == 4
    assert first["everywhere"] == ["both"]
    assert first["some"] == [("x only", ["model-x"], ["model-y"])]
    assert first["nowhere"] == ["neither"]
    assert first["missing"] == [("x alone ran it", ["model-y"])]  # holds where it ran, but not "everywhere"
    assert second["everywhere"] == ["both"] and not second["some"] + second["nowhere"] + second["missing"]

    text = render_across_models(rows)
    line = next(line for line in text.splitlines() if "01_a" in line)
    assert "1 of 4 claims hold on every model" in line
    assert "Holds on model-x but not on model-y: “x only”" in line
    assert "Holds on no model: “neither”" in line and "No record on model-y: “x alone ran it”" in line
    assert "02_b**: 1 of 1 claims hold on every model." in text


def test_a_claim_not_applicable_on_a_model_is_named_as_such():
    from mechlib.reports import render_across_models

    rows = _rows({("06_c", "chat"): {"self-explanation": True}, ("06_c", "base"): {"self-explanation": False}})
    rows[1]["details"] = {"applicable": False}
    text = render_across_models(rows)
    assert "0 of 1 claims hold on every model" in text
    assert "Not applicable on base (counted as not holding): “self-explanation”" in text
    assert "Holds on chat but not on base" not in text


def test_across_models_is_silent_for_one_model():
    from mechlib.reports import render_across_models

    assert render_across_models(_rows({("01_a", "model-x"): {"c": True}})) == ""


def test_readme_says_what_holds_across_models(tmp_path):
    from mechlib.publish import README_END, README_START, update_readme

    for model, holds in (("model-x", True), ("model-y", False)):
        record = FindingsRecord("01_a", model=model)
        record.add("the claim", 1.0, holds=holds)
        record.add("always", 1.0, holds=True)
        record.save(tmp_path / "findings")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{README_START}\nold\n{README_END}\ntail\n")
    update_readme(tmp_path, readme=readme)
    text = readme.read_text()
    assert "### What holds across models" in text and "\nold\n" not in text and text.endswith("tail\n")
    assert "1 of 2 claims hold on every model" in text
    assert "Holds on model-x but not on model-y: “the claim”" in text
    assert "| notebook | claim | model-x | model-y |" in text
