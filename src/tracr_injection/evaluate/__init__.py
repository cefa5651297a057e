"""Evaluate stage: task accuracy in and out of distribution, kept language ability, decoding the
program's variables from the LM, causal tests on the injected subspace, reports and comparisons.

In: a trained run folder (or a plain model name) and its task.  Out: metrics, report and plots.
Each part is importable from here; its module (and transformers/matplotlib) loads on first use.
"""

import importlib
from typing import Any

_MODULE_OF = {
    "evaluate_target": "pipeline",
    "task_accuracy": "accuracy",
    "language_metrics": "language",
    "evaluate_decoding": "decoding",
    "fit_task_probe": "probe",
    "answer_readout": "readout",
    "causal_tests": "causal",
    "write_report": "report",
    "compare_runs": "compare",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first access."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'tracr_injection.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tracr_injection.evaluate.{_MODULE_OF[name]}"), name)
