"""Reverse a short list of letters (an extra task beyond the paper, and the how-to example).

In: nothing (importing the module registers).  Out: the task `reverse` in the task registry, taught
by the program `reverse_trigger`, with the splits below.

`Reverse the letters: a c b\\nAnswer:` -> ` b c a`.  Train: 1-6 letters from a-h.  OOD:
`length` (7-8 letters, still inside the compiled program's 8-item domain).  This file is all
it takes to add a task: samplers that build `Example`s, and one `register_task` call naming
a registered (causal) program.
"""

from __future__ import annotations

import random

from tracr_injection.programs.paper import END
from tracr_injection.programs.reverse import ITEMS
from tracr_injection.tasks.base import Example, Segment, SplitSpec, Task, symbol_segments
from tracr_injection.tasks.registry import register_task

QUESTION = "Reverse the letters:"


def reverse_example(letters: list[str]) -> Example:
    """Prompt with the letters space-separated, answer with them reversed."""
    answer = [Segment(s.text, symbol=s.symbol, output=s.symbol) for s in symbol_segments(letters[::-1])]
    prompt = (Segment(QUESTION), *symbol_segments(letters), Segment("\nAnswer:"))
    return Example(prompt, tuple(answer), {"length": len(letters)})


def letters(lengths: tuple[int, int]):
    """Sampler: a random list of letters with its length in `lengths`."""

    def sample(rng: random.Random) -> Example:
        return reverse_example([rng.choice(ITEMS) for _ in range(rng.randint(*lengths))])

    return sample


register_task(
    Task(
        name="reverse",
        program="reverse_trigger",
        teacher_max_len=32,
        description="reverse 1-6 letters (extra task)",
        splits=[
            SplitSpec("train", 5_000, 400, "1-6 letters from a-h", letters((1, 6)), kind="train"),
            SplitSpec(
                "test",
                500,
                401,
                "held-out lists from the training distribution",
                letters((1, 6)),
                kind="test",
            ),
            SplitSpec("length", 500, 402, "7-8 letters", letters((7, 8))),
        ],
        end_output=END,
    )
)
