"""Errors of the compile stage: each says what is wrong and how to fix it.

In: nothing.  Out: the errors `compile_program` raises for an unsupported program, a bad vocabulary,
a bad input sequence and a compiled model that disagrees with the RASP evaluator.

The root `TracrInjectionError` and `ArtifactError` (a damaged teacher folder too) live in
`tracr_injection.errors`, below every stage.
"""

from tracr_injection.errors import TracrInjectionError


class UnsupportedProgramError(TracrInjectionError, ValueError):
    """tracr cannot compile the RASP program (found statically, dynamically or while compiling)."""


class InvalidVocabError(TracrInjectionError, ValueError):
    """The vocabulary clashes with the compiler's reserved BOS/PAD names or is empty."""


class InvalidInputError(TracrInjectionError, ValueError):
    """An input sequence has a token outside the vocabulary or is longer than max_seq_len."""


class CompiledModelMismatchError(TracrInjectionError):
    """The compiled model disagrees with the RASP evaluator on some input."""
