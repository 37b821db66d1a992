"""Named extension points, declared once each, in timm's ``@register_model`` style.

A quantization preset, an execution provider, a device script or a bundle writer is one entry of a
:class:`Registry`, declared in the file that owns its kind; every other part (the profile schema,
quantization, parity, the bundle) looks entries up by name. Adding one touches that file and its
test. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one kind by name, in the order they were registered.

    Args:
        kind: what an entry is, for messages (``quantization preset``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Adds ``entry`` under its ``name`` and returns it (so it can decorate).

        Raises:
            ValueError: the name is taken (a second declaration is a bug, not input).
        """
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Removes an entry (tests that register one of their own take it out again)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T | None:
        return self._entries.get(name)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """The registered names in registration order (those ``where`` holds for, if given)."""
        return tuple(n for n, e in self._entries.items() if where is None or where(e))


def one_of(names: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b' or 'c'``: the valid values of a field, as a schema error line lists them."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
