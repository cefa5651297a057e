"""Fraction means: tracr's basis inference gives a mean of 0/1 values only the values 0 and 1/n; a mean
marked with `fraction_mean` gets every k/n, and the compiled model then agrees with the RASP evaluator."""

from __future__ import annotations

import pytest
from tracr.rasp import rasp

import tracr_injection as ti
from tracr_injection import compile_program
from tracr_injection.compile.errors import CompiledModelMismatchError
from tracr_injection.compile.fingerprint import program_hash
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


def test_plain_inference_miscompiles_a_share_and_the_mark_fixes_it():
    with pytest.raises(CompiledModelMismatchError, match="majority|share_x"):
        compile_program(majority_x(marked=False), {"x", "y"}, 8, causal=True)
    teacher = compile_program(majority_x(marked=True), {"x", "y"}, 8, causal=True)
    assert teacher.config.validation["mismatches"] == 0
    assert teacher.evaluate(list("xxy")) == ["above", "above", "above"]
    assert teacher.evaluate(list("yxxxyy")) == ["below", "half", "above", "above", "above", "half"]
    share = teacher.config.variable("share_x")
    assert len(share.values) == len(fractions(8))


def test_the_mark_is_part_of_the_program_hash_and_only_fits_numerical_means():
    assert program_hash(majority_x(True)) != program_hash(majority_x(False))
    assert is_fraction_mean(majority_x(True).inner) and not is_fraction_mean(majority_x(False).inner)
    with pytest.raises(TypeError, match="numerical rasp.Aggregate"):
        fraction_mean(rasp.Map(lambda t: t, rasp.tokens))
