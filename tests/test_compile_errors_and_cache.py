"""Bad input gets clear errors; compiled teachers are cached and round-trip through disk."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from tracr.compiler import lib
from tracr.rasp import rasp
from typer.testing import CliRunner

from tracr_injection import compile_program, load_teacher
from tracr_injection.cli.main import app
from tracr_injection.compile.compiler import artifact_dir, compile_spec
from tracr_injection.compile.errors import (
    CompiledModelMismatchError,
    InvalidInputError,
    InvalidVocabError,
    UnsupportedProgramError,
)
from tracr_injection.compile.teacher import CONFIG_NAME, WEIGHTS_NAME
from tracr_injection.errors import ArtifactError
from tracr_injection.programs.registry import get_program

VOCAB = {"a", "b", "c"}


def test_numerical_sequence_map_is_rejected_with_the_expression_named():
    x = rasp.numerical(rasp.Map(lambda t: 1 if t == "a" else 0, rasp.tokens)).named("x")
    bad = rasp.numerical(rasp.SequenceMap(lambda u, v: u + v, x, x)).named("bad_sum")
    with pytest.raises(UnsupportedProgramError, match="bad_sum.*SequenceMap only supports categorical"):
        compile_program(bad, VOCAB, 5)


def test_numerical_aggregate_of_non_binary_values_is_rejected():
    values = rasp.numerical(rasp.Map(lambda t: {"a": 1, "b": 2, "c": 3}[t], rasp.tokens)).named("values")
    select_all = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.TRUE)
    mean = rasp.numerical(rasp.Aggregate(select_all, values, default=0)).named("mean_of_values")
    with pytest.raises(UnsupportedProgramError, match="mean_of_values.*binary inputs"):
        compile_program(mean, VOCAB, 5)


def test_categorical_aggregate_that_needs_averaging_is_rejected_with_cause_and_fix():
    select_all = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.TRUE)
    numbers = rasp.Map(lambda t: {"a": 1, "b": 2, "c": 3}[t], rasp.tokens)
    avg = rasp.Aggregate(select_all, numbers).named("average_number")
    cause_and_fix = r"selects several positions holding different values.*narrow the selector.*rasp\.numerical"
    with pytest.raises(UnsupportedProgramError, match="average_number.*" + cause_and_fix):
        compile_program(avg, VOCAB, 5)
    avg_tokens = rasp.Aggregate(select_all, rasp.tokens).named("average_token")  # the evaluator fails on these
    with pytest.raises(UnsupportedProgramError, match="average_token.*" + cause_and_fix):
        compile_program(avg_tokens, VOCAB, 5)


def test_categorical_aggregate_of_one_position_or_equal_values_compiles():
    prefix = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.EQ)
    same_token = rasp.Aggregate(prefix, rasp.Map(lambda t: {"a": 1, "b": 2, "c": 3}[t], rasp.tokens))
    teacher = compile_program(same_token.named("same_token"), VOCAB, 5)
    assert teacher.evaluate(list("abca")) == [1, 2, 3, 1]


@pytest.mark.parametrize("max_seq_len", [0, -3, 2.5, True])
def test_non_positive_max_seq_len_is_rejected_before_any_work(max_seq_len):
    with pytest.raises(InvalidInputError, match=f"max_seq_len must be a positive integer.*got {max_seq_len!r}"):
        compile_program("not even a program", VOCAB, max_seq_len)


def test_not_a_program_is_rejected():
    with pytest.raises(UnsupportedProgramError, match="Expected a tracr RASP SOp"):
        compile_program("tokens", VOCAB, 5)


@pytest.mark.parametrize("reserved", ["compiler_bos", "compiler_pad"])
def test_vocab_with_reserved_names_is_rejected(reserved):
    with pytest.raises(InvalidVocabError, match=reserved):
        compile_program(lib.make_length(), VOCAB | {reserved}, 5)


def test_inputs_outside_vocab_or_too_long_are_rejected():
    teacher = compile_program(lib.make_length(), VOCAB, 5)
    with pytest.raises(InvalidInputError, match="'z' at position 1 is not in the teacher's vocabulary"):
        teacher.evaluate(["a", "z"])
    with pytest.raises(InvalidInputError, match="length 6 is longer than the teacher's max_seq_len 5"):
        teacher.evaluate(["a"] * 6)


def test_too_small_exactness_is_caught_by_validation():
    spec = get_program("shuffle_dyck1")
    program = spec.build(16)
    with pytest.raises(CompiledModelMismatchError, match=r"input \[.*variable .* at position"):
        compile_program(
            program, spec.vocab, 16, mlp_exactness=1, validation_inputs=spec.validation_inputs(16)
        )
    accepted = compile_program(
        program,
        spec.vocab,
        16,
        mlp_exactness=1,
        accept_mismatch=True,
        validation_inputs=spec.validation_inputs(16),
    )
    assert accepted.config.validation["mismatches"] > 0


def test_automatic_exactness_fixes_what_tracr_default_breaks():
    spec = get_program("shuffle_dyck1")
    teacher = compile_spec(spec, 16)
    assert teacher.config.mlp_exactness >= 1000
    assert teacher.config.validation["mismatches"] == 0
    assert teacher.evaluate(list("(()())" * 2)) == [1] * 12


def test_cache_round_trip_is_fast_and_identical(isolated_cache):
    program = lib.make_hist()
    start = time.perf_counter()
    first = compile_program(program, VOCAB, 6)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = compile_program(program, VOCAB, 6)
    cached_seconds = time.perf_counter() - start
    assert cached_seconds < 0.2 * compile_seconds
    folder = artifact_dir("hist", first.config.program_hash)
    assert (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()
    third = load_teacher(folder)
    for loaded in (second, third):
        assert loaded.config == first.config
        for key, value in first.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key])
    assert third.evaluate(["a", "b", "a"]) == [2, 1, 2]


def test_program_hash_is_stable_across_processes():
    code = (
        "from tracr_injection.programs.registry import get_program;"
        "from tracr_injection.compile.fingerprint import program_hash;"
        "import tracr.compiler.lib as lib;"
        "lib.make_length(); lib.make_hist();"  # shift the label counter
        "print(program_hash(get_program('shuffle_dyck1').build(8)))"
    )
    here = program_hash_of_dyck()
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert here == there


def test_program_hash_ignores_the_string_hash_seed():
    """Closures over sets of strings (the paper's Dyck program) iterate in a per-process order."""
    code = (
        "from tracr_injection.programs.registry import get_program;"
        "from tracr_injection.compile.fingerprint import program_hash;"
        "print(program_hash(get_program('dyck_trigger').build(12)))"
    )
    hashes = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2, 3)
    }  # fmt: skip
    assert len(hashes) == 1


