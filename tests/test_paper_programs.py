"""Tests for the trigger-style paper programs (Shuffle-Dyck, Count, Sum).

(a) RASP level: ``causal_eval.evaluate`` against independent Python references
    on hand-written and random inputs (fillers interleaved).
(b) Compiled: tracr (``causal=True``) at small ``max_seq_len`` must decode to
    exactly the causal RASP evaluation at every position.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pytest
from tracr.compiler import compiling
from tracr.rasp import causal_eval, rasp

from tracr_injection import compile_program
from tracr_injection.compile.compiler import compile_spec
from tracr_injection.compile.fingerprint import walk as rasp_walk
from tracr_injection.programs import paper as P
from tracr_injection.programs.paper_registry import (
    count_input,
    dyck_input,
    dyck_prompt_input,
    sum_input,
)
from tracr_injection.programs.registry import get_program

try:  # identical weights, much faster compilation
    from tracr_injection.compile.fast_craft import fast_craft
except ImportError:  # pragma: no cover
    fast_craft = contextlib.nullcontext

BOS = "BOS"
F, T = P.FILLER, P.TRIGGER


def run(program, tokens):
    return causal_eval.evaluate(program, list(tokens))


# ---------------------------------------------------------------------------
# Input generators
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# (a) RASP-level checks against Python references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [P.make_dyck_trigger, P.make_dyck_frac_trigger])
@pytest.mark.parametrize("pairs", [("()",), ("()", "[]"), P.DYCK_PAIRS])
def test_dyck_rasp_matches_reference(pairs, make):
    prog = make(pairs)
    hand = ["(", ")", T], [")", "(", T], ["(", "(", ")", T], [T], [F, F, T]
    rng = random.Random(0)
    cases = [list(h) for h in hand if all(c in P.dyck_vocab(pairs) for c in h)]
    cases += [dyck_input(rng, 30, pairs) for _ in range(400)]
    for toks in cases:
        out = run(prog, toks)
        assert out[-1] == P.dyck_reference(toks[:-1], pairs), toks
        # the running verdict elsewhere: "yes" iff no prefix went negative
        for i in range(len(toks) - 1):
            negative = any(
                sum((u == pr[0]) - (u == pr[1]) for u in toks[: j + 1]) < 0
                for j in range(i + 1)
                for pr in pairs
            )
            assert out[i] == ("no" if negative else "yes"), (toks, i)


@pytest.mark.parametrize("make", [P.make_dyck_trigger, P.make_dyck_frac_trigger])
def test_dyck_hand_written(make):
    prog = make()
    assert run(prog, list("([)]") + [T])[-1] == "yes"  # shuffle-Dyck allows crossing
    assert run(prog, list(")(") + [T])[-1] == "no"
    assert run(prog, list("((") + [T])[-1] == "no"
    assert run(prog, [F, "{", F, "[", "]", F, "}", F, T])[-1] == "yes"
    assert run(prog, [T]) == ["yes"]
    masked = make(mask_non_trigger=True)
    assert run(masked, ["(", F, ")", T]) == [F, F, F, "yes"]
    assert run(masked, [")", "(", T]) == [F, F, "no"]


def authors_shuffle_dyck(pairs):
    """The authors' `shuffle_dyck` (language-model-repair, compile_model/compile_dyck.py), transcribed
    as they wrote it (subtraction via the `-` operator, OR chains over counts and differences)."""
    all_diffs, all_negs = [], []
    for left, right in pairs:
        starts = rasp.Select(rasp.tokens, rasp.tokens, lambda x, y, left=left: x == left)
        ends = rasp.Select(rasp.tokens, rasp.tokens, lambda x, y, right=right: x == right)
        start_counts, end_counts = rasp.SelectorWidth(starts), rasp.SelectorWidth(ends)
        diffs = (start_counts - end_counts).named(f"{left + right}_diffs")
        all_diffs.append(diffs)
        negs = rasp.SelectorWidth(rasp.Select(diffs, rasp.tokens, lambda x, y: x < 0))
        all_negs.append(negs.named(f"{left + right}_negative_counters"))
    current_negs = all_negs[0]
    for negs in all_negs[1:]:
        current_negs = rasp.SequenceMap(lambda x, y: 1 if (x != 0 or y != 0) else 0, current_negs, negs)
    current_diffs = all_diffs[0]
    for diffs in all_diffs[1:]:
        current_diffs = rasp.SequenceMap(lambda x, y: 1 if (x != 0 or y != 0) else 0, current_diffs, diffs)
    result = rasp.SequenceMap(lambda x, y: x == 0 and y == 0, current_negs, current_diffs)
    return rasp.SequenceMap(lambda x, y: x if y == "compute" else False, result, rasp.tokens)


def named(program, name):
    """The SOp called `name` in `program`'s graph."""
    return next(e for e in rasp_walk(program) if e.name == name)


