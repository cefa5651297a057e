"""Out-of-distribution views that separate generalisation from bias (Dyck, issue 19).

In: per split, the per-example correctness and input lengths of a run's task accuracy.  Out: `almost_balanced`
accuracy per length bin (15-30, the training range, as its own row, then the lengths never trained) and the
balanced accuracy of `almost_balanced` (always "no") with its all-"yes" companion `balanced_long`
((acc_ab + acc_bl) / 2), so a model that says "no" to every long string scores 50%, not 100%.  Written into
metrics.json under `ood` (report.md shows them); other tasks get nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ALL_NO, ALL_YES = "almost_balanced", "balanced_long"
LENGTH_BINS: tuple[tuple[int, int], ...] = ((15, 30), (31, 45), (46, 60), (61, 75), (76, 90))
TRAIN_RANGE = (5, 30)
OOD_TASKS = ("dyck", "dyck_frac")


def bin_label(low: int, high: int) -> str:
    """`"15-30"`, or `"15-30 (train range)"` for a bin inside the training lengths."""
    inside = TRAIN_RANGE[0] <= low and high <= TRAIN_RANGE[1]
    return f"{low}-{high}" + (" (train range)" if inside else "")


def accuracy_by_length_bin(
    lengths: Sequence[int], correct: Sequence[bool], bins: Sequence[tuple[int, int]] = LENGTH_BINS
) -> dict[str, dict[str, float]]:
    """Per bin (inclusive bounds) with examples: n, correct and accuracy; lengths outside every bin are left out."""
    out = {}
    for low, high in bins:
        hits = [ok for n, ok in zip(lengths, correct) if low <= n <= high]
        if hits:
            out[bin_label(low, high)] = {
                "n": len(hits),
                "correct": sum(hits),
                "accuracy": sum(hits) / len(hits),
            }
    return out


def balanced_accuracy(all_no: float, all_yes: float) -> float:
    """Mean of the accuracies on an all-"no" and an all-"yes" split: 0.5 for a constant answer."""
    return (all_no + all_yes) / 2


def ood_views(task: str, accuracy: Mapping[str, Any]) -> dict[str, Any]:
    """The views of a task's accuracy (`SplitAccuracy` per split, predictions kept): `almost_balanced_by_length`
    and `balanced_accuracy` (when both its splits were scored); empty for tasks without them."""
    if task not in OOD_TASKS or ALL_NO not in accuracy:
        return {}
    predictions = accuracy[ALL_NO].predictions
    views: dict[str, Any] = {
        "almost_balanced_by_length": accuracy_by_length_bin(
            [p.meta["length"] for p in predictions], [p.correct for p in predictions]
        )
    }
    if ALL_YES in accuracy:
        views["balanced_accuracy"] = {
            "splits": [ALL_NO, ALL_YES],
            "accuracy": balanced_accuracy(accuracy[ALL_NO].accuracy, accuracy[ALL_YES].accuracy),
        }
    return views
