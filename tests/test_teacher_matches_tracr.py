"""The torch teacher reproduces tracr's JAX model and the RASP evaluator exactly."""

import math
import random

import numpy as np
import pytest
from tracr.rasp import causal_eval, rasp

from tracr_injection.compile.compiler import compile_spec, tracr_version
from tracr_injection.compile.convert import teacher_from_compilation
from tracr_injection.compile.tracr_pipeline import COMPILER_BOS, run_tracr
from tracr_injection.programs.registry import get_program, program_names

LIBRARY = [
    "length",
    "reverse",
    "hist",
    "sort",
    "sort_unique",
    "sort_freq",
    "frac_prevs",
    "pair_balance",
    "shuffle_dyck1",
    "shuffle_dyck3",
    "count",
    "detect_pattern",
]
LENGTHS = {"shuffle_dyck3": (4, 8)}


def compile_both(name: str, max_seq_len: int, causal: bool):
    """tracr's assembled JAX model and our torch teacher from one compilation."""
    spec = get_program(name)
    program = spec.build(max_seq_len)
    compilation = run_tracr(program, set(spec.vocab), max_seq_len, causal, mlp_exactness=10_000)
    teacher = teacher_from_compilation(
        compilation,
        program_name=name,
        program_hash="test",
        vocab=sorted(spec.vocab, key=repr),
        max_seq_len=max_seq_len,
        causal=causal,
        mlp_exactness=10_000,
        tracr_version=tracr_version(),
    )
    return program, compilation.assembled, teacher


def same_outputs(compiled, expected):
    """Equal position by position; numbers within float rounding of each other."""
    return len(compiled) == len(expected) and all(
        a == b
        or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, abs_tol=1e-9))
        for a, b in zip(compiled, expected)
    )


def random_tokens(vocab, length, rng):
    return [rng.choice(sorted(vocab, key=repr)) for _ in range(length)]


def test_every_library_program_is_registered():
    assert set(LIBRARY) <= set(program_names())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", LIBRARY)
def test_residuals_match_jax_at_every_level(name, causal):
    for max_seq_len in LENGTHS.get(name, (5, 9)):
        program, assembled, teacher = compile_both(name, max_seq_len, causal)
        rng = random.Random(max_seq_len)
        inputs = [random_tokens(teacher.config.vocab, n, rng) for n in (1, max_seq_len // 2, max_seq_len)]
        output, _ = teacher.run(inputs)
        assert len(output.residuals) == teacher.config.num_layers + 1
        for row, tokens in enumerate(inputs):
            jax_out = assembled.apply([COMPILER_BOS, *tokens])
            # tracr collects a residual after every attention and every MLP; blocks end at the MLPs.
            jax_levels = [jax_out.input_embeddings] + jax_out.residuals[1::2]
            for level, (ours, theirs) in enumerate(zip(output.residuals, jax_levels)):
                ours = ours[row, : len(tokens) + 1].numpy()
                theirs = np.asarray(theirs[0])
                scale = max(1.0, float(np.abs(theirs).max()))
                assert np.abs(ours - theirs).max() <= 1e-5 * scale, (name, causal, max_seq_len, level)
            decoded = teacher.decode_variable(
                output.residuals[-1][row, 1 : len(tokens) + 1], teacher.config.output_variable
            )
            evaluate = causal_eval.evaluate if causal else rasp.evaluate
            assert same_outputs(decoded, list(evaluate(program, tokens)))


@pytest.mark.parametrize("name", LIBRARY)
def test_evaluate_equals_rasp_on_random_inputs(name):
    spec = get_program(name)
    max_seq_len = 8
    teacher = compile_spec(spec, max_seq_len)
    program = spec.build(max_seq_len)
    rng = random.Random(1)
    inputs = [
        random_tokens(spec.vocab, max_seq_len if i % 5 == 0 else rng.randint(1, max_seq_len), rng)
        for i in range(200)
    ]
    inputs += spec.validation_inputs(max_seq_len, count=20, seed=7)
    assert any(len(t) == max_seq_len for t in inputs)
    for tokens in inputs:
        assert same_outputs(teacher.evaluate(tokens), list(rasp.evaluate(program, tokens))), tokens
