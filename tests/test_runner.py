"""mechlib.runner and mechlib.publish: parameter injection (papermill's convention), one run per
model, findings per (notebook, model), the time table, index.html and the README section.

The notebooks here are tiny percent files written to a temporary folder (no model is loaded);
each execution starts a real kernel.
"""

import json

import jupytext
import pytest

import mechlib.precision
from mechlib.publish import README_END, README_START, update_readme, write_index
from mechlib.reports import gather, render_by_model
from mechlib.runner import (
    INJECTED_TAG,
    inject_parameters,
    load_notebook,
    main,
    parameter_names,
    parse_parameter,
    run_notebooks,
    time_table,
)

TINY = """# %% [markdown]
# # A tiny notebook

# %% tags=["parameters"]
MODEL = "m0"
SEED = 0
QUICK = True
N = 2 if QUICK else 4
LABEL: str = "x"

# %%
from mechlib.reports import FindingsRecord

record = FindingsRecord("01_tiny", model=MODEL)
record.add("N and SEED are what was injected", {"N": N, "SEED": SEED, "LABEL": LABEL}, holds=N > 0)
record.conclude()
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "nbs" / "01_tiny.py"
    path.parent.mkdir()
    path.write_text(TINY)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("N_PROMPTS=64", ("N_PROMPTS", 64)),
        ("MODEL=gpt2-small", ("MODEL", "gpt2-small")),
        ("X=0.5", ("X", 0.5)),
        ("FLAG=True", ("FLAG", True)),
        ("S='1'", ("S", "1")),
        ("L=[1, 2]", ("L", [1, 2])),
        ("E=", ("E", "")),
        (" A = b=c ", ("A", "b=c")),
    ],
)
def test_parse_parameter(text, expected):
    assert parse_parameter(text) == expected


@pytest.mark.parametrize("text", ["N_PROMPTS", "1X=2", "a-b=3", ""])
def test_parse_parameter_rejects_malformed(text):
    with pytest.raises(ValueError, match="NAME=VALUE|identifier"):
        parse_parameter(text)


def test_parameter_names_reads_the_tagged_cell(tiny):
    names = parameter_names(load_notebook(tiny))
    assert names == {"MODEL": "m0", "SEED": 0, "QUICK": True, "N": None, "LABEL": "x"}


def test_injected_cell_follows_the_parameters_cell(tiny):
    nb = inject_parameters(load_notebook(tiny), {"SEED": 3, "MODEL": "gpt2-small"})
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nb.cells[index + 1]
    assert injected.metadata["tags"] == [INJECTED_TAG]
    namespace = {}
    exec(injected.source, namespace)
    assert (namespace["SEED"], namespace["MODEL"]) == (3, "gpt2-small")
    # injecting again replaces the earlier cell instead of stacking a second one
    nb = inject_parameters(nb, {"SEED": 4})
    tagged = [c for c in nb.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SEED = 4" in tagged[0].source and "MODEL" not in tagged[0].source


def test_unknown_name_is_an_error(tiny):
    with pytest.raises(ValueError, match="does not define SEEED"):
        inject_parameters(load_notebook(tiny), {"SEEED": 1})


def _run_cells(nb, upto):
    namespace = {}
    for cell in nb.cells[: upto + 1]:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
    return namespace


def test_what_the_parameters_cell_derives_is_recomputed(tiny):
    nb = inject_parameters(load_notebook(tiny), {"QUICK": False})
    assert nb.cells[2].source.splitlines()[-1] == "N = 2 if QUICK else 4"
    ns = _run_cells(nb, 2)
    assert (ns["QUICK"], ns["N"], ns["LABEL"]) == (False, 4, "x")
    # an injected value wins over the derivation
    ns = _run_cells(inject_parameters(load_notebook(tiny), {"QUICK": False, "N": 7}), 2)
    assert (ns["QUICK"], ns["N"]) == (False, 7)
    # nothing derived from SEED: only the assignment
    nb = inject_parameters(load_notebook(tiny), {"SEED": 3})
    assert nb.cells[2].source.splitlines()[1:] == ["SEED = 3"]


def test_derivations_are_followed_in_order(tmp_path):
    path = tmp_path / "04_chain.py"
    path.write_text('# %% tags=["parameters"]\nSEED = 0\nTOY_SEED = SEED + 1\nPAIR = (TOY_SEED, 2)\nOTHER = 5\n')
    ns = _run_cells(inject_parameters(load_notebook(path), {"SEED": 10}), 1)
    assert (ns["SEED"], ns["TOY_SEED"], ns["PAIR"], ns["OTHER"]) == (10, 11, (11, 2), 5)


def test_notebook_without_parameters_cell_is_an_error(tmp_path):
    path = tmp_path / "02_plain.py"
    path.write_text("# %%\nMODEL = 'm'\n")
    with pytest.raises(ValueError, match="no code cell is tagged 'parameters'"):
        inject_parameters(load_notebook(path), {"MODEL": "x"})


def test_two_parameters_cells_are_an_error(tmp_path):
    path = tmp_path / "02_two.py"
    path.write_text('# %% tags=["parameters"]\nA = 1\n\n# %% tags=["parameters"]\nB = 2\n')
    with pytest.raises(ValueError, match="tag exactly one"):
        inject_parameters(load_notebook(path), {"A": 2})


def test_load_notebook_prefers_the_py_source_and_drops_outputs(tiny):
    nb = jupytext.read(tiny)
    nb.cells[2].source = "raise RuntimeError('the stale .ipynb ran')"
    nb.cells[2].outputs = []
    jupytext.write(nb, tiny.with_suffix(".ipynb"))
    assert "FindingsRecord" in load_notebook(tiny.with_suffix(".ipynb")).cells[2].source


def test_run_once_per_model_with_findings_per_notebook_and_model(tiny, tmp_path):
    reports = tmp_path / "reports"
    lines = []
    runs = run_notebooks([tiny], models=["m1", "m2"], parameters={"SEED": 7}, reports=reports, log=lines.append)
    assert [(r.notebook, r.model, r.ok) for r in runs] == [("01_tiny", "m1", True), ("01_tiny", "m2", True)]
    for model in ("m1", "m2"):
        record = json.loads((reports / "findings" / f"01_tiny--{model}.json").read_text())
        assert record["model"] == model
        assert record["findings"][0]["measured"] == {"N": 2, "SEED": 7, "LABEL": "x"}
        assert (reports / "executed" / f"01_tiny--{model}.ipynb").is_file()
    executed = load_notebook(reports / "executed" / "01_tiny--m1.ipynb")
    assert INJECTED_TAG in executed.cells[2].metadata["tags"]

    table = time_table(runs)
    assert table.splitlines()[0].split() == ["notebook", "m1", "m2"]
    assert table.splitlines()[1].startswith("01_tiny")

    rows, _ = gather(reports)
    by_model = render_by_model(rows)
    assert by_model.splitlines()[0] == "| notebook | claim | m1 | m2 | reference (source) |"
    assert by_model.count("| yes: ") == 2

    index = write_index(reports, runs)
    page = index.read_text()
    for model in ("m1", "m2"):
        assert f'href="executed/01_tiny--{model}.html"' in page
        assert (reports / "executed" / f"01_tiny--{model}.html").is_file()
    assert "SEED=7" in page


READER = """# %% tags=["parameters"]
MODEL = "m0"
SEED = 0
QUICK = True

