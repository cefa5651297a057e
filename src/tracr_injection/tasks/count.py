"""Count the x's (paper task 2): `What is the number of 'X' in this text? x y x\\nAnswer:` -> ` 2`.

In: nothing (importing the module registers).  Out: the task `count` in the task registry, taught
by the program `count_trigger`, with the splits below.

Train: x/y strings of length 5-40 with at least one y.  OOD: `x_only` (n x's, n = 1..40),
`replace_y` (z instead of y: the teacher reads z as filler, which is exactly its role),
`length` (lengths 41-120).  The answer is the count's digits, one token per digit.
"""

from __future__ import annotations

import random

from tracr_injection.programs.paper import END
from tracr_injection.tasks.base import Example, Segment, SplitSpec, Task, number_segments
from tracr_injection.tasks.registry import register_task

QUESTION = "What is the number of 'X' in this text?"


def count_example(words: list[str], **meta: object) -> Example:
    """Prompt and answer for a space-separated word string; only `x` is a program symbol besides y."""
    segments = [Segment(" " + w, symbol=w) if w in ("x", "y") else Segment(" " + w) for w in words]
    n = words.count("x")
    prompt = (Segment(QUESTION), *segments, Segment("\nAnswer:"))
    return Example(
        prompt, tuple(number_segments(str(n), answer=True)), {"length": len(words), "count": n, **meta}
    )


def xy_strings(lengths: tuple[int, int], other: str = "y"):
    """Sampler: x/`other` strings with length in `lengths` containing at least one `other`."""

    def sample(rng: random.Random) -> Example:
        length = rng.randint(*lengths)
        words = [rng.choice(["x", other]) for _ in range(length)]
        words[rng.randrange(length)] = other
        return count_example(words)

    return sample


def x_only() -> list[Example]:
    """n x's for n = 1..40."""
    return [count_example(["x"] * n) for n in range(1, 41)]


TRAIN_LENGTHS = (5, 40)

register_task(
    Task(
        name="count",
        program="count_trigger",
        teacher_max_len=144,
        description="number of x in an x/y string (paper task 2)",
        splits=[
            SplitSpec(
                "train",
                20_000,
                200,
                "x/y strings of length 5-40 with at least one y",
                xy_strings(TRAIN_LENGTHS),
                kind="train",
            ),
            SplitSpec(
                "test",
                1_000,
                201,
                "held-out strings from the training distribution",
                xy_strings(TRAIN_LENGTHS),
                kind="test",
            ),
            SplitSpec("x_only", 40, 202, "n x's and nothing else, n = 1..40", exhaustive=x_only),
            SplitSpec(
                "replace_y", 1_000, 203, "z instead of y (lengths 5-40)", xy_strings(TRAIN_LENGTHS, "z")
            ),
            SplitSpec("length", 1_000, 204, "x/y strings of length 41-120", xy_strings((41, 120))),
        ],
        end_output=END,
    )
)
