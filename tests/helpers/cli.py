"""Running `selfsup` from a test: the command line of a subprocess (`selfsup_command`), a config
dict as `--set` arguments (`set_args`), as a user would type them, and a search's trial table
(`trial_rows`)."""

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


def trial_rows(result: dict) -> list[dict]:
    """The rows of the `trials.csv` a `selfsup tune` result line names."""
    with open(result["trials.csv"]) as stream:
        return list(csv.DictReader(stream))
