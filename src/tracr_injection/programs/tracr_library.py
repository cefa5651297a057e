"""tracr's own library programs (`tracr.compiler.lib`), registered with vocab and length.

In: nothing (importing the module registers).  Out: `ProgramSpec`s for `length`, `reverse`, `hist`,
`sort`, `sort_unique`, `sort_freq`, `frac_prevs`, `pair_balance`, `shuffle_dyck1`, `shuffle_dyck3`,
`count` and `detect_pattern`, and `balanced_brackets` (a random shuffle-balanced bracket string).
"""

from __future__ import annotations

import random
from typing import Any

from tracr.compiler import lib
from tracr.rasp import rasp

from tracr_injection.programs.registry import ProgramSpec, register

LETTERS = frozenset({"a", "b", "c", "d"})
NUMBERS = frozenset({1, 2, 3, 4, 5})


def balanced_brackets(pairs: list[str], length: int, rng: random.Random) -> list[str]:
    """A random shuffle-balanced bracket string of even length <= `length`."""
    opens = length // 2
    out: list[str] = []
    open_stack: list[str] = []
    remaining = opens
    while remaining or open_stack:
        if remaining and (not open_stack or rng.random() < 0.5):
            pair = rng.choice(pairs)
            out.append(pair[0])
            open_stack.append(pair[1])
            remaining -= 1
        else:
            out.append(open_stack.pop(rng.randrange(len(open_stack))))
    return out


def bracket_sampler(pairs: list[str]) -> Any:
    """Sampler of balanced strings and balanced strings with one symbol dropped or swapped."""

    def sample(max_seq_len: int, count: int, rng: random.Random) -> list[list[str]]:
        symbols = [c for p in pairs for c in p]
        inputs = []
        for i in range(count):
            tokens = balanced_brackets(pairs, rng.randint(2, max_seq_len), rng)
            if i % 3 == 1 and tokens:
                tokens.pop(rng.randrange(len(tokens)))
            elif i % 3 == 2 and tokens:
                tokens[rng.randrange(len(tokens))] = rng.choice(symbols)
            inputs.append(tokens or [symbols[0]])
        return inputs

    return sample


def _spec(name: str, build: Any, vocab: frozenset[Any], max_seq_len: int = 10, **kw: Any) -> None:
    register(ProgramSpec(name=name, build=build, vocab=vocab, max_seq_len=max_seq_len, **kw))


_spec("length", lambda n: lib.make_length(), LETTERS, description="length of the input at every position")
_spec("reverse", lambda n: lib.make_reverse(rasp.tokens), LETTERS, description="the input reversed")
_spec("hist", lambda n: lib.make_hist(), LETTERS, description="how often each position's token occurs")
_spec(
    "sort",
    lambda n: lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1),
    NUMBERS,
    description="the input sorted (duplicates allowed)",
)
_spec(
    "sort_unique",
    lambda n: lib.make_sort_unique(rasp.tokens, rasp.tokens),
    NUMBERS,
    description="the input sorted (keys assumed unique)",
)
_spec(
    "sort_freq", lambda n: lib.make_sort_freq(n), LETTERS, description="tokens sorted by descending frequency"
)
_spec(
    "frac_prevs",
    lambda n: lib.make_frac_prevs(rasp.tokens == "a"),
    LETTERS,
    description="fraction of previous tokens equal to 'a'",
)
_spec(
    "pair_balance",
    lambda n: lib.make_pair_balance(rasp.tokens, "(", ")"),
    frozenset("()ab"),
    description="fraction of '(' minus fraction of ')' so far",
    sample_inputs=bracket_sampler(["()"]),
)
_spec(
    "shuffle_dyck1",
    lambda n: lib.make_shuffle_dyck(["()"]),
    frozenset("()"),
    description="1 if the brackets are balanced (RASP paper)",
    sample_inputs=bracket_sampler(["()"]),
)
_spec(
    "shuffle_dyck3",
    lambda n: lib.make_shuffle_dyck(["()", "[]", "{}"]),
    frozenset("()[]{}"),
    max_seq_len=40,
    description="1 if all three bracket types are shuffle-balanced (RASP paper)",
    sample_inputs=bracket_sampler(["()", "[]", "{}"]),
)
_spec("count", lambda n: lib.make_count(rasp.tokens, "a"), LETTERS, description="number of 'a' tokens")
_spec(
    "detect_pattern",
    lambda n: lib.detect_pattern(rasp.tokens, "abc"),
    LETTERS,
    description="True where the pattern 'abc' ends",
)
