"""Registers the paper's three causal task programs with well-formed input samplers.

In: nothing (importing the module registers).  Out: `ProgramSpec`s in the program registry:
`dyck_trigger`, `dyck_frac_trigger`, `dyck_authors_trigger`, `count_trigger` and `sum_trigger`.

Uniform random symbol strings exercise any-input behaviour but rarely hit the cases that
matter (balanced brackets, a count followed by its own answer digits, a well-formed sum),
so each program gets a sampler of task-shaped inputs for validation: fillers interleaved,
the trigger, and the answer digits fed back as teacher forcing, sometimes cut short.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tracr_injection.programs import paper
from tracr_injection.programs.registry import ProgramSpec, register

F, T = paper.FILLER, paper.TRIGGER


def with_fillers(rng: random.Random, symbols: list[str], most: int = 2) -> list[str]:
    """`symbols` with 0..`most` fillers before, between and after them."""
    out = [F] * rng.randint(0, most)
    for symbol in symbols:
        out += [symbol] + [F] * rng.randint(0, most)
    return out


def dyck_string(rng: random.Random, pairs: tuple[str, ...], length: int, balanced: bool) -> list[str]:
    """A random bracket string; when `balanced`, closed so every pair type is shuffle-balanced."""
    if not balanced:
        return [rng.choice("".join(pairs)) for _ in range(length)]
    out, open_by_type = [], {p: 0 for p in pairs}
    for _ in range(length):
        closable = [p for p in pairs if open_by_type[p]]
        if closable and rng.random() < 0.5:
            pair = rng.choice(closable)
            out.append(pair[1])
            open_by_type[pair] -= 1
        else:
            pair = rng.choice(pairs)
            out.append(pair[0])
            open_by_type[pair] += 1
    for pair, n in open_by_type.items():
        out += [pair[1]] * n
    return out


def dyck_input(rng: random.Random, max_len: int, pairs: tuple[str, ...] = paper.DYCK_PAIRS) -> list[str]:
    """Fillers, a balanced or random bracket string, then the trigger; at most `max_len` long."""
    while True:
        body = dyck_string(rng, pairs, rng.randint(0, max(1, max_len // 2)), rng.random() < 0.5)
        tokens = with_fillers(rng, body, 1) + [T]
        if len(tokens) <= max_len:
            return tokens


def dyck_prompt_input(
    rng: random.Random, max_len: int, pairs: tuple[str, ...] = paper.DYCK_PAIRS
) -> list[str]:
    """Shaped like a bridged task prompt, at most `max_len` long: fillers, a random, balanced or
    almost-balanced (balanced, last symbol dropped) bracket string of any length that fits, fillers,
    the trigger."""
    while True:
        head, tail = [F] * rng.randint(0, 10), [F] * rng.randint(0, 3)
        room = max_len - len(head) - len(tail) - 1
        kind = rng.choice(["random", "balanced", "almost_balanced"])
        body = dyck_string(rng, pairs, rng.randint(0, max(0, room)), kind != "random")
        body = body[:-1] if kind == "almost_balanced" else body
        if len(body) <= room:
            return head + body + tail + [T]


def count_input(rng: random.Random, max_len: int, max_count: int) -> list[str]:
    """x/y/filler string, trigger, the answer digits (sometimes cut short)."""
    while True:
        body = [rng.choice(["x", "y", F, F]) for _ in range(rng.randint(0, max_len))]
        tokens = body + [T] + list(str(min(body.count("x"), max_count)))
        if len(tokens) <= max_len:
            return tokens[: rng.randint(1, len(tokens))] if rng.random() < 0.3 else tokens


def sum_input(rng: random.Random, max_len: int, max_digits: int) -> list[str]:
    """`a + b` with fillers, trigger, the digits of a+b (sometimes cut short)."""
    while True:
        a = rng.randrange(10 ** rng.randint(1, max_digits))
        b = rng.randrange(10 ** rng.randint(1, max_digits))
        tokens = with_fillers(rng, list(str(a)), 1) + ["+"] + with_fillers(rng, list(str(b)), 1)
        tokens += [T] + list(str(a + b))
        if len(tokens) <= max_len:
            return tokens[: rng.randint(1, len(tokens))] if rng.random() < 0.3 else tokens


SUM_DIGITS = 3

def dyck_spec(
    name: str,
    build: Callable[[int], Any],
    description: str,
    max_seq_len: int = 40,
    sampler: Callable[[random.Random, int], list[str]] = dyck_input,
) -> ProgramSpec:
    """A Shuffle-Dyck recogniser over ()[]{} (`build(max_seq_len)`), validated on task-shaped inputs too."""
    return ProgramSpec(
        name=name,
        build=build,
        vocab=frozenset(paper.dyck_vocab()),
        max_seq_len=max_seq_len,
        causal=True,
        description=description,
        sample_inputs=lambda n, count, rng: [sampler(rng, n) for _ in range(count)],
    )


register(
    dyck_spec(
        "dyck_trigger",
        lambda n: paper.make_dyck_trigger(),
        "Shuffle-Dyck over ()[]{}: yes/no at the trigger (paper task 1)",
    )
)
register(
    dyck_spec(
        "dyck_frac_trigger",
        lambda n: paper.make_dyck_frac_trigger(),
        "Shuffle-Dyck over ()[]{} with a numerical counter (share of openers): yes/no at the trigger",
    )
)
register(
    dyck_spec(
        "dyck_authors_trigger",
        lambda n: paper.make_dyck_authors_trigger(max_seq_len=n),
        "Shuffle-Dyck over ()[]{} as the authors built it (per-type differences): yes/no at the trigger",
        max_seq_len=112,
        sampler=lambda rng, n: dyck_input(rng, n) if rng.random() < 0.5 else dyck_prompt_input(rng, n),
    )
)
register(
    ProgramSpec(
        name="count_trigger",
        build=lambda n: paper.make_count_trigger(max_count=n),
        vocab=frozenset(paper.count_vocab()),
        max_seq_len=120,
        causal=True,
        description="number of 'x' before the trigger, digit by digit (paper task 2)",
        sample_inputs=lambda n, count, rng: [count_input(rng, n, n) for _ in range(count)],
    )
)
register(
    ProgramSpec(
        name="sum_trigger",
        build=lambda n: paper.make_sum_trigger(SUM_DIGITS),
        vocab=frozenset(paper.sum_vocab()),
        max_seq_len=16,
        causal=True,
        description="a + b (3-digit operands), digits of the sum after the trigger (paper task 3)",
        sample_inputs=lambda n, count, rng: [sum_input(rng, n, SUM_DIGITS) for _ in range(count)],
        uniform_random_inputs=False,
    )
)
