"""The package versions whose private APIs selfsup calls, in one place (issue 31).

Where no public API does the job, one module owns each private use and calls `require` before it:

| package | private API | owner module |
|---|---|---|
| ray | Ray Train's `_TorchBackend`, `_set_torch_distributed_env_vars` | pipelines/train/torch_loopback.py |
| ray | Ray Train's `checkpoint_manager_snapshot.json` format | pipelines/train/run_folder.py |
| ray | `ray.autoscaler._private.util` (`prepare_config`, `validate_config`) | cluster/checks.py |
| timm | `VisionTransformer._pos_embed` | methods/backbone.py |

pyproject.toml bounds these packages to the same minor versions. Another version fails with one
line naming the package, the version found, the one expected and the use; with
`SELFSUP_UNTESTED_VERSIONS=warn` it is a warning instead, for trying a newer release on purpose.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

WRITTEN_FOR = {"ray": "2.60", "timm": "1.0"}  # major.minor; pyproject.toml's bounds say the same
UNTESTED_ENV = "SELFSUP_UNTESTED_VERSIONS"


class UntestedVersion(RuntimeError):
    """A package at a version whose private API selfsup was not written for (one line)."""


def minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def require(package: str, use: str, found: str | None = None) -> None:
    """Raise UntestedVersion (or warn, see the module doc) when `package` (its installed version,
    or `found`) is not at the minor version of WRITTEN_FOR; `use` says what depends on it."""
    found = found or importlib.metadata.version(package)
    if minor(found) == WRITTEN_FOR[package]:
        return
    message = (f"{package} {found}: selfsup {use} through a private API written for {package} "
               f"{WRITTEN_FOR[package]}.x; install {package}=={WRITTEN_FOR[package]}.*, or set "
               f"{UNTESTED_ENV}=warn to try it anyway")
    if os.environ.get(UNTESTED_ENV) == "warn":
        warnings.warn(message, stacklevel=2)
        return
    raise UntestedVersion(message)
