"""Named registries of pluggable objects: pruning methods, importance criteria, cost objectives.

A :class:`Registry` maps a name to an object (a class or a factory) with a one-line summary,
as timm's model registry does. Looking up an unknown name raises a one-line
:class:`~hwprune.errors.HwpruneError` that lists the choices, so every command that takes a
name (``--method``, ``--objective``, ``--criterion``) fails the same way.

>>> METHODS = Registry("pruning method")
>>> @METHODS.register("uniform", "the same fraction of channels in every group")
... class Uniform: ...
>>> METHODS.get("uniform") is Uniform
True
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from hwprune.errors import HwpruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by name, each with a one-line summary."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, tuple[T, str]] = {}

    def register(self, name: str, summary: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj, summary)
            return obj

        return deco

    def add(self, name: str, obj: T, summary: str) -> None:
        if name in self._items and self._items[name][0] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = (obj, summary)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise HwpruneError(f"unknown {self.kind} '{name}'", f"choose one of {', '.join(self.names())}")
        return self._items[name][0]

    def summary(self, name: str) -> str:
        self.get(name)
        return self._items[name][1]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def rows(self) -> list[tuple[str, str]]:
        """``(name, summary)`` of every entry, in registration order."""
        return [(n, s) for n, (_, s) in self._items.items()]
