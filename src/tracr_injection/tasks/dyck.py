"""Shuffle-Dyck over ()[]{} (paper task 1): are the brackets correctly matched? -> yes / no.

In: nothing (importing the module registers).  Out: the tasks `dyck` (program `dyck_trigger`) and
`dyck_frac` (program `dyck_frac_trigger`) in the task registry, with the splits below.

Prompt `Are parenthesis here correctly matched? {s}\\nAnswer:`, answer ` yes` / ` no`.  Train:
lengths 5-30, half uniform random strings, half random shuffle-balanced strings.  OOD:
`almost_balanced` (a balanced string of length 16-90 with its last symbol dropped: always
no), `new_token` (a fourth pair `<>` appears: outside the program's vocabulary), `length`
(lengths 31-90), `balanced_long` (balanced strings of length 32-90: always yes, the companion of
`almost_balanced`, so a model that says no to every long string is not counted as generalising) and
`length_5_90` (the authors' `length` split: lengths 5-90, half random, half balanced, as
`create_dyck_data(max_length * 3, ...)` in their `data/dyck_3.py`).
`dyck_frac` is the same task (same prompts and splits) taught by the teacher
whose counter is numerical (`programs.paper.make_dyck_frac_trigger`).  `dyck` can also be taught by
`dyck_authors_trigger` (`TrainConfig.teacher`, `tracr-inject train --teacher`), the authors' teacher
built on per-type differences (`programs.paper.make_dyck_authors_trigger`); it has the same symbols,
so the same splits are within its reach.
"""

from __future__ import annotations

import random

from tracr_injection.programs.paper import DYCK_PAIRS, dyck_reference
from tracr_injection.programs.tracr_library import balanced_brackets
from tracr_injection.tasks.base import Example, Segment, SplitSpec, Task, symbol_segments
from tracr_injection.tasks.registry import register_task

QUESTION = "Are parenthesis here correctly matched?"
NEW_PAIRS = (*DYCK_PAIRS, "<>")


def dyck_example(brackets: list[str], pairs: tuple[str, ...] = NEW_PAIRS, **meta: object) -> Example:
    """The prompt and answer for one bracket string (no spaces between brackets)."""
    verdict = dyck_reference(brackets, pairs)
    prompt = (Segment(QUESTION), *symbol_segments(brackets, sep=""), Segment("\nAnswer:"))
    return Example(prompt, (Segment(" " + verdict, output=verdict),), {"length": len(brackets), **meta})


def random_or_balanced(lengths: tuple[int, int], pairs: tuple[str, ...] = DYCK_PAIRS):
    """Sampler: half uniform random strings, half shuffle-balanced strings, length in `lengths`."""
    symbols = [c for p in pairs for c in p]

    def sample(rng: random.Random) -> Example:
        length = rng.randint(*lengths)
        if rng.random() < 0.5:
            return dyck_example([rng.choice(symbols) for _ in range(length)], source="random")
        even = length + length % 2 if length < lengths[1] else length - length % 2
        return dyck_example(balanced_brackets(list(pairs), even, rng), source="balanced")

    return sample


def almost_balanced(rng: random.Random) -> Example:
    """A balanced string of even length 16-90 with its last symbol dropped (answer: no)."""
    brackets = balanced_brackets(list(DYCK_PAIRS), 2 * rng.randint(8, 45), rng)
    return dyck_example(brackets[:-1], source="almost_balanced")


def balanced_long(rng: random.Random) -> Example:
    """A shuffle-balanced string of even length 32-90 (answer: yes): `almost_balanced` before its last
    symbol is dropped, with the lengths of `length`."""
    brackets = balanced_brackets(list(DYCK_PAIRS), 2 * rng.randint(16, 45), rng)
    return dyck_example(brackets, source="balanced_long")


def with_new_token(rng: random.Random) -> Example:
    """A string over four pairs ()[]{}<> of length 5-30 that uses `<` or `>`."""
    sample = random_or_balanced((5, 30), NEW_PAIRS)
    while True:
        example = sample(rng)
        if "<" in example.prompt_text or ">" in example.prompt_text:
            return example


TRAIN_LENGTHS = (5, 30)
AUTHORS_LENGTHS = (5, 90)  # their `length` split: `random.randint(5, max_length * 3)`, max_length 30

def dyck_task(name: str, program: str, description: str, teachers: tuple[str, ...] = ()) -> Task:
    """The Shuffle-Dyck task (prompts, splits, seeds) taught with the teacher compiled from `program`
    (or one of `teachers`)."""
    return Task(
        name=name,
        program=program,
        teachers=teachers,
        teacher_max_len=112,
        description=description,
        splits=[
            SplitSpec(
                "train",
                20_000,
                100,
                "lengths 5-30, half random, half balanced",
                random_or_balanced(TRAIN_LENGTHS),
                kind="train",
            ),
            SplitSpec(
                "test",
                1_000,
                101,
                "held-out strings from the training distribution",
                random_or_balanced(TRAIN_LENGTHS),
                kind="test",
            ),
            SplitSpec(
                "almost_balanced",
                1_000,
                102,
                "balanced strings of length 16-90 with the last symbol dropped (always no)",
                almost_balanced,
            ),
            SplitSpec(
                "new_token",
                1_000,
                103,
                "a fourth bracket pair <> appears (lengths 5-30)",
                with_new_token,
                teacher_blocker="'<' and '>' are not symbols of the compiled program",
            ),
            SplitSpec(
                "length",
                1_000,
                104,
                "lengths 31-90, half random, half balanced",
                random_or_balanced((31, 90)),
            ),
            SplitSpec(
                "balanced_long",
                1_000,
                105,
                "balanced strings of length 32-90 (always yes): almost_balanced's companion",
                balanced_long,
                disjoint_from=("length",),
            ),
            SplitSpec(
                "length_5_90",
                1_000,
                106,
                "the authors' length split: lengths 5-90, half random, half balanced",
                random_or_balanced(AUTHORS_LENGTHS),
                disjoint_from=("test", "almost_balanced", "length", "balanced_long"),
            ),
        ],
        end_output=None,
    )


register_task(
    dyck_task(
        "dyck",
        "dyck_trigger",
        "Shuffle-Dyck over ()[]{}: yes/no (paper task 1)",
        teachers=("dyck_authors_trigger",),
    )
)
register_task(
    dyck_task(
        "dyck_frac",
        "dyck_frac_trigger",
        "Shuffle-Dyck over ()[]{}: yes/no, taught by the teacher with a numerical counter (share of openers)",
    )
)
