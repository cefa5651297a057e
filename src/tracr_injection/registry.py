"""A registry of named items (programs, tasks) that register themselves and are looked up by name.

In: a kind ("program", "task") and a function that imports the modules registering the built-in items.
Out: a `Registry` whose `register` adds an item under its `.name` and whose `get`/`names` load the
built-ins on first use; an unknown name is an `UnknownNameError` (a KeyError) listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tracr_injection.errors import InvalidArgumentError

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A program or task name that is not registered; its message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote it


class Registry(Generic[T]):
    """Named items (programs, tasks) that register themselves; built-ins are imported on first lookup."""

    def __init__(self, kind: str, load_builtins: Callable[[], None]):
        self.kind, self._load_builtins, self._items = kind, load_builtins, {}

    def register(self, item: T) -> T:
        """Add `item` under its `.name` (a name can be registered once)."""
        if item.name in self._items:
            raise InvalidArgumentError(f"A {self.kind} named {item.name!r} is already registered.")
        self._items[item.name] = item
        return item

    def get(self, name: str) -> T:
        """The item called `name`, or an `UnknownNameError` (a KeyError) listing the known names."""
        self._load_builtins()
        if name not in self._items:
            raise UnknownNameError(f"Unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load_builtins()
        return sorted(self._items)