@pytest.mark.parametrize("pairs", [("()",), ("()", "[]"), P.DYCK_PAIRS])
def test_dyck_authors_matches_the_authors_program_and_the_reference(pairs):
    """Verdict at every position equals the authors' (True -> "yes"); per-type differences and
    negative counts equal theirs; at the trigger the verdict is the reference's."""
    prog, theirs = P.make_dyck_authors_trigger(pairs, max_seq_len=40), authors_shuffle_dyck(pairs)
    rng = random.Random(7)
    cases = [dyck_input(rng, 30, pairs) for _ in range(150)]
    cases += [dyck_prompt_input(rng, 40, pairs) for _ in range(150)]
    for toks in cases:
        out = run(prog, toks)
        assert out == ["yes" if v else "no" for v in run(theirs, toks)], toks
        assert out[-1] == P.dyck_reference(toks[:-1], pairs), toks
        for pair in pairs:
            stem = f"dyck_{P.PAIR_NAMES[pair]}"
            assert run(named(prog, f"{stem}_diff"), toks) == run(named(theirs, f"{pair}_diffs"), toks)
            negatives = run(named(prog, f"{stem}_negatives"), toks)
            assert negatives == run(named(theirs, f"{pair}_negative_counters"), toks)


def test_dyck_authors_hand_written():
    prog = P.make_dyck_authors_trigger(max_seq_len=12)
    assert run(prog, list("([)]") + [T]) == ["no"] * 4 + ["yes"]  # shuffle-Dyck allows crossing
    assert run(prog, [F, "{", F, "[", "]", F, "}", F, T])[-1] == "yes"
    assert run(prog, list(")(") + [T])[-1] == "no"  # balanced counts, but ")" came first
    assert run(prog, list("([{}]") + [T])[-1] == "no"  # almost balanced: last symbol dropped
    assert run(prog, [T]) == ["yes"]
    tokens = ["(", ")", ")", "(", "[", F, T]
    assert run(named(prog, "dyck_round_diff"), tokens) == [1, 0, -1, 0, 0, 0, 0]
    assert run(named(prog, "dyck_round_negatives"), tokens) == [0, 0, 1, 1, 1, 1, 1]
    assert run(named(prog, "dyck_square_diff"), tokens) == [0, 0, 0, 0, 1, 1, 1]
    assert run(named(prog, "dyck_any_negative"), tokens) == [False, False, True, True, True, True, True]
    assert run(named(prog, "dyck_any_nonzero"), tokens) == [True, False, True, False, True, True, True]
    assert run(prog, tokens)[-1] == "no"


@pytest.mark.parametrize("max_count", [9, 99])
def test_count_rasp_matches_reference(max_count):
    prog = P.make_count_trigger(max_count)
    compact = P.make_count_trigger(max_count, compact=True)
    rng = random.Random(1)
    cases = [[T], ["x", T, "1"], ["x", "x", F, "y", T, "2"], ["y", F, T, "0"]]
    cases += [count_input(rng, 40, max_count) for _ in range(400)]
    for toks in cases:
        ref = P.count_reference(toks, max_count)
        assert run(prog, toks) == ref, toks
        assert run(compact, toks) == ref, toks
    # full answer emission, end marker
    toks = ["x"] * 12 + [F, "y", T, "1", "2"]
    expected = [F, "1", "2", P.END] if max_count >= 12 else [F, "9", P.END, P.END]
    assert run(prog, toks)[-4:] == expected


