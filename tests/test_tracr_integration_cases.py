"""tracr's own integration cases through `compile_program`: every supported case compiles, validates
against the RASP evaluator and gives tracr's expected output; every unsupported one is refused."""

import math

import pytest
from tracr.compiler import test_cases

from tracr_injection import compile_program
from tracr_injection.compile.errors import UnsupportedProgramError

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")  # cases repeat programs: compile each once


def same_as_expected(compiled, expected):
    """tracr's own criterion: numbers within rtol 0.005, other values equal where one is expected."""
    return len(compiled) == len(expected) and all(
        want is None
        or (math.isclose(got, want, rel_tol=0.005, abs_tol=1e-7) if isinstance(want, (int, float)) else got == want)
        for got, want in zip(compiled, expected)
    )


def compile_case(case, causal):
    return compile_program(
        case["program"],
        case["vocab"],
        case["max_seq_len"],
        causal=causal,
        validation_inputs=[case["test_input"]],
        num_random_inputs=64,
    )


@pytest.mark.parametrize("case", test_cases.TEST_CASES, ids=lambda c: c["testcase_name"])
def test_supported_case_compiles_validates_and_matches(case):
    teacher = compile_case(case, causal=False)
    assert teacher.config.validation["mismatches"] == 0
    assert same_as_expected(teacher.evaluate(case["test_input"]), case["expected_output"])


@pytest.mark.parametrize("case", test_cases.CAUSAL_TEST_CASES, ids=lambda c: c["testcase_name"])
def test_causal_case_compiles_validates_and_matches(case):
    teacher = compile_case(case, causal=True)
    assert teacher.config.validation["mismatches"] == 0
    assert same_as_expected(teacher.evaluate(case["test_input"]), case["expected_output"])


@pytest.mark.parametrize("case", test_cases.UNSUPPORTED_TEST_CASES, ids=lambda c: c["testcase_name"])
def test_unsupported_case_is_refused(case):
    with pytest.raises(UnsupportedProgramError, match="tracr"):
        compile_program(case["program"], case["vocab"], case["max_seq_len"], causal=True)
