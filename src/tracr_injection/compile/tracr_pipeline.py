"""Run tracr's compiler passes and keep what the torch teacher needs.

In: a RASP program (`tracr.rasp.rasp.SOp`), its vocabulary, a maximum length, the causal
flag and an `mlp_exactness`.  Out: a `TracrCompilation` holding tracr's assembled JAX model
plus the structure tracr computes on the way and then forgets: every residual direction as
(variable, value), and for each program variable its encoding, value set and RASP
expression; and the numerical means whose values could not be settled
(`value_sets.correct_mean_value_sets`).  tracr's own failures come back as
`UnsupportedProgramError` naming the offending expression instead of a traceback from deep
inside tracr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from tracr.compiler import (
    assemble,
    basis_inference,
    craft_graph_to_model,
    craft_model_to_transformer,
    expr_to_craft_graph,
    nodes,
    rasp_to_graph,
    validating,
)
from tracr.craft import bases
from tracr.rasp import causal_eval, rasp

from tracr_injection.compile.errors import InvalidVocabError, UnsupportedProgramError
from tracr_injection.compile.fast_craft import fast_craft
from tracr_injection.compile.value_sets import correct_mean_value_sets

COMPILER_BOS = "compiler_bos"
COMPILER_PAD = "compiler_pad"


@dataclasses.dataclass
class ProgramVariable:
    """One SOp of the program as tracr laid it out: name, encoding, values and expression."""

    name: str  # stable: the expression's name, or its label if two SOps share the name
    label: str  # tracr's label (name plus a process-wide counter)
    encoding: str  # "categorical" or "numerical"
    values: list[Any]
    expr: rasp.SOp


@dataclasses.dataclass
class TracrCompilation:
    """tracr's assembled model plus the residual structure behind its labels."""

    assembled: assemble.AssembledTransformerModel
    residual_directions: list[tuple[str, Any]]  # (name, value or None), in residual order
    variables: dict[str, ProgramVariable]
    output_name: str
    unsettled_means: list[str]  # unmarked means that may take values tracr does not list


def check_vocab(vocab: Iterable[Any]) -> set[Any]:
    """Return the vocabulary as a set, or raise if it is empty or holds a reserved name."""
    vocab_set = set(vocab)
    if not vocab_set:
        raise InvalidVocabError("The vocabulary is empty: pass the set of input symbols.")
    for reserved in (COMPILER_BOS, COMPILER_PAD):
        if reserved in vocab_set:
            raise InvalidVocabError(
                f"The vocabulary contains {reserved!r}, which the compiler reserves for its "
                "BOS/PAD token: rename that symbol."
            )
    return vocab_set


def check_supported(program: rasp.SOp) -> None:
    """Raise `UnsupportedProgramError` listing every expression tracr statically rejects."""
    if not isinstance(program, rasp.SOp):
        raise UnsupportedProgramError(
            f"Expected a tracr RASP SOp, got {type(program).__name__}: build the program "
            "with tracr.rasp.rasp (e.g. rasp.Map(f, rasp.tokens))."
        )
    problems = validating.static_validate(program)
    if problems:
        raise UnsupportedProgramError(describe_unsupported(problems))


CATEGORICAL_AGGREGATE_OF_SEVERAL = (
    "this categorical Aggregate selects several positions holding different values. tracr "
    "compiles it as an attention head that copies the one-hot value of the selected position, "
    "so it is right only where the selector picks at most one position (or positions with the "
    "same value); several are averaged into a mix of values (the RASP evaluator averages "
    "numbers and fails on other values). Fix: narrow the selector so that it selects at most "
    "one position per query, or, to average, make the aggregate numerical over a 0/1 value: "
    "rasp.numerical(rasp.Aggregate(selector, rasp.numerical(rasp.Map(lambda x: 1 if ... else 0, "
    "sop)), default=0))."
)
NUMERICAL_AGGREGATE_OF_NON_BINARY = (
    "Numerical aggregate only supports binary inputs 0, 1 (it computes a mean of a 0/1 variable), "
    "but its input takes the values {values}. Fix: aggregate a numerical 0/1 Map of the input "
    "(rasp.numerical(rasp.Map(lambda x: 1 if x == ... else 0, sop)))."
)


