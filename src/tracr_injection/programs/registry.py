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
from typing import Any

from tracr.rasp import rasp

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

    def compile(self, max_seq_len: int | None = None, **kwargs: Any) -> Any:
        """Compile (or load from cache) this program's teacher; see `compile_program`."""
        from tracr_injection.compile.compiler import compile_program

        length = max_seq_len or self.max_seq_len
        kwargs.setdefault(
            "validation_inputs",
            self.validation_inputs(length, count=256 if not self.uniform_random_inputs else 64),
        )
        if not self.uniform_random_inputs:
            kwargs.setdefault("num_random_inputs", 0)
        return compile_program(self.build(length), self.vocab, length, self.causal, name=self.name, **kwargs)


_REGISTRY: dict[str, ProgramSpec] = {}


def register(spec: ProgramSpec) -> ProgramSpec:
    """Add `spec` to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"A program named {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def get_program(name: str) -> ProgramSpec:
    """The registered program `name`, or a KeyError listing the known names."""
    _load_builtin_programs()
    if name not in _REGISTRY:
        raise KeyError(f"Unknown program {name!r}; registered: {', '.join(program_names())}")
    return _REGISTRY[name]


def program_names() -> list[str]:
    """Names of every registered program."""
    _load_builtin_programs()
    return sorted(_REGISTRY)


def _load_builtin_programs() -> None:
    """Import the modules that register the built-in programs."""
    from tracr_injection.programs import paper_registry, reverse, tracr_library  # noqa: F401
