"""The package's layering: a bottom layer that imports no stage, and stages that import no later stage.

Every module under src/tracr_injection is parsed with `ast`; its imports (at module level, inside
functions and under `if TYPE_CHECKING`, `import x` and `from x import y`, relative ones resolved) are
mapped to the stage of the module they name.  Nothing is imported, so the test is fast and sees
imports that only run on some paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tracr_injection"

# Modules at the package root that every stage may import and that import no stage.
BOTTOM = ("errors", "registry", "paths")
BOTTOM_STAGE = "bottom"

# tracr_injection/__init__.py is not only metadata: it re-exports the compile stage's teacher classes and,
# lazily, `compile_program`, `get_program` and `fraction_mean`.  So it is a facade placed right after the
# stages it re-exports, and a later stage may read `tracr_injection.__version__` (inject/run.py does).
FACADE = "package __init__"

# Each stage imports only itself, earlier stages and the bottom.  hub (model and tokenizer lookup) imports
# only the bottom, and inject, evaluate and cli import it: it sits just before inject, which keeps
# programs, compile and tasks free of model lookups (a task is handed a tokenizer, it never finds one).
STAGE_ORDER = ("programs", "compile", FACADE, "tasks", "hub", "inject", "evaluate", "experiments", "cli")


def module_name(path: Path) -> str:
    """Dotted name of the module in `path` (a package's `__init__.py` is the package)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement anywhere in `source`, the source of `module`.

    `from a import b` names the module `a.b` when that is one of `known`, else `a`; a relative import is
    resolved against the package of `module` (`module` itself when `is_package`)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in known else base, node.lineno))
    return found


def stage_of(module: str) -> str | None:
    """The stage of a module of this package (None for another package's module, "?" if it has none)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return FACADE
    if parts[1] in BOTTOM:
        return BOTTOM_STAGE
    return parts[1] if parts[1] in STAGE_ORDER else "?"


def stage_imports() -> list[tuple[str, str, str, int]]:
    """(importing module, its stage, imported module of this package, line) for the whole package."""
    modules = package_modules()
    rows = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for imported, line in imported_modules(path.read_text(), module, is_package, set(modules)):
            if stage_of(imported) is not None:
                rows.append((module, stage_of(module), imported, line))
    return rows


def test_every_module_has_a_stage():
    unplaced = [module for module in package_modules() if stage_of(module) == "?"]
    assert not unplaced, f"put these in BOTTOM or STAGE_ORDER of {Path(__file__).name}: {unplaced}"
    assert {stage_of(module) for module in package_modules()} == {*STAGE_ORDER, BOTTOM_STAGE}


def test_bottom_imports_no_stage():
    bad = [
        f"{module}:{line} imports {imported}"
        for module, stage, imported, line in stage_imports()
        if stage == BOTTOM_STAGE and stage_of(imported) != BOTTOM_STAGE
    ]
    assert not bad, "the bottom layer must import no stage:\n" + "\n".join(bad)


def test_no_stage_imports_a_later_stage():
    bad = [
        f"{module}:{line} ({stage}) imports {imported} ({stage_of(imported)})"
        for module, stage, imported, line in stage_imports()
        if stage != BOTTOM_STAGE
        and stage_of(imported) != BOTTOM_STAGE
        and STAGE_ORDER.index(stage_of(imported)) > STAGE_ORDER.index(stage)
    ]
    assert not bad, f"a stage imports a later one (order: {' -> '.join(STAGE_ORDER)}):\n" + "\n".join(bad)


def test_imports_are_found_anywhere_and_resolved():
    source = """
import tracr_injection.cli.main
from tracr_injection import errors, __version__
from . import base
if TYPE_CHECKING:
    from ..compile.teacher import TeacherModel

class Task:
    def teacher(self):
        from ..inject import trainer
        from .. import paths
"""
    known = {"tracr_injection.errors", "tracr_injection.paths", "tracr_injection.tasks.base",
             "tracr_injection.inject.trainer", "tracr_injection.compile.teacher"}  # fmt: skip
    found = imported_modules(source, "tracr_injection.tasks.dyck", False, known)
    assert sorted(found, key=lambda row: row[1]) == [
        ("tracr_injection.cli.main", 2),
        ("tracr_injection.errors", 3),
        ("tracr_injection", 3),
        ("tracr_injection.tasks.base", 4),
        ("tracr_injection.compile.teacher", 6),
        ("tracr_injection.inject.trainer", 10),
        ("tracr_injection.paths", 11),
    ]
    assert imported_modules("from . import base", "tracr_injection.tasks", True, known) == [
        ("tracr_injection.tasks.base", 1)
    ]