def program_hash_of_dyck():
    from tracr_injection.compile.fingerprint import program_hash

    return program_hash(get_program("shuffle_dyck1").build(8))


def test_program_hash_changes_with_the_function():
    from tracr_injection.compile.fingerprint import program_hash

    plus_one = rasp.Map(lambda x: x + 1, rasp.indices).named("m")
    plus_two = rasp.Map(lambda x: x + 2, rasp.indices).named("m")
    assert program_hash(plus_one) != program_hash(plus_two)


def test_corrupt_or_incomplete_artifacts_give_clear_errors(tmp_path):
    teacher = compile_program(lib.make_length(), VOCAB, 4)
    folder = teacher.save_pretrained(tmp_path / "art")
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="Corrupt teacher weights"):
        load_teacher(folder)
    teacher.save_pretrained(folder)
    manifest = json.loads((folder / CONFIG_NAME).read_text())
    manifest["residual_labels"] = manifest["residual_labels"][:-1]
    (folder / CONFIG_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not match its manifest"):
        load_teacher(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(ArtifactError, match="missing teacher.json"):
        load_teacher(folder)


def test_decode_names_every_variable_at_every_position():
    teacher = compile_spec(get_program("shuffle_dyck1"), 6)
    output, _ = teacher.run([list("(())"), list("())(")])
    rows = teacher.decode(output.residuals[-1][0, 1:5])
    assert [row["shuffle_dyck"] for row in rows] == [True] * 4  # non-causal: the verdict on the whole input
    assert [row["bools_open"] for row in rows] == [1, 1, 0, 0]
    unbalanced = teacher.decode(output.residuals[-1][1, 1:5])
    assert [row["shuffle_dyck"] for row in unbalanced] == [False] * 4
    assert [row["any_negative"] for row in unbalanced] == [0, 0, 1, 0]
    assert [row["tokens"] for row in rows] == list("(())")
    assert [row["indices"] for row in rows] == [0, 1, 2, 3]
    assert [row["length"] for row in rows] == [4] * 4


def test_padded_batch_equals_single_runs():
    teacher = compile_spec(get_program("sort"), 6)
    inputs = [[3, 1, 2], [5, 4, 3, 2, 1, 1], [2]]
    output, mask = teacher.run(inputs)
    for row, tokens in enumerate(inputs):
        single, _ = teacher.run([tokens])
        for level in range(teacher.config.num_levels):
            assert torch.allclose(
                output.residuals[level][row, : len(tokens) + 1], single.residuals[level][0], atol=1e-6
            )
        assert mask[row].sum() == len(tokens) + 1


def test_cli_compile_and_inspect(isolated_cache):
    runner = CliRunner()
    result = runner.invoke(app, ["compile", "reverse", "--max-len", "5"])
    assert result.exit_code == 0, result.output
    folder = result.output.strip().splitlines()[-1]
    assert (isolated_cache / "teachers").as_posix() in folder
    result = runner.invoke(app, ["inspect", folder])
    assert result.exit_code == 0, result.output
    for expected in ("residual width", "parameters", "reverse", "opp_idx", "indices"):
        assert expected in result.output
    result = runner.invoke(app, ["compile", "no_such_program"])
    assert result.exit_code == 1 and "Unknown program" in result.output
