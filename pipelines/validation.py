"""One-line errors for config sections."""

from __future__ import annotations


def check_rules(section: str, values, rules: dict[str, tuple[bool, str]]) -> None:
    """`rules`: field -> (holds, what it must be). Raises ValueError on the first that does not hold,
    e.g. `optim.epochs=0: must be an integer >= 1`."""
    for key, (holds, allowed) in rules.items():
        if not holds:
            raise ValueError(f"{section}.{key}={getattr(values, key)!r}: must be {allowed}")
