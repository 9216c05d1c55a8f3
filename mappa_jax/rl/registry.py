"""Name -> function registries, so a new KL estimator or loss is one function plus one decorator."""
from __future__ import annotations

from typing import Callable


class Registry:
    """A small mapping from names to functions; `key` names the config field that selects one."""

    def __init__(self, key: str):
        self.key = key
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is already registered")
            self._entries[name] = fn
            return fn
        return add

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"{self.key}={name!r} is not one of {sorted(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
