"""Every notebook in notebooks/ runs top to bottom (quick profile) and its findings hold."""

import json
import os

import pytest

from mechlib.runner import execute_notebook, notebook_paths

NOTEBOOKS = notebook_paths()


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_findings_hold(path, tmp_path):
    os.environ.setdefault("MECHLIB_PROFILE", "quick")
    reports = tmp_path / "reports"
    os.environ["MECHLIB_REPORTS"] = str(reports)
    try:
        execute_notebook(path, reports / "executed", timeout=1800)
    finally:
        os.environ.pop("MECHLIB_REPORTS", None)
    record = json.loads((reports / "findings" / f"{path.stem}.json").read_text())
    assert record["findings"], f"{path.name} recorded no findings"
    failed = [f["claim"] for f in record["findings"] if not f["holds"]]
    assert not failed, f"{path.name}: findings that do not hold: {failed}"


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert NOTEBOOKS, "notebooks/ holds no notebook"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"
