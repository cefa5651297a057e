"""Integer sum (paper task 3): `{a} + {b} =` -> ` {a+b}`, every digit its own token.

In: nothing (importing the module registers).  Out: the task `sum` in the task registry, taught
by the program `sum_trigger`, with the splits below.

Train: every pair a, b in 0..449 except the held-out test pairs and the pairs whose sum is
a multiple of 100 (those belong to `cascading_overflow`, so no split overlaps the training
data).  OOD: `cascading_overflow` (a + b = 100, 200, ..., 900 with a, b up to 999: every
column carries), `decimals` (`x.xx + y.yy`: the decimal point is not a program symbol),
`length` (operands up to 4499, at least one of four digits: beyond the 3-digit program).
"""

from __future__ import annotations

import functools
import random

from tracr_injection.programs.paper import END
from tracr_injection.tasks.base import Example, Segment, SplitSpec, Task, number_segments
from tracr_injection.tasks.registry import register_task

TRAIN_MAX = 449
CASCADE_SUMS = frozenset(range(100, 1000, 100))
TEST_SIZE = 1_000
PLUS = Segment(" +", symbol="+")
EQUALS = Segment(" =")


@functools.cache
def operand_segments(text: str, lead: str, answer: bool = False) -> tuple[Segment, ...]:
    """Shared (memoised) segments of a number, so 200k examples reuse the same objects."""
    return tuple(number_segments(text, lead=lead, answer=answer))


def sum_example(a: int, b: int, **meta: object) -> Example:
    """Prompt `a + b =` and answer ` a+b`."""
    prompt = (*operand_segments(str(a), ""), PLUS, *operand_segments(str(b), " "), EQUALS)
    return Example(prompt, operand_segments(str(a + b), " ", True), {"a": a, "b": b, **meta})


def decimal_example(a: int, b: int) -> Example:
    """Prompt `a/100 + b/100 =` with two decimals, answer the sum with two decimals."""
    fmt = lambda v: f"{v // 100}.{v % 100:02d}"
    prompt = (*operand_segments(fmt(a), ""), PLUS, *operand_segments(fmt(b), " "), EQUALS)
    return Example(prompt, operand_segments(fmt(a + b), " ", True), {"a": a / 100, "b": b / 100})


@functools.lru_cache(maxsize=1)
def grid_pairs() -> tuple[tuple[int, int], ...]:
    """Every pair in 0..449 whose sum is not a cascading multiple of 100."""
    return tuple(
        (a, b) for a in range(TRAIN_MAX + 1) for b in range(TRAIN_MAX + 1) if a + b not in CASCADE_SUMS
    )


@functools.lru_cache(maxsize=1)
def held_out_pairs() -> frozenset[tuple[int, int]]:
    """The test pairs: a fixed random sample of the grid."""
    return frozenset(random.Random(301).sample(grid_pairs(), TEST_SIZE))


def train_examples() -> list[Example]:
    """All grid pairs but the held-out ones."""
    held_out = held_out_pairs()
    return [sum_example(a, b) for a, b in grid_pairs() if (a, b) not in held_out]


def test_examples() -> list[Example]:
    """The held-out grid pairs, in a fixed order."""
    return [sum_example(a, b) for a, b in sorted(held_out_pairs())]


def cascading(rng: random.Random) -> Example:
    """a + b = 100k for k = 1..9, a and b up to 999."""
    total = 100 * rng.randint(1, 9)
    a = rng.randint(0, total)
    return sum_example(a, total - a)


def decimals(rng: random.Random) -> Example:
    """x.xx + y.yy with both in 0.00..4.49."""
    return decimal_example(rng.randint(0, TRAIN_MAX), rng.randint(0, TRAIN_MAX))


def long_operands(rng: random.Random) -> Example:
    """Operands up to 4499, at least one with four digits."""
    a, b = rng.randint(1000, 4499), rng.randint(0, 4499)
    return sum_example(a, b) if rng.random() < 0.5 else sum_example(b, a)


TRAIN_SIZE = len(grid_pairs()) - TEST_SIZE

register_task(
    Task(
        name="sum",
        program="sum_trigger",
        teacher_max_len=20,
        description="a + b for a, b in 0..449 (paper task 3)",
        splits=[
            SplitSpec(
                "train",
                TRAIN_SIZE,
                300,
                "every pair in 0..449 except test and cascading sums",
                exhaustive=train_examples,
                kind="train",
            ),
            SplitSpec(
                "test", TEST_SIZE, 301, "held-out pairs of the grid", exhaustive=test_examples, kind="test"
            ),
            SplitSpec(
                "cascading_overflow", 1_000, 302, "a + b = 100, 200, ..., 900 (a, b <= 999)", cascading
            ),
            SplitSpec(
                "decimals",
                1_000,
                303,
                "x.xx + y.yy",
                decimals,
                teacher_blocker="the decimal point is not a symbol of the compiled program",
            ),
            SplitSpec(
                "length",
                1_000,
                304,
                "operands up to 4499, one with four digits",
                long_operands,
                teacher_blocker="4-digit operands are outside the compiled 3-digit program",
            ),
        ],
        end_output=END,
    )
)
