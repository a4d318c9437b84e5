"""The set-up files agree with each other and with the environment the suite runs in: environment.yml lists exactly
pyproject's packages, with the same version bounds; constraints.txt pins each of them exactly, and the running
environment has those versions; torch is the Makefile's; the Makefile's test target is what the README and CI call."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.replace(" ", "")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(normalise, pip_section)) == sorted(map(normalise, wanted))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make penn" in readme
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line that is not a comment must be ``name==version``."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_direct_dependency_exactly_and_within_pyproject():
    """Every package pyproject names (its dependencies and every extra) has one exact version in constraints.txt,
    inside pyproject's range; torch is left to the Makefile's TORCH (a GPU user brings their own) and dpolab is
    this checkout."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = constraints()
    assert "torch" not in pins and "dpolab" not in pins
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if name != "torch":
            assert name in pins, f"{requirement.name} is not pinned in constraints.txt: run make lock"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{name}=={pins[name]} vs {requirement}"
            )


def test_the_running_environment_is_the_one_constraints_txt_pins():
    """The suite runs on the locked versions: every package of constraints.txt is installed at its version; a drift
    (a package upgraded or removed by hand, or constraints.txt changed without reinstalling) names each package."""
    drift = []
    for name, version in constraints().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed == "not installed" or Version(installed) != Version(version):
            drift.append(f"{name} {installed} (constraints.txt: {version})")
    assert not drift, "the environment is not constraints.txt's (make venv reinstalls it): " + ", ".join(drift)


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch (README: installing on a GPU)")
def test_torch_is_the_version_the_makefile_installs():
    """torch is the Makefile's TORCH as make evaluates it (a `make test TORCH=...` override included, which reaches
    this make through MAKEFLAGS)."""
    show = "show-torch:\n\t@echo '$(TORCH)'\n"
    pin = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show-torch"],
        input=show,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.strip()
    assert Requirement(pin).name == "torch"
    assert Requirement(pin).specifier.contains(torch.__version__), f"torch {torch.__version__}, the Makefile's {pin}"
