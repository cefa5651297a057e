"""Value sets of means: a correction to tracr's basis inference.

In: tracr's program graph after `basis_inference.infer_bases`, and the maximum length.  Out: the
same graph with corrected value sets, plus the numerical means this could not settle.

tracr assumes a numerical mean of 0/1 values takes only 0 and 1/n.  That holds for "is any selected
position 1" tests but not for shares k/n, and an MLP reading such a mean (or anything computed from
it) discretises its input at the midpoints between the listed values, so it can answer wrongly.
Here every SOp gets a superset of the values it can really take (a mean of 0/1 values: every k/n,
n <= max_seq_len), and every MLP that reads a numerical variable is checked on each of those values:
if it would read one as a listed value with a different result, the variable's value set is widened
to the superset and everything downstream is inferred again with tracr's rules.  Means marked with
`programs.annotations.fraction_mean` are widened in any case.  Where the superset is too large to
enumerate (`MAX_CHECKED`) or to compile (`MAX_WIDENED`), the means upstream are reported as unsettled, so that a failed
validation can name `fraction_mean` as the fix.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import networkx as nx
from tracr.compiler import nodes
from tracr.craft import bases
from tracr.rasp import rasp
from tracr.utils import errors

from tracr_injection.compile.errors import UnsupportedProgramError
from tracr_injection.programs.annotations import is_fraction_mean

MAX_CHECKED = 1_000_000  # larger supersets are not enumerated
MAX_WIDENED = 20_000  # nor compiled (tracr's MLP has 2 hidden units per value)
Values = set[Any] | None  # None: too many values to enumerate


def fractions(max_seq_len: int) -> set[float]:
    """Every value a mean of 0/1 values over 1..max_seq_len positions can take (0 included)."""
    return {k / n for n in range(1, max_seq_len + 1) for k in range(n + 1)}


def correct_mean_value_sets(graph: nx.DiGraph, max_seq_len: int) -> list[str]:
    """Widen, in place, the value sets that would make an MLP misread a mean; return unsettled means.

    Marked means are widened first; then, until nothing changes, every numerical variable that an
    MLP would misread is widened to the values it can really take.  The result lists the labels of
    unmarked numerical means upstream of an MLP whose input's values were too many to check or widen.
    A misread variable that cannot be widened stays as tracr infers it: validation then decides.
    """
    possible = possible_values(graph, max_seq_len)
    marked = {label for label, node in graph.nodes.items() if is_fraction_mean(node[nodes.EXPR])}
    widen(graph, {label: fractions(max_seq_len) for label in marked}, max_seq_len)
    unchecked: set[str] = set()
    while True:
        misread = {}
        for label in graph.nodes:
            reader = graph.nodes[label][nodes.EXPR]
            if not is_numerical_reader(reader):
                continue
            source = reader.inner.label
            listed, really = graph.nodes[source][nodes.VALUE_SET], possible[source]
            if really is not None and really <= listed:
                continue
            if really is None:
                unchecked.add(source)
            elif not reads_right(reader.f, listed, really):
                if len(listed | really) > MAX_WIDENED:
                    unchecked.add(source)
                else:
                    misread[source] = listed | really
        if not misread:
            break
        widen(graph, misread, max_seq_len)
    return unsettled_means(graph, unchecked, possible, marked)


def is_numerical_reader(expr: Any) -> bool:
    """Whether `expr` is a Map that tracr compiles as an MLP discretising a numerical input."""
    return isinstance(expr, rasp.Map) and rasp.is_numerical(expr.inner)


def reads_right(f: Callable[[Any], Any], listed: set[Any], really: set[Any]) -> bool:
    """Whether tracr's MLP for `f`, built on the `listed` input values, gives f(x) for every x in `really`.

    The MLP cuts at the midpoints between consecutive listed values (those where f is defined) and
    outputs f of the listed value whose interval holds the input, as `numerical_mlp` does.
    """
    safe_f = errors.ignoring_arithmetic_errors(f)
    points = [(x, y) for x in sorted(listed) for y in [safe_f(x)] if y is not None]
    if not points:
        return True
    cuts = [(a[0] + b[0]) / 2 for a, b in zip(points, points[1:])]
    for x in really:
        want = safe_f(x)
        got = points[bisect.bisect_left(cuts, x)][1]
        if want is not None and not same_output(got, want):
            return False
    return True


def same_output(a: Any, b: Any) -> bool:
    """Equal, numbers up to float rounding."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def possible_values(graph: nx.DiGraph, max_seq_len: int) -> dict[str, Values]:
    """For every SOp, a superset of the values it can take at run time (None: too many to list).

    tracr's inferred value set, except for numerical means (every share k/n of 0/1 values) and
    what is computed from them (tracr's rules applied to these supersets).
    """
    means = [label for label, node in graph.nodes.items() if is_mean(node[nodes.EXPR])]
    affected = set(means).union(*(nx.descendants(graph, label) for label in means))
    possible: dict[str, Values] = {}
    for label in nx.topological_sort(graph):
        expr, listed = graph.nodes[label][nodes.EXPR], graph.nodes[label].get(nodes.VALUE_SET)
        if isinstance(expr, rasp.SOp):
            possible[label] = possible_values_of(expr, listed, possible, max_seq_len) if label in affected else listed
    return possible


