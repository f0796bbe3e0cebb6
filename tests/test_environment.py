"""conda users (environment.yaml) and pip/make users (pyproject.toml, Makefile) get the same set."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


# Extras that bring a peer's code (their licences, CUDA builds): offered, never installed by default.
PEER_EXTRAS = {"fastervit", "mamba"}


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def default_extras() -> set[str]:
    extras = set(pyproject()["project"]["optional-dependencies"])
    assert PEER_EXTRAS <= extras
    return extras - PEER_EXTRAS


def test_environment_yaml_installs_this_package_with_every_default_extra():
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert env["name"] == "atlas"
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    editable = [line for line in pip_section if line.startswith("-e .")]
    assert len(editable) == 1, pip_section
    extras = set(re.fullmatch(r"-e \.\[(.*)\]", editable[0]).group(1).split(","))
    assert extras == default_extras()


def test_makefile_installs_the_same_extras():
    extras = re.search(r"^EXTRAS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split(",")
    assert set(extras) == default_extras()


def test_runtime_dependencies_are_declared():
    deps = " ".join(pyproject()["project"]["dependencies"])
    for name in ("torch", "timm", "einops"):
        assert re.search(rf"\b{name}>=", deps), name
