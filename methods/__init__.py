"""Self-supervised methods, one file each. Importing this package imports every module in it,
so a new method file registers itself (`@register`) with no other file changed."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from methods.base import METHODS, Method  # noqa: E402,F401


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: unknown (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]
