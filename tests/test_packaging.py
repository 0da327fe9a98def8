"""A complete wheel (issue 31, item 3): every third-party package the product imports is declared
in pyproject.toml, and a wheel installed non-editable, run outside the checkout, prepares the
sample, pretrains an epoch and checks the cluster configs it carries."""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.cli import set_args
from tests.helpers.runs import COMMON, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = ("pipelines", "methods", "tune", "cluster")
# What a wheel is built from: the packages and the files pyproject.toml names (readme, license).
SOURCE = (*PRODUCT, "pyproject.toml", "README.md", "LICENSE")


def imported_top_level_modules(package: str) -> dict[str, str]:
    """{top-level module: a file importing it} for every absolute import under `package`."""
    found = {}
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    found.setdefault(module.split(".")[0], os.path.relpath(path, ROOT))
    return found


def declared_distributions() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"].values()
    return {canonicalize_name(Requirement(r).name) for r in [*project["dependencies"], *(r for e in extras for r in e)]}


def test_every_imported_third_party_package_is_declared():
    providers = importlib.metadata.packages_distributions()  # module -> the distributions installing it
    declared, undeclared = declared_distributions(), []
    for package in PRODUCT:
        for module, where in imported_top_level_modules(package).items():
            if module in sys.stdlib_module_names or module in PRODUCT:
                continue
            names = {canonicalize_name(d) for d in providers.get(module, [])}
            if not names & declared:
                undeclared.append(f"{where} imports {module} ({', '.join(sorted(names)) or 'not installed'})")
    assert undeclared == []


def test_the_import_check_finds_an_undeclared_package(monkeypatch):
    """The check above can fail: a module provided by an undeclared distribution is reported."""
    real = importlib.metadata.packages_distributions()
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {**real, "yaml": ["some-other-yaml"]})
    with pytest.raises(AssertionError, match="imports yaml"):
        test_every_imported_third_party_package_is_declared()


def run(command: list[str], cwd, env) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_prepares_pretrains_and_checks_clusters(tmp_path):
    source, wheels, user = tmp_path / "source", tmp_path / "wheels", tmp_path / "user"
    source.mkdir()
    for name in SOURCE:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, name), source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}  # a Ray of its own
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(source)], tmp_path, env)
    (wheel,) = wheels.glob("selfsup-*.whl")

    # A fresh venv whose dependencies are this one's (a .pth line adds its site-packages after the
    # venv's own, and .pth lines are not run there, so this checkout's editable finder stays off).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    with open(os.path.join(purelib.stdout.strip(), "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", str(wheel)], tmp_path, env)

    user.mkdir()
    where = run([python, "-c", "import pipelines, cluster; print(pipelines.__file__, cluster.__file__)"], user, env)
    assert all(path.startswith(str(venv)) for path in where.stdout.split()), where.stdout

    selfsup = str(venv / "bin" / "selfsup")
    prepared = run([selfsup, "prepare", "sample:digits", "--out", "data/digits", "--num-cpus", "1"], user, env)
    assert json.loads(prepared.stdout.strip().splitlines()[-1])["images_written"] == 1797
    sets = {**COMMON, **TINY["simclr"], "optim.epochs": 1}
    trained = run([selfsup, "pretrain", "--method", "simclr", "--preset", "tiny", "--data", "data/digits/train",
                   "--storage", "runs", "--name", "wheel", "--num-cpus", "2", *set_args(sets)], user, env)
    assert json.loads(trained.stdout.strip().splitlines()[-1])["metrics"]["epoch"] == 1

    checked = run([python, "-m", "cluster.checks"], user, env)
    assert "configs valid" in checked.stdout and "installed package" in checked.stdout, checked.stdout