class DynamicValidationEvaluator(causal_eval.CausalEvaluator):
    """tracr's dynamic aggregate checks, causal or not, with causes and fixes in the reasons.

    tracr's `DynamicValidationEvaluator` evaluates an aggregate's input without the causal
    mask, which wrongly rejects causal programs whose aggregates select one value per
    prefix; here the input is evaluated with the program's own masking.  Each sub-expression
    is evaluated once per input (the evaluator is made for one input).  A categorical
    aggregate over several non-numbers, on which the RASP evaluator itself fails, is reported
    as the unsupported expression it is.
    """

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.cache: dict[int, Any] = {}
        self.unsupported_exprs: list[validating.TracrUnsupportedExpr] = []

    def evaluate(self, expr: rasp.RASPExpr, xs: Any) -> Any:
        if id(expr) not in self.cache:
            self.cache[id(expr)] = self.evaluate_and_check(expr, xs)
        return self.cache[id(expr)]

    def evaluate_and_check(self, expr: rasp.RASPExpr, xs: Any) -> Any:
        """Evaluate `expr` (its inputs through the cache) and record why tracr cannot compile it."""
        evaluate = causal_eval.CausalEvaluator.evaluate if self.causal else rasp.DefaultRASPEvaluator.evaluate
        if not isinstance(expr, rasp.Aggregate):
            return evaluate(self, expr, xs)
        agg_in = self.evaluate(expr.sop, xs)
        self.evaluate(expr.selector, xs)
        try:
            out = evaluate(self, expr, xs)
        except ValueError:
            if rasp.is_categorical(expr):
                self.report(expr, CATEGORICAL_AGGREGATE_OF_SEVERAL)
            raise
        if rasp.is_categorical(expr) and not set(out).issubset(set(agg_in) | {None}):
            self.report(expr, CATEGORICAL_AGGREGATE_OF_SEVERAL)
        if rasp.is_numerical(expr) and not set(agg_in).issubset({0, 1}):
            self.report(expr, NUMERICAL_AGGREGATE_OF_NON_BINARY.format(values=set(agg_in)))
        return out

    def report(self, expr: rasp.RASPExpr, reason: str) -> None:
        """Record `expr` as unsupported for `reason`."""
        self.unsupported_exprs.append(validating.TracrUnsupportedExpr(expr=expr, reason=reason))


def check_supported_on_inputs(program: rasp.SOp, inputs: Iterable[list[Any]], causal: bool) -> None:
    """Raise if tracr's dynamic validator rejects the program on any of `inputs`."""
    for tokens in inputs:
        evaluator = DynamicValidationEvaluator(causal)
        try:
            evaluator.evaluate(program, tokens)
        except Exception as err:  # the RASP evaluator runs user functions: any error is possible
            if evaluator.unsupported_exprs:
                raise UnsupportedProgramError(describe_found(evaluator.unsupported_exprs, tokens)) from err
            raise UnsupportedProgramError(
                f"The RASP evaluator fails on the input {tokens!r}: {type(err).__name__}: {err}\n"
                "Make every Map/SequenceMap/Aggregate defined on all values it can receive."
            ) from err
        if evaluator.unsupported_exprs:
            raise UnsupportedProgramError(describe_found(evaluator.unsupported_exprs, tokens))


def describe_found(problems: list[validating.TracrUnsupportedExpr], tokens: list[Any]) -> str:
    """`describe_unsupported`, naming the input that showed the problems."""
    return describe_unsupported(problems) + f"\n(found while evaluating the input {tokens!r})"


def describe_unsupported(problems: list[validating.TracrUnsupportedExpr]) -> str:
    """One readable message for tracr's list of unsupported expressions."""
    seen: dict[str, str] = {}
    for problem in problems:
        seen.setdefault(problem.expr.label, problem.reason)
    lines = "\n".join(f"  - {label}: {reason}" for label, reason in seen.items())
    return (
        "tracr cannot compile this RASP program:\n"
        f"{lines}\n"
        "Rewrite these expressions in the subset tracr supports (see "
        "tracr.compiler.validating): e.g. numerical Aggregates need a 0/1 numerical input "
        "and compute a mean; non-linear SequenceMaps need categorical inputs and output."
    )


