"""Registry of named RASP programs with their vocabulary and default length.

In: a program name.  Out: its `ProgramSpec` (`get_program`; the built-in programs register on first
lookup); `program_names` lists the names and `register` adds a spec.

A `ProgramSpec` builds a fresh SOp (RASP labels carry a process-wide counter, so every
compile gets its own expression graph), knows its vocabulary, default `max_seq_len`, whether
it is compiled causally, and optionally samples extra validation inputs (uniform random
strings rarely hit e.g. balanced brackets).  `register` adds a program; `get_program`
and `program_names` look them up.  `compile.compiler.compile_spec` compiles a spec.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from tracr.rasp import rasp

from tracr_injection.registry import Registry

InputSampler = Callable[[int, int, random.Random], list[list[Any]]]


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


def _load_builtin_programs() -> None:
    """Import the modules that register the built-in programs."""
    from tracr_injection.programs import paper_registry, reverse, tracr_library  # noqa: F401


_PROGRAMS: Registry[ProgramSpec] = Registry("program", _load_builtin_programs)
register = _PROGRAMS.register
get_program = _PROGRAMS.get
program_names = _PROGRAMS.names
