"""What leaves the checkout and what runs on every node: the one exclude list (`exclude.txt`) for
the launcher's file mounts, `ray job submit` and `docker build`, which must drop secrets and data
but never the product's own code; pip installs pinned to `constraints.txt`; images pinned by
digest. Used by the config checks (`cluster/checks.py`)."""

from __future__ import annotations

import fnmatch
import os
import re

FOLDER = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FOLDER)
EXCLUDE_FILE = os.path.join(FOLDER, "exclude.txt")
CONSTRAINTS_FILE = "cluster/constraints.txt"  # relative to the checkout, as node setup reads it
# What no exclude list may miss: secrets, data, runs and checkpoints (cluster/exclude.txt has more).
REQUIRED_EXCLUDES = (".env*", "*.pem", "*.key", "*credentials*", ".aws", ".ssh", "data", "runs",
                     "checkpoint_*", "*.pt", "*.ckpt", "*.safetensors", ".venv", ".git")
DIGEST = re.compile(r"@sha256:([0-9a-f]{64}|REPLACE[\w.-]*)$")


def exclude_patterns(path: str = EXCLUDE_FILE) -> list[str]:
    with open(path) as stream:
        return [line.strip() for line in stream if line.strip() and not line.lstrip().startswith("#")]


def _normalise(pattern: str) -> str:
    return pattern.strip().rstrip("/")


def exclude_findings(patterns, where: str, expected: list[str] | None = None) -> list[str]:
    """An exclude list must be cluster/exclude.txt (which has every REQUIRED_EXCLUDES pattern)."""
    expected = expected if expected is not None else exclude_patterns()
    given = {_normalise(p) for p in patterns or []}
    missing = [p for p in REQUIRED_EXCLUDES if p not in given]
    if missing:
        return [f"{where} would ship {', '.join(missing)} (use the list in cluster/exclude.txt)"]
    if given != {_normalise(p) for p in expected}:
        differs = sorted(given ^ {_normalise(p) for p in expected})
        return [f"{where} differs from cluster/exclude.txt in {', '.join(differs)}"]
    return []


PRODUCT_PACKAGES = ("pipelines", "methods", "tune", "cluster")


def excluded_by(path: str, pattern: str) -> bool:
    """Whether an exclude `pattern` drops the checkout-relative `path`: a pattern without a slash
    (after an optional `**/`) matches any component, as rsync and gitignore read it."""
    pattern = _normalise(pattern).removeprefix("**/")
    if "/" in pattern:
        return fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")
    return any(fnmatch.fnmatch(part, pattern) for part in path.split("/"))


def product_findings(patterns: list[str], root: str = ROOT) -> list[str]:
    """The exclude list must not drop the product's own code: a package named like a pattern
    (`data`, `runs`) would be missing from every job upload, node and image."""
    found = []
    for package in PRODUCT_PACKAGES:
        for folder, folders, names in os.walk(os.path.join(root, package)):
            folders[:] = [f for f in folders if f != "__pycache__"]
            for name in (n for n in names if n.endswith((".py", ".yaml", ".txt"))):
                path = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                dropped = [p for p in patterns if excluded_by(path, p)]
                if dropped:
                    found.append(f"cluster/exclude.txt: {dropped[0]!r} drops {path}, the product's own code "
                                 "(rename the folder, or anchor the pattern)")
    return found


def dockerignore_lines(patterns: list[str]) -> list[str]:
    """.dockerignore matches from the context root, so each pattern also gets a `**/` twin to
    match at any depth as rsync and gitignore do."""
    lines = []
    for pattern in patterns:
        lines.append(pattern)
        if not pattern.startswith("**/") and "/" not in pattern.rstrip("/"):
            lines.append(f"**/{pattern}")
    return lines


def runtime_env_findings(runtime_env: dict, where: str, constraints: dict[str, str]) -> list[str]:
    found = exclude_findings(runtime_env.get("excludes"), f"{where}: excludes")
    packages = runtime_env.get("pip") or []
    packages = packages.get("packages", []) if isinstance(packages, dict) else packages
    for requirement in packages:
        name, sep, version = str(requirement).partition("==")
        key = name.strip().lower().replace("_", "-")
        if not sep:
            found.append(f"{where}: pip {requirement!r} is not pinned (==, as in {CONSTRAINTS_FILE})")
        elif constraints and constraints.get(key) != version.strip():
            found.append(f"{where}: pip {requirement!r} differs from {CONSTRAINTS_FILE} ({constraints.get(key)})")
    return found


def dockerfile_findings(text: str, where: str) -> list[str]:
    found = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"] and len(words) > 1 and not DIGEST.search(words[1]):
            found.append(f"{where}: FROM {words[1]} is a tag, not a digest (cluster/pin_images.sh)")
        if words[:1] == ["RUN"] and "pip" in line and "install" in line:
            if "--upgrade" in words or "-U" in words:
                found.append(f"{where}: RUN pip install --upgrade takes whatever is newest")
            if "-c" not in words and "--constraint" not in words:
                found.append(f"{where}: RUN pip install without -c {CONSTRAINTS_FILE}")
    return found


def read_constraints(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as stream:
        for line in stream:
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins
