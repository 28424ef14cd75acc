import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MECHLIB_PROFILE", "quick")

import pytest  # noqa: E402

# Under pytest-xdist (`make test` runs `-n 2`), the cores are shared between the workers: each
# worker, and every notebook kernel it starts (it inherits the environment; mechlib.set_threads
# reads MECHLIB_THREADS), uses its share instead of every core.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("MECHLIB_THREADS"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["MECHLIB_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, _workers)))
if os.environ.get("MECHLIB_THREADS"):
    from mechlib.models import set_threads  # noqa: E402

    set_threads()  # torch's threads and NumPy's BLAS (scikit-learn in the tests)


def pytest_collection_modifyitems(config, items):
    """Notebook runs (the longest tests, already ordered longest first) go first, so that the
    xdist workers share them and the short tests fill in at the end."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("notebook") else 1)


def pytest_terminal_summary(terminalreporter):
    """After the run: seconds per notebook and model (the notebook tests' executions), as
    ``make reproduce`` prints them."""
    from mechlib.runner import Run, time_table

    runs = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == "notebook_run":
                    runs[(value["notebook"], value["model"])] = Run(
                        value["notebook"],
                        value["model"],
                        seconds=value["seconds"],
                        error=None if report.passed else "failed",
                    )
    if runs:
        terminalreporter.write_sep("-", "notebook runs: seconds per notebook and model")
        terminalreporter.write_line(time_table(sorted(runs.values(), key=lambda r: r.notebook)))


@pytest.fixture(scope="session")
def smollm2():
    """The default real model, loaded once per test session."""
    from mechlib.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_attn():
    from mechlib.models import load_model

    return load_model("tiny-attn-2l", seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    from mechlib.models import load_model

    return load_model("tiny-llama-2l", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt():
    from mechlib.models import load_model

    return load_model("tiny-2l", seed=0)
