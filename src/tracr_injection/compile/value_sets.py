"""Value sets of fraction means: a correction to tracr's basis inference.

In: tracr's program graph after `basis_inference.infer_bases`, and the maximum length.  Out: the
same graph, where every numerical mean marked with `programs.annotations.fraction_mean` has the
value set {k/n : 0 <= k <= n <= max_seq_len} instead of tracr's {0} and {1/n}, and every SOp
downstream of one has its value set (and, if categorical, its basis) inferred again from the
corrected inputs with tracr's rules.  Without this, an MLP reading a fraction discretises it at the
wrong thresholds; with it, the compiled model agrees with the RASP evaluator.
"""

from __future__ import annotations

import itertools
from typing import Any

import networkx as nx
from tracr.compiler import nodes
from tracr.craft import bases
from tracr.rasp import rasp
from tracr.utils import errors

from tracr_injection.programs.annotations import is_fraction_mean


def fractions(max_seq_len: int) -> set[float]:
    """Every value a mean of 0/1 values over 1..max_seq_len positions can take (0 included)."""
    return {k / n for n in range(1, max_seq_len + 1) for k in range(n + 1)}


def widen_fraction_means(graph: nx.DiGraph, max_seq_len: int) -> None:
    """Give marked fraction means their full value set and re-infer everything downstream, in place."""
    marked = {label for label, node in graph.nodes.items() if is_fraction_mean(node[nodes.EXPR])}
    if not marked:
        return
    downstream = marked.union(*(nx.descendants(graph, label) for label in marked))
    for label in nx.topological_sort(graph):
        expr = graph.nodes[label][nodes.EXPR]
        if label not in downstream or not isinstance(expr, rasp.SOp):
            continue
        values = fractions(max_seq_len) if label in marked else inferred_values(graph, expr, max_seq_len)
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
        raise ValueError(f"Cannot infer the value set of {expr.label!r} downstream of a fraction mean.")
    return {x for x in results if x is not None}
