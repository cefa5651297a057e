"""Check a compiled teacher against tracr's RASP evaluator.

In: a `TeacherModel`, the RASP expression of each of its variables, and input sequences.
Out: a `ValidationReport` listing every (input, variable, position) where the teacher's
decoded final residual stream differs from the RASP evaluator (`causal_eval` for causal
programs): categorical variables must be equal, numerical ones within the tolerance their value
grid allows (`compile.tolerance`).  tracr's compiled models can be silently wrong (e.g. too small
an `mlp_exactness`), so every fresh compile goes through here.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from tracr.rasp import causal_eval, rasp

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.compile.tolerance import within_tolerance
from tracr_injection.compile.value_sets import fractions

BATCH_SIZE = 64


@dataclasses.dataclass
class Mismatch:
    """One disagreement between the compiled model and the RASP evaluator."""

    tokens: list[Any]
    variable: str
    position: int
    compiled: Any
    expected: Any

    def __str__(self) -> str:
        return (
            f"input {self.tokens!r} (length {len(self.tokens)}): variable {self.variable!r} "
            f"at position {self.position}: compiled model gives {self.compiled!r}, "
            f"RASP evaluator gives {self.expected!r}"
        )


@dataclasses.dataclass
class ValidationReport:
    """Outcome of validating a teacher on a set of inputs."""

    num_inputs: int
    max_length: int
    variables: list[str]
    mismatches: list[Mismatch]

    @property
    def passed(self) -> bool:
        """True when the teacher agreed with RASP everywhere."""
        return not self.mismatches

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for the teacher's manifest."""
        return {
            "num_inputs": self.num_inputs,
            "max_length": self.max_length,
            "variables_checked": len(self.variables),
            "mismatches": len(self.mismatches),
            "first_mismatch": str(self.mismatches[0]) if self.mismatches else None,
        }


class MemoizedEvaluator(causal_eval.CausalEvaluator):
    """RASP evaluator that evaluates each sub-expression once per input (optionally causal)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.cache: dict[int, Any] = {}

    def evaluate(self, expr: rasp.RASPExpr, xs: Sequence[Any]) -> Any:
        key = id(expr)
        if key not in self.cache:
            evaluate = (
                causal_eval.CausalEvaluator.evaluate if self.causal else rasp.DefaultRASPEvaluator.evaluate
            )
            self.cache[key] = evaluate(self, expr, xs)
        return self.cache[key]


def random_inputs(vocab: Sequence[Any], max_seq_len: int, count: int, seed: int = 0) -> list[list[Any]]:
    """`count` uniform random inputs: lengths 1..max_seq_len, a quarter of them at max_seq_len."""
    rng = random.Random(seed)
    symbols = sorted(vocab, key=repr)
    lengths = [max_seq_len if i % 4 == 0 else rng.randint(1, max_seq_len) for i in range(count)]
    return [[rng.choice(symbols) for _ in range(length)] for length in lengths]


def values_agree(compiled: Any, expected: Any, grid: Sequence[float] | None) -> bool:
    """Equality for categorical variables (`grid` None); within the grid's tolerance for numerical ones."""
    if grid is not None and compiled is not None and expected is not None:
        return within_tolerance(float(compiled), float(expected), grid)
    return compiled == expected


def value_grid(values: Sequence[Any], expr: rasp.SOp, max_seq_len: int) -> list[float]:
    """The sorted values a numerical variable can take: tracr's value set, plus every k/n for a mean
    (tracr lists only 0 and 1/n for a mean of 0/1 values, the RASP evaluator gives any share)."""
    grid = {float(v) for v in values}
    if isinstance(expr, rasp.Aggregate):
        grid |= fractions(max_seq_len)
    return sorted(grid)


def validate_teacher(
    teacher: TeacherModel,
    expressions: dict[str, rasp.SOp],
    inputs: Sequence[Sequence[Any]],
) -> ValidationReport:
    """Compare every variable in `expressions` at every position of every input."""
    variables = [v for v in teacher.config.variables if v.name in expressions]
    grids = {
        v.name: value_grid(v.values, expressions[v.name], teacher.config.max_seq_len)
        for v in variables
        if v.encoding == "numerical"
    }
    mismatches: list[Mismatch] = []
    for start in range(0, len(inputs), BATCH_SIZE):
        batch = [list(tokens) for tokens in inputs[start : start + BATCH_SIZE]]
        output, _ = teacher.run(batch)
        final_BPD = output.residuals[-1]
        for row, tokens in enumerate(batch):
            evaluator = MemoizedEvaluator(teacher.config.causal)
            resid_PD = final_BPD[row, 1 : len(tokens) + 1]
            for var in variables:
                expected = evaluator.evaluate(expressions[var.name], tokens)
                compiled = read_variable(teacher, resid_PD, var.name, var.name in grids)
                for position, (got, want) in enumerate(zip(compiled, expected)):
                    if not values_agree(got, want, grids.get(var.name)):
                        mismatches.append(Mismatch(tokens, var.name, position, got, want))
    return ValidationReport(
        num_inputs=len(inputs),
        max_length=max((len(t) for t in inputs), default=0),
        variables=[v.name for v in variables],
        mismatches=mismatches,
    )


def read_variable(teacher: TeacherModel, resid_PD: Any, name: str, numerical: bool) -> list[Any]:
    """A variable's values at every position: the raw float for numerical variables (snapping to a
    listed value first could move a right value onto a wrong neighbour), decoded for categorical ones."""
    if numerical:
        return resid_PD[:, teacher.config.variable(name).dims[0]].float().tolist()
    return teacher.decode_variable(resid_PD, name)
