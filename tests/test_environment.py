"""environment.yml mirrors pyproject.toml: same packages, same lower bounds."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge spells a few packages differently from PyPI
CONDA_NAMES = {"redis": "redis-py", "kaleido": "python-kaleido", "prometheus-client": "prometheus_client"}


def _norm(spec: str) -> tuple[str, str]:
    spec = spec.split(";")[0].strip()
    name, bound = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec).groups()  # type: ignore[union-attr]
    return name.lower().replace("_", "-"), bound.replace(" ", "")


def test_environment_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    have: dict[str, str] = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if not item.startswith("-"):
                name, bound = _norm(item)
                have[name] = bound
    for spec in wanted:
        name, bound = _norm(spec)
        conda = _norm(CONDA_NAMES.get(name, name))[0]
        assert conda in have, f"{name} is in pyproject.toml but not in environment.yml"
        assert have[conda] == bound, f"{name}: pyproject says {bound!r}, environment.yml {have[conda]!r}"
    assert _norm(next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")))[1] == \
        project["requires-python"]
