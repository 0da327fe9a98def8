"""The one way every config section is validated (run config, backbone, views, each method's
hyperparameters): a table of rules, each a condition and what the value must be, checked in
order, and the first that fails is one line naming the key, its value and what it allows, e.g.
`optim.epochs=0: must be an integer >= 1`. It lives in `methods/` because both sides use it and
methods import nothing from the pipeline."""

from __future__ import annotations

import math
import types
import typing


def check_rules(section: str, values, rules: dict[str, tuple[bool, str]]) -> None:
    """`rules`: field -> (holds, what it must be). Raises ValueError on the first that does not hold,
    e.g. `optim.epochs=0: must be an integer >= 1`."""
    for key, (holds, allowed) in rules.items():
        if not holds:
            raise ValueError(f"{section}.{key}={getattr(values, key)!r}: must be {allowed}")


def typed_values(section: str, cls: type, values: dict) -> dict:
    """`values` (some of dataclass `cls`'s fields) checked against the fields' types, before any
    rule table sees them, so a wrong type is one line naming the key instead of a TypeError
    inside a rule: a bool is not a number nor a number a bool (YAML reads `true` as both in lax
    parsers), a string is not a number, nan and infinity are not numbers a config means, a tuple
    field needs a list of its length. Returns the values with a list for a tuple field made a
    tuple."""
    hints = typing.get_type_hints(cls)
    return {key: _typed(f"{section}.{key}", hints[key], value) if key in hints else value
            for key, value in values.items()}


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping",
          list: "a list"}


def _typed(key: str, hint, value):
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return None
        allowed = [option for option in options if option is not type(None)]
        for option in allowed:
            try:
                return _typed(key, option, value)
            except ValueError:
                continue
        raise ValueError(f"{key}={value!r}: must be {' or '.join(_describe(o) for o in options)}")
    if typing.get_origin(hint) is tuple:
        parts = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(parts):
            raise ValueError(f"{key}={value!r}: must be a list of {len(parts)} numbers")
        return tuple(_typed(key, part, item) for part, item in zip(parts, value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}={value!r}: must be {_KINDS[float]}")
        return value  # an integer stays one, so that messages show the value as it was typed
    if hint in _KINDS and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key}={value!r}: must be {_KINDS[hint]}")
    return value


def _describe(hint) -> str:
    return "null" if hint is type(None) else _KINDS.get(hint, getattr(hint, "__name__", str(hint)))
