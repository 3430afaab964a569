"""A tiny generic name -> object registry (torch-free)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from featviz.errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to objects; registration sits next to each definition.

    Args:
        kind: What the names denote, used in error messages ("SSL method", "checkpoint format").
    """

    def __init__(self, kind: str):
        """An empty registry of ``kind`` (e.g. "checkpoint format")."""
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; duplicates raise ``ValueError``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object for ``name`` or raise ``UnknownNameError`` listing valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                f"expected one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs in registration order."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        """The names, in registration order."""
        return iter(self._items)

    def __len__(self) -> int:
        """How many names are registered."""
        return len(self._items)
