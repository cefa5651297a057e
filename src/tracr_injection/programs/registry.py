"""Registry of named RASP programs with their vocabulary and default length.

A `ProgramSpec` builds a fresh SOp (RASP labels carry a process-wide counter, so every
compile gets its own expression graph), knows its vocabulary, default `max_seq_len`, whether
it is compiled causally, and optionally samples extra validation inputs (uniform random
strings rarely hit e.g. balanced brackets).  `register` adds a program; `get_program`
and `program_names` look them up.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tracr.rasp import rasp

T = TypeVar("T")
InputSampler = Callable[[int, int, random.Random], list[list[Any]]]


class UnknownNameError(KeyError):
    """A program or task name that is not registered; its message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote it


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """A named RASP program ready to compile."""

    name: str
    build: Callable[[int], rasp.SOp]  # max_seq_len -> program
    vocab: frozenset[Any]
    max_seq_len: int
    causal: bool = False
    description: str = ""
    sample_inputs: InputSampler | None = None  # (max_seq_len, count, rng) -> inputs
    uniform_random_inputs: bool = True  # False: the program is only defined on sampled inputs

    def validation_inputs(self, max_seq_len: int, count: int = 64, seed: int = 0) -> list[list[Any]]:
        """Extra inputs for validation from this program's sampler (none without one)."""
        if self.sample_inputs is None:
            return []
        return self.sample_inputs(max_seq_len, count, random.Random(seed))

    def compile(self, max_seq_len: int | None = None, **kwargs: Any) -> Any:
        """Compile (or load from cache) this program's teacher; see `compile_program`."""
        length = self.max_seq_len if max_seq_len is None else max_seq_len
        if length < 1:
            raise ValueError(f"max_seq_len (--max-len) must be >= 1, got {length}.")
        from tracr_injection.compile.compiler import compile_program

        kwargs.setdefault(
            "validation_inputs",
            self.validation_inputs(length, count=256 if not self.uniform_random_inputs else 64),
        )
        if not self.uniform_random_inputs:
            kwargs.setdefault("num_random_inputs", 0)
        return compile_program(self.build(length), self.vocab, length, self.causal, name=self.name, **kwargs)


class Registry(Generic[T]):
    """Named items (programs, tasks) that register themselves; built-ins are imported on first lookup."""

    def __init__(self, kind: str, load_builtins: Callable[[], None]):
        self.kind, self._load_builtins, self._items = kind, load_builtins, {}

    def register(self, item: T) -> T:
        """Add `item` under its `.name` (a name can be registered once)."""
        if item.name in self._items:
            raise ValueError(f"A {self.kind} named {item.name!r} is already registered.")
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


def _load_builtin_programs() -> None:
    """Import the modules that register the built-in programs."""
    from tracr_injection.programs import paper_registry, reverse, tracr_library  # noqa: F401


_PROGRAMS: Registry[ProgramSpec] = Registry("program", _load_builtin_programs)
register = _PROGRAMS.register
get_program = _PROGRAMS.get
program_names = _PROGRAMS.names
