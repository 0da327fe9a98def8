"""Self-supervised methods, one file each; importing this package registers them."""

from methods import dino, mae, simclr  # noqa: F401  (fill the registry)
from methods.base import METHODS, Method, get_method  # noqa: F401
