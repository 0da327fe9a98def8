"""Self-supervised methods, one file each. The registry (`METHODS`, `Method`, `get_method`) imports
every module in this package the first time it is asked for, so a new method file registers itself
(`@register`) with no other file changed, and a light module (`methods.checks`, which the data
pipeline's decode workers import) loads without the models and timm."""

import importlib
import pkgutil

_REGISTRY = ("METHODS", "Method")


def _import_every_method() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def __getattr__(name: str):
    if name not in _REGISTRY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_every_method()
    base = importlib.import_module(f"{__name__}.base")
    globals().update({key: getattr(base, key) for key in _REGISTRY})  # asked for once
    return getattr(base, name)


def get_method(name: str):
    """The registered `Method` class called `name`."""
    methods = __getattr__("METHODS")
    if name not in methods:
        raise ValueError(f"method={name!r}: unknown (available: {', '.join(sorted(methods))})")
    return methods[name]
