"""The one way every config section is validated (run config, backbone, views, each method's
hyperparameters): a table of rules, each a condition and what the value must be, checked in
order, and the first that fails is one line naming the key, its value and what it allows, e.g.
`optim.epochs=0: must be an integer >= 1`. It lives in `methods/` because both sides use it and
methods import nothing from the pipeline."""

from __future__ import annotations


def check_rules(section: str, values, rules: dict[str, tuple[bool, str]]) -> None:
    """`rules`: field -> (holds, what it must be). Raises ValueError on the first that does not hold,
    e.g. `optim.epochs=0: must be an integer >= 1`."""
    for key, (holds, allowed) in rules.items():
        if not holds:
            raise ValueError(f"{section}.{key}={getattr(values, key)!r}: must be {allowed}")