def run_tracr(
    program: rasp.SOp,
    vocab: set[Any],
    max_seq_len: int,
    causal: bool,
    mlp_exactness: int,
) -> TracrCompilation:
    """Compile `program` with tracr's passes (fast matrix assembly, corrected value sets of
    means) and keep its structure."""
    check_supported(program)
    try:
        with fast_craft():
            extracted = rasp_to_graph.extract_rasp_graph(program)
            graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
            basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
            unsettled = correct_mean_value_sets(graph, max_seq_len)
            expr_to_craft_graph.add_craft_components_to_rasp_graph(
                graph,
                bos_dir=bases.BasisDirection(rasp.tokens.label, COMPILER_BOS),
                mlp_exactness=mlp_exactness,
            )
            craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
            assembled = craft_model_to_transformer.craft_model_to_transformer(
                craft_model=craft_model,
                graph=graph,
                sink=sink,
                max_seq_len=max_seq_len,
                causal=causal,
                compiler_bos=COMPILER_BOS,
                compiler_pad=COMPILER_PAD,
            )
    except (NotImplementedError, ValueError, TypeError, KeyError, AssertionError) as err:
        raise UnsupportedProgramError(
            f"tracr failed to compile the program {program.label!r}: "
            f"{type(err).__name__}: {err}\n"
            "Check that the program uses only what tracr supports (tracr.compiler.validating) "
            "and that every Map/SequenceMap is defined on all values its inputs can take."
        ) from err

    names = stable_names(graph)
    residual_directions = [
        (rename_direction(name, names), value)
        for name, value in residual_directions_of(assembled, craft_model, graph, sink, max_seq_len)
    ]
    variables = {
        names[label]: ProgramVariable(
            name=names[label],
            label=label,
            encoding="numerical" if rasp.is_numerical(node[nodes.EXPR]) else "categorical",
            values=sorted_values(node[nodes.VALUE_SET]),
            expr=node[nodes.EXPR],
        )
        for label, node in graph.nodes.items()
        if isinstance(node[nodes.EXPR], rasp.SOp) and nodes.VALUE_SET in node
    }
    return TracrCompilation(
        assembled=assembled,
        residual_directions=residual_directions,
        variables=variables,
        output_name=names[sink[nodes.ID]],
        unsettled_means=[names[label] for label in unsettled],
    )


def residual_directions_of(
    assembled: assemble.AssembledTransformerModel,
    craft_model: Any,
    graph: Any,
    sink: dict[str, Any],
    max_seq_len: int,
) -> list[tuple[str, Any]]:
    """Every residual dimension as (variable name, typed value or None for numerical).

    tracr keeps only `str(direction)` (so 1 and "1" look alike); rebuilding the residual
    space exactly as `assemble.assemble_craft_model` does gives the typed directions, and
    comparing their strings with tracr's labels proves the order is the same.
    """
    tokens_values = graph.nodes[rasp.tokens.label][nodes.VALUE_SET] | {COMPILER_BOS, COMPILER_PAD}
    residual_space = bases.join_vector_spaces(
        craft_model.residual_space,
        bases.VectorSpaceWithBasis.from_values(rasp.tokens.label, tokens_values),
        bases.VectorSpaceWithBasis.from_values(rasp.indices.label, range(max_seq_len)),
        bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS]),
    )
    directions = [(str(d.name), d.value) for d in residual_space.basis]
    labels = [str(d) for d in residual_space.basis]
    if labels != list(assembled.residual_labels):
        raise UnsupportedProgramError(
            "Internal error: the rebuilt residual space does not match tracr's residual "
            "labels; this tracr version lays out the residual stream differently."
        )
    return directions


def stable_names(graph: Any) -> dict[str, str]:
    """Map each SOp label to a name that does not depend on the process-wide counter.

    A label is `{name}_{counter}`; the name alone is used when no other SOp of the program
    has it (`tokens` and `indices` are already stable), so artifacts compiled in different
    processes name their variables alike.
    """
    sop_labels = [label for label, node in graph.nodes.items() if isinstance(node[nodes.EXPR], rasp.SOp)]
    counts: dict[str, int] = {}
    for label in sop_labels:
        name = graph.nodes[label][nodes.EXPR].name
        counts[name] = counts.get(name, 0) + 1
    return {
        label: name if counts[name] == 1 else label
        for label in sop_labels
        for name in [graph.nodes[label][nodes.EXPR].name]
    }


def rename_direction(direction_name: str, names: dict[str, str]) -> str:
    """A residual direction's name with its SOp label replaced by the stable name.

    Directions of a variable are named by its label; helper directions that tracr adds
    for a variable (e.g. `{label}_selector_width_attn_output`) start with it.
    """
    if direction_name in names:
        return names[direction_name]
    for label, name in names.items():
        if direction_name.startswith(label + "_"):
            return name + direction_name[len(label) :]
    return direction_name


def sorted_values(values: Iterable[Any]) -> list[Any]:
    """Values in tracr's basis order (sorted, falling back to string order for mixed types)."""
    values = list(values)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)