# %%
import os

from mechlib.reports import FindingsRecord

first = FindingsRecord.load("01_tiny", MODEL)
record = FindingsRecord("02_reader", model=MODEL)
record.add("01_tiny ran first", first is not None, holds=first is not None, threads=os.environ.get("MECHLIB_THREADS"))
record.conclude()
"""


def test_side_by_side_runs_keep_order_where_a_notebook_reads_another(tiny, tmp_path, monkeypatch):
    """``--jobs 2``: kernels run at once with their share of the cores, and a notebook that loads
    the record of one listed before it starts only after that one ended on the same model (as in
    a run one at a time)."""
    from mechlib.runner import notebook_dependencies

    reader = tiny.parent / "02_reader.py"
    reader.write_text(READER)
    assert notebook_dependencies(reader) == {"01_tiny"} and notebook_dependencies(tiny) == set()
    monkeypatch.delenv("MECHLIB_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    reports = tmp_path / "reports"
    lines = []
    runs = run_notebooks([tiny, reader], models=["m1", "m2"], reports=reports, jobs=2, log=lines.append)
    assert [(r.notebook, r.model, r.ok) for r in runs] == [
        ("01_tiny", "m1", True),
        ("01_tiny", "m2", True),
        ("02_reader", "m1", True),
        ("02_reader", "m2", True),
    ], lines
    starts = [line for line in lines if line.startswith("==")]
    assert starts[:2] == ["== 01_tiny MODEL='m1'", "== 01_tiny MODEL='m2'"], "two kernels at once, in order"
    for model in ("m1", "m2"):
        (finding,) = json.loads((reports / "findings" / f"02_reader--{model}.json").read_text())["findings"]
        assert finding["holds"] and finding["details"]["threads"] == "2"
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        run_notebooks([tiny], reports=reports, jobs=0)
    assert "wall time" in time_table(runs, wall=12.0)


def test_a_failing_notebook_is_reported_and_keeps_its_traceback(tmp_path):
    path = tmp_path / "03_fails.py"
    path.write_text('# %% tags=["parameters"]\nMODEL = "m"\n\n# %%\nraise RuntimeError("boom")\n')
    (run,) = run_notebooks([path], reports=tmp_path / "reports", log=lambda *_: None)
    assert not run.ok and "boom" in run.error
    assert "boom" in run.executed.read_text()


def test_bad_parameters_are_refused_before_anything_runs(tiny, tmp_path, capsys):
    reports = tmp_path / "reports"
    assert main([str(tiny), "-p", "SEEED=1", "--reports", str(reports)]) == 2
    assert "does not define SEEED" in capsys.readouterr().err
    assert main([str(tiny), "-p", "MODEL=a", "--models", "b", "--reports", str(reports)]) == 2
    assert not (reports / "executed").exists()


def test_a_bfloat16_run_is_saved_apart_and_printed_against_float32(tiny, tmp_path, capsys, monkeypatch):
    """``make reproduce PRECISION=bfloat16``: the kernel sees the setting, the records and executed
    copies get their own names, and the run ends with each finding beside the float32 record."""
    reports = tmp_path / "reports"
    monkeypatch.delenv("MECHLIB_PRECISION", raising=False)
    assert main([str(tiny), "--reports", str(reports), "--no-html"]) == 0
    assert "float32 (largest absolute difference" not in capsys.readouterr().out
    monkeypatch.setenv("MECHLIB_PRECISION", "bfloat16")
    assert main([str(tiny), "--reports", str(reports), "--no-html", "-p", "N=3"]) == 0
    out = capsys.readouterr().out
    record = json.loads((reports / "findings" / "01_tiny--m0--bfloat16.json").read_text())
    assert record["precision"] == "bfloat16" and (reports / "executed" / "01_tiny--m0--bfloat16.ipynb").is_file()
    assert json.loads((reports / "findings" / "01_tiny--m0.json").read_text())["precision"] == "float32"
    assert "01_tiny / m0 / N and SEED are what was injected: 1" in out, out
    assert "largest difference 1 over 1 numeric findings; 0 verdict(s) moved" in out
    assert (reports / "precision-bfloat16.txt").read_text().startswith("bfloat16 against float32")


def test_readme_section_is_rendered_between_the_markers(tmp_path):
    from mechlib.reports import FindingsRecord

    reports = tmp_path / "reports"
    for model, value in (("m1", 0.9), ("m2", 0.1)):
        record = FindingsRecord("01_tiny", model=model)
        record.add("value above one half", value, holds=value > 0.5, reference="0.5")
        record.save(reports / "findings")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{README_START}\nold text 0.42\n{README_END}\n\nafter\n")
    assert "not rewritten" in update_readme(reports, complete=False, readme=readme)
    assert "old text 0.42" in readme.read_text()
    with mechlib.precision.use("bfloat16"):  # the README shows float32, the reference, only
        assert "at float32" in update_readme(reports, readme=readme)
    assert "old text 0.42" in readme.read_text()

    update_readme(reports, readme=readme)
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    section = text.split(README_START)[1].split(README_END)[0]
    assert "| notebook | claim | m1 | m2 | reference (source) |" in section
    assert "| 01_tiny | value above one half | yes: 0.9 | NO: 0.1 | 0.5 |" in section
    update_readme(reports, readme=readme)
    assert readme.read_text() == text  # idempotent

    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="findings:start"):
        update_readme(reports, readme=readme)


def test_error_summary_keeps_the_failing_cells_first_line():
    """nbclient's report ends with the traceback; a long ``record.conclude()`` message must still
    show its head ("... do not hold:"), which the notebook tests look for."""
    from nbclient.exceptions import CellExecutionError

    from mechlib.runner import error_summary

    evalue = "02_x on m: 6 finding(s) do not hold:\n" + "\n".join(f"- claim {i}: " + "x" * 900 for i in range(6))
    e = CellExecutionError("traceback " * 500, "AssertionError", evalue)
    summary = error_summary(e)
    assert summary.startswith("CellExecutionError: AssertionError: 02_x on m: 6 finding(s) do not hold:")
    assert len(summary) < 3100 and summary.endswith("x" * 100)
    assert error_summary(ValueError("plain")) == "ValueError: plain"
