"""A stable hash of a RASP program, for caching compiled teachers.

In: a RASP expression.  Out: a hex digest that changes when anything tracr would compile
differently changes: the graph's structure, names, encodings, this project's `fraction_mean`
mark, comparison predicates, constants, and the code (bytecode, constants and closure values) of
every Map/SequenceMap function.  Memory addresses in reprs are blanked and sets are written sorted
(their iteration order follows the per-process string hash seed), so the hash is the same across
processes.
"""

from __future__ import annotations

import hashlib
import re
import types
from typing import Any

from tracr.rasp import rasp

from tracr_injection.programs.annotations import FRACTION_MEAN, is_fraction_mean

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def program_hash(program: rasp.RASPExpr, *extra: Any) -> str:
    """sha256 over the program's canonical description and any `extra` compile settings."""
    order = walk(program)
    position = {id(expr): i for i, expr in enumerate(order)}
    lines = [describe_expr(expr, position) for expr in order]
    lines.extend(stable_repr(x) for x in extra)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def walk(program: rasp.RASPExpr) -> list[rasp.RASPExpr]:
    """Every expression reachable from `program`, each once, children before parents."""
    order: list[rasp.RASPExpr] = []
    seen: set[int] = set()
    stack: list[tuple[rasp.RASPExpr, bool]] = [(program, False)]
    while stack:
        expr, expanded = stack.pop()
        if expanded:
            order.append(expr)
            continue
        if id(expr) in seen:
            continue
        seen.add(id(expr))
        stack.append((expr, True))
        stack.extend((child, False) for child in reversed(expr.children))
    return order


def describe_expr(expr: rasp.RASPExpr, position: dict[int, int]) -> str:
    """One line naming the expression, its annotations, children and own attributes.

    Children are named by their place in the walk, not by label: labels carry a
    process-wide counter, so the same program would hash differently in each process.
    """
    children = [position[id(child)] for child in expr.children]
    child_ids = {id(child) for child in expr.children}
    attributes = {
        key: describe_value(value)
        for key, value in sorted(vars(expr).items())
        if key not in ("_annotations", "unique_id") and id(value) not in child_ids
    }
    # Read name and encoding explicitly: tracr fills default annotations in lazily, so
    # iterating `expr.annotations` would give a different answer after a compile.
    annotations = {"name": expr.name}
    if isinstance(expr, rasp.SOp):
        annotations["encoding"] = rasp.get_encoding(expr).value
    if is_fraction_mean(expr):
        annotations[FRACTION_MEAN] = True
    return stable_repr((type(expr).__name__, annotations, children, attributes))


def describe_value(value: Any) -> str:
    """A process-independent description of an attribute (functions by their code)."""
    if isinstance(value, types.FunctionType):
        return describe_function(value)
    if isinstance(value, rasp.RASPExpr):
        return f"expr:{value.name}"
    return stable_repr(value)


def describe_function(fn: types.FunctionType) -> str:
    """A function by its bytecode, constants, names, defaults and closure contents."""
    closure = [describe_value(cell.cell_contents) for cell in fn.__closure__ or ()]
    return stable_repr((describe_code(fn.__code__), fn.__defaults__, closure, sorted(fn.__code__.co_names)))


def describe_code(code: types.CodeType) -> str:
    """Bytecode plus constants, recursing into nested code objects."""
    consts = [describe_code(c) if isinstance(c, types.CodeType) else stable_repr(c) for c in code.co_consts]
    return stable_repr((code.co_code.hex(), consts))


def stable_repr(value: Any) -> str:
    """`repr` with memory addresses removed and sets (also inside tuples, lists, dicts) sorted."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(stable_repr(x) for x in value)) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(stable_repr(x) for x in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{stable_repr(k)}: {stable_repr(v)}" for k, v in value.items()) + "}"
    return _ADDRESS.sub("", repr(value))
