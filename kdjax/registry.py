"""A name -> object registry, so configs name models and datasets instead of importing them."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from kdjax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; an unknown name is a :class:`ConfigError` with a suggestion."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str, *, field: str | None = None) -> T:
        if name not in self._entries:
            where = f"{field}: " if field else ""
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
