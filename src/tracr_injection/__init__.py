"""tracr-injection: distil RASP programs, compiled by tracr, into pre-trained causal LMs.

The package's top-level entry points.  In: a RASP program, a registered program's name or a saved
teacher folder.  Out: `compile_program` (RASP program -> validated PyTorch `TeacherModel`),
`get_program` (name -> `ProgramSpec`), `load_teacher` (teacher folder -> `TeacherModel`), the
`fraction_mean` annotation, `TeacherConfig` / `TeacherVariable` and `__version__`.

`compile_program` imports tracr and JAX, so it is loaded on first use (as are `get_program` and
`fraction_mean`, which need tracr); loading a saved teacher (`load_teacher`) needs neither.
"""

from importlib.metadata import version
from typing import Any

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel, TeacherVariable

__version__ = version("tracr-injection")  # pyproject.toml's, as installed (`pip install -e .`)

__all__ = [
    "TeacherConfig",
    "TeacherModel",
    "TeacherVariable",
    "__version__",
    "compile_program",
    "fraction_mean",
    "get_program",
    "load_teacher",
]


def load_teacher(path: Any) -> TeacherModel:
    """Load a teacher artifact folder (safetensors + teacher.json); no JAX needed."""
    return TeacherModel.from_pretrained(path)


def __getattr__(name: str) -> Any:
    """Import the tracr-dependent entry points lazily."""
    if name == "compile_program":
        from tracr_injection.compile.compiler import compile_program

        return compile_program
    if name == "fraction_mean":
        from tracr_injection.programs.annotations import fraction_mean

        return fraction_mean
    if name == "get_program":
        from tracr_injection.programs.registry import get_program

        return get_program
    raise AttributeError(f"module 'tracr_injection' has no attribute {name!r}")
