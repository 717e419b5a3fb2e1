"""Lazy public surfaces: a package names what it exports, and each name loads on first use.

Importing a package stays light (the device-side runner needs ``hwprune.profiling`` with only
onnxruntime and numpy); the module that defines a name is imported when the name is first read.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """``__getattr__`` and ``__all__`` for ``package``, whose ``exports`` map a name to its module."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
