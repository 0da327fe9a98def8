"""The tested set is what gets installed (issue 31, item 2): cluster/constraints.txt pins every
package of `.[test]`, each pin is inside pyproject.toml's range for it, and the README's two
commands and CI install with it."""

import os
import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cluster.shipping import CONSTRAINTS_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins() -> dict[str, str]:
    with open(os.path.join(ROOT, CONSTRAINTS_FILE)) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines)}


def project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_every_declared_requirement_is_pinned_inside_its_range():
    extras = project()["optional-dependencies"].values()
    declared = [*project()["dependencies"], *(r for extra in extras for r in extra)]
    pinned, problems = pins(), []
    for requirement in map(Requirement, declared):
        name = canonicalize_name(requirement.name)
        if name == "selfsup":  # an extra made of the other extras
            continue
        if name not in pinned:
            problems.append(f"{requirement.name}: not in {CONSTRAINTS_FILE}")
        elif not requirement.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{requirement.name}=={pinned[name]} is outside pyproject's {requirement.specifier}")
    assert problems == []


def test_the_test_extra_is_the_other_extras_plus_the_test_tools():
    extras = project()["optional-dependencies"]
    own = [Requirement(r) for r in extras["test"]]
    composed = next(r for r in own if r.name == "selfsup")
    assert composed.extras == set(extras) - {"test"}
    copied = {canonicalize_name(Requirement(r).name) for name in composed.extras for r in extras[name]}
    assert copied.isdisjoint(canonicalize_name(r.name) for r in own if r.name != "selfsup")


def test_the_readme_commands_and_ci_install_the_tested_set():
    with open(os.path.join(ROOT, "README.md")) as f:
        quickstart = f.read().split("## Usage")[0]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    installs = re.findall(r"pip install[^&\n]*", quickstart) + re.findall(r"pip install[^&\n]*", ci)
    assert len(installs) == 3 and all(f"-c {CONSTRAINTS_FILE}" in command for command in installs), installs
