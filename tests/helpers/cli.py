"""Running `selfsup` from a test: the command line of a subprocess (`selfsup_command`), a config
dict as `--set` arguments (`set_args`), as a user would type them, a search's trial table
(`trial_rows`), and a refused command's own lines (`said_lines`)."""

from __future__ import annotations

import csv
import json
import sys


def set_args(sets: dict) -> list[str]:
    """`{"optim.epochs": 2, "views.view.scale": [0.2, 1]}` -> `["--set", "optim.epochs=2", ...]`."""
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def selfsup_command(*args: str, sets: dict | None = None) -> list[str]:
    """`python -m pipelines.cli ARGS --set ...`, this checkout's CLI in a process of its own."""
    return [sys.executable, "-m", "pipelines.cli", *args, *set_args(sets or {})]


LOADING = "loading PyTorch and Ray, then checking the inputs"


def said_lines(err: str) -> list[str]:
    """The non-empty lines of a command's stderr, less the progress line each command opens with
    (`[selfsup] CMD: loading PyTorch and Ray, ...`). That line is transient: erased on a terminal
    and, elsewhere, written only after a silence (pipelines/console.py), so whether a test sees it
    depends on what the test before it wrote and how busy the machine is."""
    return [line for line in err.splitlines() if line.strip() and not line.endswith(LOADING)]


def trial_rows(result: dict) -> list[dict]:
    """The rows of the `trials.csv` a `selfsup tune` result line names."""
    with open(result["trials.csv"]) as stream:
        return list(csv.DictReader(stream))
