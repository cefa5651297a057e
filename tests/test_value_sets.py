"""Fraction means: tracr's basis inference gives a mean of 0/1 values only the values 0 and 1/n; a mean
an MLP would misread because of that is detected and gets every k/n (as one marked with `fraction_mean`
does), and the compiled model then agrees with the RASP evaluator; where detection cannot settle it, the
error names `fraction_mean`.  A numerical value off by more than its tolerance is still refused."""

from __future__ import annotations

import pytest
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

import tracr_injection as ti
from tracr_injection import compile_program
from tracr_injection.compile import value_sets
from tracr_injection.compile.errors import CompiledModelMismatchError
from tracr_injection.compile.fast_craft import fast_craft
from tracr_injection.compile.fingerprint import program_hash
from tracr_injection.compile.tolerance import numerical_tolerance
from tracr_injection.compile.value_sets import fractions
from tracr_injection.programs.annotations import fraction_mean, is_fraction_mean


def majority_x(marked: bool) -> rasp.SOp:
    """At each position: is the share of "x" so far above, at or below 1/2 (a mean read by an MLP)."""
    is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens)).named("is_x")
    prefix = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prefix")
    share = rasp.numerical(rasp.Aggregate(prefix, is_x, default=0))
    share = (fraction_mean(share) if marked else share).named("share_x")
    majority = rasp.Map(lambda v: "above" if v > 0.5 else ("half" if v == 0.5 else "below"), share)
    return majority.named("majority")


def test_fractions_are_every_k_over_n():
    assert ti.fraction_mean is fraction_mean  # the public name
    assert fractions(3) == {0, 1 / 3, 1 / 2, 2 / 3, 1}
    assert fractions(1) == {0, 1}


def test_plain_tracr_miscompiles_a_share_that_is_detected_without_a_mark():
    with fast_craft():  # tracr's own passes, same weights, faster
        plain = compiling.compile_rasp_to_model(
            majority_x(marked=False), {"x", "y"}, 8, causal=True, compiler_bos="bos", compiler_pad="pad",
            mlp_exactness=10_000,
        )  # fmt: skip
    assert plain.apply(["bos", *"xxy"]).decoded[1:] == ["above", "above", "half"]  # 2/3 read as 1/2
    for marked in (False, True):
        teacher = compile_program(majority_x(marked), {"x", "y"}, 8, causal=True)
        assert teacher.config.validation["mismatches"] == 0
        assert teacher.evaluate(list("xxy")) == ["above", "above", "above"]
        assert teacher.evaluate(list("yxxxyy")) == ["below", "half", "above", "above", "above", "half"]
        assert len(teacher.config.variable("share_x").values) == len(fractions(8))


def test_a_share_too_large_to_widen_is_refused_with_fraction_mean_as_the_fix(monkeypatch):
    monkeypatch.setattr(value_sets, "MAX_WIDENED", 10)
    with pytest.raises(CompiledModelMismatchError, match=r"(?s)majority.*share_x.*fraction_mean"):
        compile_program(majority_x(marked=False), {"x", "y"}, 8, causal=True)


def test_a_share_read_right_with_tracrs_values_is_left_as_it_is():
    teacher = compile_program(lib.make_shuffle_dyck(["()"]), {"(", ")"}, 8)
    assert teacher.config.validation["mismatches"] == 0
    assert teacher.config.variable("has_neg").values == sorted({0} | {1 / n for n in range(1, 9)})


def test_tolerance_is_a_quarter_of_the_local_gap_capped():
    grid = sorted(fractions(40))
    assert numerical_tolerance(1.0, grid) == pytest.approx(1 / 40 / 4)  # 39/40 is the nearest other value
    assert numerical_tolerance(20 / 39, grid) == pytest.approx((19 / 37 - 20 / 39) / 4)  # the nearest other share
    assert numerical_tolerance(0.5, [0.0, 0.5, 1.0]) == 0.01


def test_a_wrong_numerical_value_is_still_refused_at_tracrs_default_exactness():
    share = lib.make_frac_prevs(rasp.tokens == "a")
    copy = rasp.numerical(rasp.Map(lambda x: x, share)).named("share_copy")  # an MLP that discretises the share
    with pytest.raises(CompiledModelMismatchError, match=r"share_copy.*compiled model gives 0\.5"):
        compile_program(copy, {"a", "b"}, 12, mlp_exactness=100)
    teacher = compile_program(copy, {"a", "b"}, 12)
    assert teacher.config.validation["mismatches"] == 0


def test_the_mark_is_part_of_the_program_hash_and_only_fits_numerical_means():
    assert program_hash(majority_x(True)) != program_hash(majority_x(False))
    assert is_fraction_mean(majority_x(True).inner) and not is_fraction_mean(majority_x(False).inner)
    with pytest.raises(TypeError, match="numerical rasp.Aggregate"):
        fraction_mean(rasp.Map(lambda t: t, rasp.tokens))
