"""Search spaces: `name=dist(args)` strings -> Ray Tune domains over run-config keys.

`name` is a short alias (`temperature`, `mask_ratio`, `teacher_temp`, `batch_size`, `lr`, ...) or
any config key (`hparams.proj_out`, `views.view.scale`). Distributions: `loguniform(lo, hi)`,
`uniform(lo, hi)`, `quniform(lo, hi, q)`, `randint(lo, hi)` (hi exclusive), `choice(a, b, ...)`
and `grid(a, b, ...)` (every value, once per sample).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from methods import get_method
from pipelines.config import parse_value

ALIASES = {
    "temperature": "hparams.temperature",
    "mask_ratio": "hparams.mask_ratio",
    "teacher_temp": "hparams.teacher_temp",
    "batch_size": "optim.batch_size",
    "lr": "optim.base_lr",
    "base_lr": "optim.base_lr",
    "weight_decay": "optim.weight_decay",
    "epochs": "optim.epochs",
}

_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(loguniform|uniform|quniform|randint|choice|grid)\s*\((.*)\)\s*$")
_ARITY = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2}


@dataclass(frozen=True)
class Dimension:
    """One searched config key: `key` (e.g. `hparams.temperature`), `name` as the user wrote it,
    the distribution and its arguments."""

    key: str
    name: str
    dist: str
    args: tuple

    @property
    def log_scale(self) -> bool:
        return self.dist == "loguniform"

    def extremes(self) -> list:
        """Values to validate the key with before Ray starts (both ends, or every choice)."""
        if self.dist in ("choice", "grid"):
            return list(self.args)
        if self.dist == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def domain(self):
        from ray import tune

        if self.dist == "grid":
            return tune.grid_search(list(self.args))
        if self.dist == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.dist)(*self.args)


def _split_args(body: str) -> list[str]:
    """`"0.1, [8, 16], 2"` -> `["0.1", "[8, 16]", "2"]`: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for char in body:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [part.strip() for part in parts]


def parse_dimension(spec: str) -> Dimension:
    """`"temperature=loguniform(0.05, 1)"` -> Dimension; ValueError naming the spec otherwise."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"--space {spec!r}: expected name=dist(args) with dist one of "
                         "loguniform, uniform, quniform, randint, choice, grid")
    name, dist, body = match.groups()
    try:
        args = [parse_value(part) for part in _split_args(body)]
    except yaml.YAMLError:
        raise ValueError(f"--space {spec!r}: arguments are not a list of values") from None
    if dist in _ARITY:
        if len(args) != _ARITY[dist] or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"--space {spec!r}: {dist} takes {_ARITY[dist]} numbers")
        if not args[0] < args[1]:
            raise ValueError(f"--space {spec!r}: the low end must be below the high end")
        if dist == "loguniform" and args[0] <= 0:
            raise ValueError(f"--space {spec!r}: loguniform needs a low end > 0")
    elif not args:
        raise ValueError(f"--space {spec!r}: {dist} needs at least one value")
    key = ALIASES.get(name, name)
    if "." not in key:
        raise ValueError(f"--space {spec!r}: unknown name {name!r} (aliases: {', '.join(sorted(ALIASES))}; "
                         "or a config key such as hparams.temperature)")
    return Dimension(key=key, name=name, dist=dist, args=tuple(args))


def parse_space(specs: list[str], method: str) -> list[Dimension]:
    """The user's dimensions, or the method's default space (`Method.search_space`) when there are none."""
    dimensions = [parse_dimension(spec) for spec in (specs or get_method(method).search_space)]
    keys = [d.key for d in dimensions]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"--space: {duplicated[0]} is searched twice")
    if not dimensions:
        raise ValueError(f"--space: nothing to search for {method}")
    return dimensions