@pytest.mark.parametrize("max_digits", [1, 2, 3])
def test_sum_rasp_matches_reference(max_digits):
    prog = P.make_sum_trigger(max_digits)
    rng = random.Random(2)
    top = 10**max_digits - 1
    hand = [(0, 0), (top, top), (top, 1), (1, top), (5, 5), (top // 2, top - top // 2)]
    for a, b in hand:
        toks = [F, F] + list(str(a)) + [F, "+", F] + list(str(b)) + [F, T] + list(str(a + b))
        out = run(prog, toks)
        assert out == P.sum_reference(toks), toks
        emitted = out[toks.index(T) :]
        assert "".join(emitted[:-1]) == str(a + b) and emitted[-1] == P.END
    for _ in range(500):
        toks = sum_input(rng, 40, max_digits)
        assert run(prog, toks) == P.sum_reference(toks), toks


# ---------------------------------------------------------------------------
# (b) compiled model == causal RASP evaluation at every position
# ---------------------------------------------------------------------------


def compile_causal(program, vocab, max_seq_len):
    with fast_craft():
        return compiling.compile_rasp_to_model(
            program, vocab, max_seq_len, causal=True, compiler_bos=BOS, mlp_exactness=10_000
        )


def decode_batch(model, batch):
    """Runs ``model`` on many inputs at once; pads at the end (causal, harmless)."""
    width = max(len(x) for x in batch) + 1
    pad = model.input_encoder.pad_token
    ids = np.array([model.input_encoder.encode([BOS] + x + [pad] * (width - 1 - len(x))) for x in batch])
    out = model.forward(model.params, ids)
    decoded = np.asarray(out.unembedded_output)
    return [model.output_encoder.decode(list(row))[1 : 1 + len(x)] for row, x in zip(decoded, batch)]


def check_compiled(program, vocab, max_seq_len, inputs):
    model = compile_causal(program, vocab, max_seq_len)
    inputs = list(inputs)
    assert any(len(x) == max_seq_len for x in inputs)
    got = decode_batch(model, inputs)
    for toks, out in zip(inputs, got):
        assert out == run(program, toks), toks
    return model


def random_symbols(rng, vocab, max_seq_len, count):
    vocab = sorted(vocab)
    out = [[rng.choice(vocab) for _ in range(max_seq_len)] for _ in range(count // 4)]
    out += [[rng.choice(vocab) for _ in range(rng.randint(1, max_seq_len))] for _ in range(count - len(out))]
    return out


@pytest.mark.parametrize("mask", [False, True])
def test_dyck_compiled(mask):
    n = 10
    prog = P.make_dyck_trigger(mask_non_trigger=mask)
    rng = random.Random(3)
    inputs = random_symbols(rng, P.dyck_vocab(), n, 200)  # any symbol sequence
    inputs += [dyck_input(rng, n) for _ in range(100)]
    model = check_compiled(prog, P.dyck_vocab(), n, inputs)
    assert model.model_config.num_layers == (4 if mask else 3)


def test_dyck_authors_compiled():
    n = 12
    prog = P.make_dyck_authors_trigger(max_seq_len=n)
    rng = random.Random(8)
    inputs = random_symbols(rng, P.dyck_vocab(), n, 100)
    inputs += [dyck_input(rng, n) for _ in range(50)] + [dyck_prompt_input(rng, n) for _ in range(50)]
    model = check_compiled(prog, P.dyck_vocab(), n, inputs)
    assert model.model_config.num_layers == 11


def test_dyck_frac_counter_is_the_share_of_openers():
    """Hand-computed: at a closer, openers / brackets of its type so far; at the trigger, of all types."""
    frac = next(e for e in rasp_walk(P.make_dyck_frac_trigger()) if e.name == "dyck_open_frac")
    tokens = ["(", "(", F, ")", "[", "]", ")", ")", T]
    assert run(frac, tokens) == [0, 0, 0, 2 / 3, 0, 1 / 2, 2 / 4, 2 / 5, 3 / 7]
    assert run(P.make_dyck_frac_trigger(), tokens)[-1] == "no"  # the last ")" made "()" negative


def test_plain_tracr_miscompiles_the_fraction_counter():
    """tracr infers that a mean of 0/1 values is 0 or 1/n, so its comparison MLP reads 2/3 as 1/2:
    "(()" compiles to "yes" (balanced).  `compile_program` widens the value set and gets it right."""
    prog = P.make_dyck_frac_trigger()
    tokens = ["(", "(", ")", T]
    assert run(prog, tokens)[-1] == "no"
    assert decode_batch(compile_causal(prog, P.dyck_vocab(), 10), [tokens])[0][-1] == "yes"
    teacher = compile_program(prog, P.dyck_vocab(), 10, causal=True)
    assert teacher.evaluate(tokens)[-1] == "no"
    assert teacher.config.validation["mismatches"] == 0


def test_dyck_frac_compiled_at_the_task_length_is_small_and_exact():
    teacher = compile_spec(get_program("dyck_frac_trigger"), 112)
    assert teacher.config.validation["mismatches"] == 0
    assert teacher.config.num_layers == 4  # opener indicator (MLP) before the mean
    frac = next(v for v in teacher.config.variables if v.name == "dyck_open_frac")
    farey = 1 + sum(1 for n in range(1, 113) for k in range(1, n + 1) if math.gcd(k, n) == 1)
    assert len(frac.values) == farey  # every k/n with n <= 112, once
    balanced = list("([{" * 18) + list("}])" * 18) + [F] * 3 + [T]  # 108 brackets
    assert teacher.evaluate(balanced)[-1] == "yes"
    assert teacher.evaluate(balanced[:-5] + balanced[-4:])[-1] == "no"  # one "]" dropped: 54 vs 53


@pytest.mark.parametrize("compact", [False, True])
def test_count_compiled(compact):
    n = 12
    prog = P.make_count_trigger(99, compact=compact)
    rng = random.Random(4)
    inputs = random_symbols(rng, P.count_vocab(), n, 150)  # any symbol sequence
    inputs += [count_input(rng, n, 99) for _ in range(150)]
    model = check_compiled(prog, P.count_vocab(), n, inputs)
    assert model.model_config.num_layers == (3 if compact else 2)


@pytest.mark.parametrize("max_digits,n", [(2, 10), (3, 12)])
def test_sum_compiled(max_digits, n):
    prog = P.make_sum_trigger(max_digits)
    rng = random.Random(5)
    inputs = [sum_input(rng, n, max_digits) for _ in range(300)]
    inputs.append([F] * (n - 4) + ["1", "+", "2", T])
    model = check_compiled(prog, P.sum_vocab(), n, inputs)
    assert model.model_config.num_layers == 5
