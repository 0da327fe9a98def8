"""Self-supervised methods, one file each; importing this package registers them."""

from methods import mae, simclr  # noqa: F401
from methods.base import METHODS, Method, get_method  # noqa: F401
