"""Private APIs are used at the versions they were written for only (issue 31, item 1):
methods/versions.py owns the list, pyproject.toml bounds the same minor versions, and another
version is one line, not a traceback from deep inside Ray."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from methods.versions import UNTESTED_ENV, WRITTEN_FOR, UntestedVersion, minor, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def declared(package: str) -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return next(re.search(r'"' + package + r'(\[[^\]]*\])?([^"]*)"', line).group(2)
                    for line in f if re.search(r'^\s*"' + package + r'[\[>=<]', line))


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_pyproject_bounds_the_minor_version_the_private_apis_were_written_for(package):
    lower, upper = re.fullmatch(r">=([\d.]+),<([\d.]+)", declared(package)).groups()
    assert minor(lower) == WRITTEN_FOR[package]
    major, minor_number = WRITTEN_FOR[package].split(".")
    assert upper == f"{major}.{int(minor_number) + 1}"
    assert minor(importlib.metadata.version(package)) == WRITTEN_FOR[package]  # what this venv tests


def test_another_version_is_refused_in_one_line_naming_it(monkeypatch):
    monkeypatch.delenv(UNTESTED_ENV, raising=False)
    require("ray", "resumes runs", found="2.60.3")  # any patch release of the minor
    with pytest.raises(UntestedVersion) as error:
        require("ray", "resumes runs", found="2.61.0")
    message = str(error.value)
    assert "\n" not in message and "ray 2.61.0" in message and "2.60.x" in message and "resumes runs" in message
    monkeypatch.setenv(UNTESTED_ENV, "warn")
    with pytest.warns(UserWarning, match="ray 2.61.0"):
        require("ray", "resumes runs", found="2.61.0")


def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path):
    """A pretrain under an untested Ray stops before Ray starts: one line, exit 2."""
    script = ("import importlib.metadata, sys\n"
              "real = importlib.metadata.version\n"
              "importlib.metadata.version = lambda p: '2.99.0' if p == 'ray' else real(p)\n"
              "from pipelines.cli import main\n"
              f"sys.exit(main(['pretrain', '--method', 'simclr', '--data', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "ray 2.99.0" in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
