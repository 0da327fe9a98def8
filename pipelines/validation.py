"""One-line errors for config sections, and how `--set` / `--space` values are read."""

from __future__ import annotations

from typing import Any

import yaml


def check_rules(section: str, values, rules: dict[str, tuple[bool, str]]) -> None:
    """`rules`: field -> (holds, what it must be). Raises ValueError on the first that does not hold,
    e.g. `optim.epochs=0: must be an integer >= 1`."""
    for key, (holds, allowed) in rules.items():
        if not holds:
            raise ValueError(f"{section}.{key}={getattr(values, key)!r}: must be {allowed}")


def parse_value(text: str) -> Any:
    """A `--set` / `--space` value as YAML, except that `1e-9` is a number (YAML 1.1 wants `1.0e-9`)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
