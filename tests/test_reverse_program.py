"""Tests for the causal reverse program (``reverse_trigger``).

(a) RASP level: ``causal_eval.evaluate`` against the plain-Python reference.
(b) Compiled (real tracr via the registry, validated on compile): the teacher must
    decode to exactly the causal RASP evaluation and the reference at every position.
"""

from __future__ import annotations

import random

import pytest
from tracr.rasp import causal_eval

from tracr_injection.compile.compiler import compile_spec
from tracr_injection.programs import paper
from tracr_injection.programs import reverse as R
from tracr_injection.programs.registry import get_program, program_names

F, T, END = paper.FILLER, paper.TRIGGER, paper.END
N = 32
MAX_ITEMS = R.REVERSE_MAX_ITEMS


def run(program, tokens):
    return list(causal_eval.evaluate(program, list(tokens)))


def full_answer(items, fillers_before=0):
    return [F] * fillers_before + list(items) + [T] + list(items[::-1])


def any_symbols(rng, length):
    """Random items/fillers with at most one trigger (also before any item, or none)."""
    tokens = [rng.choice([*R.ITEMS, F, F]) for _ in range(length)]
    if tokens and rng.random() < 0.8:
        tokens[rng.randrange(len(tokens))] = T
    return tokens


def cases(rng):
    """Hand-made edge cases, task-shaped samples and random strings, many of length N."""
    out = [
        [T],
        [F],
        ["a", T],
        [F, "a", F, T, "a"],
        full_answer("h" * MAX_ITEMS),
        full_answer("abcdefgh", fillers_before=N - 2 * MAX_ITEMS - 1),
        [F] * (N - 3) + ["b", T, "b"],  # L = 1 at max length
        ["a"] * (N - 1) + [T],  # more than max_items items: still defined
        [F] * N,
    ]
    out += [R.reverse_input(rng, N, MAX_ITEMS) for _ in range(300)]
    out += [any_symbols(rng, N if i % 2 else rng.randint(1, N)) for i in range(100)]
    return out


def items_before_trigger(tokens):
    return sum(t in R.ITEMS for t in tokens[: tokens.index(T)]) if T in tokens else None


# ---------------------------------------------------------------------------
# (a) RASP level
# ---------------------------------------------------------------------------


def test_hand_checked_case():
    toks = [F, "a", "b", F, "c", T, "c", "b"]
    expected = [F, F, F, F, F, "c", "b", "a"]
    prog = R.make_reverse_trigger()
    assert run(prog, toks) == expected
    assert R.reverse_reference(toks) == expected
    assert run(prog, toks + ["a"])[-1] == END
    assert run(prog, toks + [F, "a"])[-2:] == [F, END]


@pytest.mark.parametrize("length", range(1, MAX_ITEMS + 1))
def test_full_answer_every_length(length):
    rng = random.Random(length)
    items = [rng.choice(R.ITEMS) for _ in range(length)]
    toks = full_answer(items)
    out = run(R.make_reverse_trigger(), toks)
    assert out[:length] == [F] * length
    assert out[length:] == items[::-1] + [END]
    assert out == R.reverse_reference(toks)


def test_rasp_matches_reference():
    prog = R.make_reverse_trigger()
    for toks in cases(random.Random(0)):
        assert run(prog, toks) == R.reverse_reference(toks), toks


def test_sampler_shapes():
    rng = random.Random(1)
    samples = [R.reverse_input(rng, N, MAX_ITEMS) for _ in range(500)]
    assert all(1 <= len(s) <= N and set(s) <= R.reverse_vocab() for s in samples)
    assert any(len(s) == N for s in samples)
    counts = {items_before_trigger(s) for s in samples} - {None}
    assert counts == set(range(1, MAX_ITEMS + 1))
    assert all(s.count(T) <= 1 for s in samples)


def test_bad_arguments():
    with pytest.raises(ValueError):
        R.make_reverse_trigger(0)


# ---------------------------------------------------------------------------
# (b) compiled teacher == RASP == reference
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    # Compiling validates against RASP on the registered sampler's 256 inputs (raises on a mismatch).
    return compile_spec(get_program("reverse_trigger"), N, cache_dir=tmp_path_factory.mktemp("cache"))


def test_registered():
    assert "reverse_trigger" in program_names()
    spec = get_program("reverse_trigger")
    assert spec.causal and spec.max_seq_len == N and spec.vocab == frozenset(R.reverse_vocab())


def test_compiled_matches_rasp_and_reference(teacher):
    config = teacher.config
    assert config.validation["mismatches"] == 0
    assert config.num_layers == 3
    assert config.d_model <= 256
    prog = R.make_reverse_trigger()
    inputs = cases(random.Random(2))
    assert any(len(x) == N for x in inputs)
    assert {1, MAX_ITEMS} <= {items_before_trigger(x) for x in inputs}
    for toks in inputs:
        expected = R.reverse_reference(toks)
        assert run(prog, toks) == expected, toks
        assert teacher.evaluate(toks) == expected, toks


def test_compiled_hand_checked_case(teacher):
    toks = [F, "a", "b", F, "c", T, "c", "b", "a"]
    assert teacher.evaluate(toks) == [F, F, F, F, F, "c", "b", "a", END]
