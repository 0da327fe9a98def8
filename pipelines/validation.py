"""How config files, `--set` and `--space` values are read (YAML as people mean it in configs)."""

from __future__ import annotations

import re
from typing import Any

import yaml


class ConfigLoader(yaml.SafeLoader):
    """YAML as people mean it in configs: `1:3` is a string (YAML 1.1 reads it as the base-60
    number 63: `workers: 1:3` would ask for 63 workers)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(  # SafeLoader's integers without the base-60 form
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def load_yaml(stream) -> Any:
    """A YAML document (text or file) read with `ConfigLoader`."""
    return yaml.load(stream, Loader=ConfigLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """A `--set` / `--space` value as YAML, except that `1e-9` is a number (YAML 1.1 wants `1.0e-9`)."""
    value = load_yaml(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
