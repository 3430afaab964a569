"""A tiny generic name -> object registry, and the one rule for the name lists a user types (torch-free).

- ``split_names``: ``"a, b"`` or a repeated option (``["a,b", "c"]``) as ``["a", "b", "c"]``;
- ``parse_names``: such a list checked against the valid names: case-insensitive, ``all`` for
  every name, repeats dropped, an unknown name refused with suggestions (``--method``, ``--score``);
- ``parse_layers``: a list of layer names (case kept), ``auto`` or nothing for the command's own
  default (``--layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from featviz.errors import OptionError, UnknownNameError, did_you_mean

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


ALL = "all"
"""The name that stands for every valid name in ``parse_names``."""

AUTO = "auto"
"""The layer list that stands for the command's own default layers in ``parse_layers``."""


def split_names(spec: str | Iterable[str] | None) -> list[str]:
    """``"a, b"`` or ``["a,b", "c"]`` (a repeated option) -> ``["a", "b", "c"]``.

    Each item is split at commas and stripped; empty parts are dropped; order, case and repeats are kept.
    """
    if not spec:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def parse_names(
    spec: str | Iterable[str] | None,
    choices: Iterable[str],
    *,
    option: str,
    kind: str,
    aliases: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
    spelling: Callable[[str], str] | None = None,
) -> list[str]:
    """The valid names a user chose: ``"b,a"``, ``["b,a", "b"]`` or ``"all"`` -> names in the order given.

    Names are matched in lower case; ``all`` adds every choice (in ``choices``' order) not yet named;
    a repeated name counts once.

    Args:
        spec: What the user typed: a comma-separated string or a list of them (a repeated option).
        choices: The valid names, in the order ``all`` gives them.
        option: The option, for messages (``"--score"``).
        kind: What the names denote, for messages (``"CAM method"``).
        aliases: Other spellings (lower case) and the name each stands for.
        refused: Names that look valid but are not, each with the reason (said instead of suggestions).
        spelling: How a lower-case name is respelled before the aliases (``-`` as ``_``).

    Raises:
        UnknownNameError: a name that is not a choice (with suggestions, or the reason it is refused).
        OptionError: ``spec`` names nothing (empty, ``","``).
    """
    choices = list(choices)
    spec = spec if spec is None or isinstance(spec, str) else list(spec)
    expected = f"expected one of: {', '.join(choices)} or {ALL}, comma-separated"
    names: list[str] = []
    for raw in split_names(spec):
        name = spelling(raw.lower()) if spelling else raw.lower()
        name = (aliases or {}).get(name, name)
        if name == ALL:
            names += [n for n in choices if n not in names]
            continue
        if refused and name in refused:
            raise UnknownNameError(f"{option} {name!r} does not apply: {refused[name]}; {expected}")
        if name not in choices:
            raise UnknownNameError(f"{option}: unknown {kind} {name!r}{did_you_mean(name, choices)}; {expected}")
        if name not in names:
            names.append(name)
    if not names:
        raise OptionError(f"{option} {_shown(spec)} names no {kind}; {expected}")
    return names


def names_all(spec: str | Iterable[str] | None) -> bool:
    """Whether ``spec`` asks for ``all`` (the caller may then skip the names that do not apply, with a warning)."""
    return any(n.lower() == ALL for n in split_names(spec))


def parse_layers(spec: str | Iterable[str] | None, *, option: str = "--layers") -> list[str] | None:
    """A layer list as a user types it: ``"a,b"`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]`` (case kept).

    None, an empty list or ``auto`` alone -> None: the command's own default layers. Repeats are kept
    (the caller resolves names, e.g. ``layer4`` and ``layer4[-1]`` may be the same layer).

    Raises:
        OptionError: ``spec`` is given but names no layer (``","``).
    """
    if spec is not None and not isinstance(spec, str):
        spec = list(spec)
    if spec is None or spec == []:
        return None
    names = split_names(spec)
    if not names:
        raise OptionError(
            f"{option} {_shown(spec)} names no layer; expected '{AUTO}' or comma-separated layer "
            "names (`featviz layers` lists them)"
        )
    return None if names == [AUTO] else names


def _shown(spec: str | Iterable[str] | None) -> str:
    """``spec`` as the user typed it, for a message."""
    return repr(spec if spec is None or isinstance(spec, str) else ",".join(map(str, spec)))