def is_mean(expr: Any) -> bool:
    """Whether `expr` is a numerical Aggregate (tracr compiles it as a mean)."""
    return isinstance(expr, rasp.Aggregate) and rasp.is_numerical(expr)


def possible_values_of(expr: rasp.SOp, listed: set[Any], possible: dict[str, Values], max_seq_len: int) -> Values:
    """The superset of `expr`'s values from its inputs' supersets (see `possible_values`)."""
    if is_mean(expr):
        inner = possible[expr.sop.label]
        if inner is None or not {float(x) for x in inner} <= {0.0, 1.0}:
            return None  # tracr rejects means of other values; nothing sound to list
        return listed | {0} | (fractions(max_seq_len) if {float(x) for x in inner} == {0.0, 1.0} else inner)
    if isinstance(expr, rasp.Aggregate):
        return possible[expr.sop.label]
    if isinstance(expr, rasp.Map):
        inner = possible[expr.inner.label]
        return None if inner is None else defined_results(errors.ignoring_arithmetic_errors(expr.f), ((x,) for x in inner))
    if isinstance(expr, rasp.SequenceMap):
        fst, snd = possible[expr.fst.label], possible[expr.snd.label]
        if fst is None or snd is None or len(fst) * len(snd) > MAX_CHECKED:
            return None
        return defined_results(errors.ignoring_arithmetic_errors(expr.f), itertools.product(fst, snd))
    return listed


def defined_results(f: Callable[..., Any], arguments: Iterable[tuple[Any, ...]]) -> Values:
    """{f(*args)} without the undefined (None) results, or None if that is more than `MAX_CHECKED`."""
    results = {y for args in arguments for y in [f(*args)] if y is not None}
    return results if len(results) <= MAX_CHECKED else None


def widen(graph: nx.DiGraph, new_values: dict[str, set[Any]], max_seq_len: int) -> None:
    """Give the SOps in `new_values` those value sets and re-infer everything downstream, in place."""
    if not new_values:
        return
    downstream = set(new_values).union(*(nx.descendants(graph, label) for label in new_values))
    for label in nx.topological_sort(graph):
        expr = graph.nodes[label][nodes.EXPR]
        if label not in downstream or not isinstance(expr, rasp.SOp):
            continue
        values = new_values[label] if label in new_values else inferred_values(graph, expr, max_seq_len)
        graph.nodes[label][nodes.VALUE_SET] = values
        if rasp.is_categorical(expr):
            space = bases.VectorSpaceWithBasis.from_values(label, values)
            graph.nodes[label][nodes.OUTPUT_BASIS] = space.basis


def inferred_values(graph: nx.DiGraph, expr: rasp.SOp, max_seq_len: int) -> set[Any]:
    """tracr's value-set rule for a Map, SequenceMap or Aggregate, from its inputs' value sets."""

    def values_of(sop: rasp.SOp) -> set[Any]:
        return graph.nodes[sop.label][nodes.VALUE_SET]

    if isinstance(expr, rasp.Map):
        results = (errors.ignoring_arithmetic_errors(expr.f)(x) for x in values_of(expr.inner))
    elif isinstance(expr, rasp.SequenceMap):
        f = errors.ignoring_arithmetic_errors(expr.f)
        results = (f(x, y) for x, y in itertools.product(values_of(expr.fst), values_of(expr.snd)))
    elif isinstance(expr, rasp.Aggregate) and rasp.is_categorical(expr):
        results = iter(values_of(expr.sop))
    elif isinstance(expr, rasp.Aggregate):
        results = (x / n for x in values_of(expr.sop) for n in range(1, max_seq_len + 1))
    else:
        raise UnsupportedProgramError(
            f"Cannot infer the value set of {expr.label!r} downstream of a widened value set."
        )
    return {x for x in results if x is not None}


def unsettled_means(graph: nx.DiGraph, unchecked: set[str], possible: dict[str, Values], marked: set[str]) -> list[str]:
    """Unmarked numerical means, upstream of (or among) `unchecked`, whose real values tracr may not list."""
    upstream = unchecked.union(*(nx.ancestors(graph, label) for label in unchecked))
    return sorted(
        label
        for label in upstream
        if label not in marked
        and is_mean(graph.nodes[label][nodes.EXPR])
        and (possible[label] is None or not possible[label] <= graph.nodes[label][nodes.VALUE_SET])
    )
