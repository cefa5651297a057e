"""`tracr-inject ood`: is injection better out of distribution? Dyck, K seeds per method, paired (issue 19).

In: the number of seeds, the inject setting (the sweep's choice in `results/injection/gate.json` when present,
else a named sweep setting, else today's inject) and a budget (`ood`: the `cpu` budget's training, 400 steps at
batch 8, plus task accuracy every 100 steps; evaluation of accuracy on all 1,000 examples of the test split and
of every OOD split, decoding and causal tests on the `cpu` budget's subsets).  Out: run folders under
`runs/ood/<budget>/dyck-<method>-s<seed>` and, as soon as each run is evaluated, `results/ood/`: each run's
evaluation (no weights), manifest, record, metrics.jsonl with the accuracy lines and its curves; the comparison
with its paired statistics (`compare_runs`: comparison.md, paired.json/csv/png); `summary.json`
(`{"task", "seeds", "examples_per_split", "splits": {SPLIT: {"baseline_mean", "inject_mean", "gain_mean",
"gain_ci95", "gain_t95"}}}`, accuracies in 0..1, over the seeds both methods finished; `gain_t95` is the
Student-t interval beside the bootstrap's, which is too narrow with few seeds); `accuracy_curves.{json,png}` (mean ±
std over seeds per method and split vs step) and `experiment.json`.  Runs are claimed, resumed and skipped as
`reproduce`'s (the same code), so two one-thread workers can share the plan and a lost machine loses at most
one run.  Same seed = same data order and the same evaluation sets for both methods.  `results/cpu/` runs are
not reused: they were evaluated on 200 examples per split, without the new splits and without accuracy lines,
and their config lacks `accuracy_every`, so they never match this plan's configuration.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracr_injection.evaluate.compare import compare_runs, load_metrics, paired_statistics
from tracr_injection.evaluate.pipeline import EvalSettings
from tracr_injection.experiments.budgets import CPU, Budget, get_budget
from tracr_injection.experiments.reproduce import (
    PlannedRun,
    eval_settings,
    plan_runs,
    publish_evaluated,
    run_claimed,
    status_rows,
)
from tracr_injection.experiments.settings import GATE, inject_setting
from tracr_injection.inject.config import METHODS
from tracr_injection.inject.probing import accuracy_series, plot_accuracy_curves, read_probe_lines
from tracr_injection.inject.run import ACCURACY_PLOT, versions

TASK = "dyck"
SEEDS = 5
ACCURACY_EVERY = 100
FULL_SPLITS = 1000  # accuracy on every example of every evaluated split
VERDICT_SPLIT = "almost_balanced"
BIAS_CHECK = "balanced acc (almost_balanced, balanced_long)"
MIN_EFFECT = 0.05  # the smallest out-of-distribution gain worth claiming: 5 points
VERDICT_RULE = (
    "supported: the 95% t interval of the paired almost_balanced gain lies above 0 and so does the balanced "
    "accuracy's (almost_balanced with the all-yes balanced_long, so a bias towards 'no' does not count); not "
    "supported: the almost_balanced interval lies below +5 points (a gain worth claiming is ruled out); else "
    "not decidable at this budget. Fixed on 2026-12-05 with 2 of 5 seed pairs seen."
)

OOD = Budget(
    name="ood",
    description="the cpu budget's training (400 steps at batch 8, LR 1e-5 / 1e-3) with task accuracy every 100 "
    "steps on 200 fixed examples per split; accuracy on all 1,000 examples of every evaluated split, decoding and "
    "causal tests on the cpu budget's subsets",
    steps=CPU.steps,
    train={**CPU.train, "accuracy_every": ACCURACY_EVERY},
    eval_examples=FULL_SPLITS,
    probe_examples=CPU.probe_examples,
    causal_examples=CPU.causal_examples,
    language_windows=CPU.language_windows,
    checkpoint_every=CPU.checkpoint_every,
)


def ood_budget(name: str) -> Budget:
    """The `ood` budget, or a `reproduce` budget by name (`smoke` for tests), with accuracy lines every
    `ACCURACY_EVERY` steps (every other step for a budget shorter than that)."""
    if name == OOD.name:
        return OOD
    budget = get_budget(name)
    every = min(ACCURACY_EVERY, max(1, budget.steps["default"] // 2))
    return dataclasses.replace(budget, train={**budget.train, "accuracy_every": every})


def ood_eval_settings(budget: Budget) -> EvalSettings:
    """Accuracy on `budget.eval_examples` per split; decoding, readout and causal tests on the cpu budget's
    subsets (`ood`) or the budget's own (others)."""
    if budget is OOD:
        return dataclasses.replace(eval_settings(CPU), max_examples=OOD.eval_examples)
    return eval_settings(budget)


def plan_ood(
    seeds: int,
    choice: Mapping[str, Any],
    budget: Budget,
    runs_root: Path,
    results_root: Path,
    model: str = "smollm2",
    task: str = TASK,
) -> list[PlannedRun]:
    """Seed by seed, baseline then inject (the chosen setting's overrides); both with the chosen teacher;
    published to `results_root/runs/<run>`."""
    return plan_runs(
        [task], seeds, budget, runs_root, model, results_root, setting=choice, published_root=results_root
    )


def verdict(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The headline's answer by a rule fixed before the last seeds were seen (`VERDICT_RULE`): "supported",
    "not supported" or "not decidable", from the Student-t intervals of the paired gains (the bootstrap's are
    too narrow with a handful of seeds)."""
    gain, bias = splits[VERDICT_SPLIT], splits[BIAS_CHECK]
    low, high = gain["gain_t95"]
    bias_low = bias["gain_t95"][0]
    if low is None or bias_low is None:
        answer = "not decidable"  # one seed: no interval
    elif low > 0 and bias_low > 0:
        answer = "supported"
    elif high < MIN_EFFECT:
        answer = "not supported"
    else:
        answer = "not decidable"
    return {
        "answer": answer,
        "rule": VERDICT_RULE,
        "split": VERDICT_SPLIT,
        "gain_mean": gain["gain_mean"],
        "gain_t95": [low, high],
        "bias_check": BIAS_CHECK,
        "bias_check_gain_t95": bias["gain_t95"],
        "min_effect": MIN_EFFECT,
    }


def verdict_line(summary_json: Mapping[str, Any]) -> str:
    """The headline in one line: the verdict with the gain it rests on, or why there is none yet."""
    found = summary_json.get("verdict")
    if found is None:
        return f"No verdict: {VERDICT_SPLIT} or its bias check was not measured."
    low, high = found["gain_t95"]
    interval = (
        "no interval (one seed)" if low is None else f"95% t interval {100 * low:+.1f}..{100 * high:+.1f}"
    )
    return (
        f"Injection generalises better out of distribution: {found['answer']} ({summary_json['seeds']} seed pairs, "
        f"{found['split']} gain {100 * found['gain_mean']:+.1f} points, {interval}; rule in summary.json)."
    )


def summary(paired: Mapping[str, Any], task: str, examples_per_split: int) -> dict[str, Any]:
    """summary.json in the issue's format (accuracies in 0..1) from `compare.paired_statistics`, with the
    headline's `verdict` where the split it rests on was measured."""
    splits = {
        split: {k: r[k] for k in ("baseline_mean", "inject_mean", "gain_mean", "gain_ci95", "gain_t95")}
        for split, r in paired["splits"].items()
    }
    result = {
        "task": task,
        "seeds": len(paired["seeds"]),
        "examples_per_split": examples_per_split,
        "splits": splits,
    }
    if VERDICT_SPLIT in splits and BIAS_CHECK in splits:
        result["verdict"] = verdict(splits)
    return result


def mean_curves(runs: Sequence[PlannedRun]) -> dict[str, Any]:
    """Per method and split, mean and std over seeds of the accuracy at each step all its runs measured."""
    curves: dict[str, Any] = {}
    for method in METHODS:
        series = []
        for run in runs:
            path = run.published_folder.metrics_file
            if run.method == method and path.is_file():
                series.append(accuracy_series(read_probe_lines(path)))
        if not series:
            continue
        curves[method] = {"runs": len(series), "splits": {}}
        for split in series[0]:
            steps = sorted(set.intersection(*(set(dict(s.get(split, [])).keys()) for s in series)))
            values = [[dict(s[split])[step] for s in series] for step in steps]
            curves[method]["splits"][split] = {
                "steps": steps,
                "mean": [statistics.fmean(v) for v in values],
                "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
            }
    return curves


def write_curves(curves: Mapping[str, Any], folder: Path) -> None:
    """accuracy_curves.json and accuracy_curves.png (a panel per split, a line per method, ± std bands)."""
    (folder / "accuracy_curves.json").write_text(json.dumps(curves, indent=2))
    lines = {f"{m} (n={c['runs']})": {s: list(zip(v["steps"], v["mean"])) for s, v in c["splits"].items()}
             for m, c in curves.items()}  # fmt: skip
    spread = {
        f"{m} (n={c['runs']})": {s: v["std"] for s, v in c["splits"].items()} for m, c in curves.items()
    }
    plot_accuracy_curves(lines, folder / ACCURACY_PLOT, spread)


def publish_ood(
    runs: Sequence[PlannedRun], results_root: Path, budget: Budget, choice: Mapping[str, Any], command: str
) -> Path:
    """Publish every evaluated run, then the comparison with paired statistics, summary.json, the accuracy
    curves over seeds and experiment.json."""
    results_root.mkdir(parents=True, exist_ok=True)
    finished = publish_evaluated(runs)
    if finished:
        compare_runs([r.published for r in finished], results_root)
        metrics = {r.name: load_metrics(r.published) for r in finished}
        by_method = {m: [metrics[r.name] for r in finished if r.method == m] for m in METHODS}
        paired = paired_statistics(by_method)
        if paired is not None:
            examples = min(m["accuracy"][s]["n"] for m in metrics.values() for s in m["accuracy"])
            summary_json = summary(paired, runs[0].task, examples)
            (results_root / "summary.json").write_text(json.dumps(summary_json, indent=2))
        write_curves(mean_curves(finished), results_root)
    (results_root / "experiment.json").write_text(
        json.dumps(
            {
                "budget": dataclasses.asdict(budget),
                "eval_settings": dataclasses.asdict(ood_eval_settings(budget)),
                "inject_setting": dict(choice),
                "command": command,
                "versions": versions(),
                "runs": [
                    {"train_command": r.config.command(), **row} for r, row in zip(runs, status_rows(runs))
                ],
            },
            indent=2,
        )
    )
    return results_root


def ood(
    seeds: int = SEEDS,
    setting: str | None = None,
    budget_name: str = OOD.name,
    *,
    gate: Path = GATE,
    runs_root: Path = Path("runs/ood"),
    results_root: Path = Path("results/ood"),
    model: str = "smollm2",
    task: str = TASK,
    progress: bool = True,
    command: str = "",
    on_run: Callable[[PlannedRun, str], None] | None = None,
    publish_only: bool = False,
) -> Path:
    """Bring every planned run to 'evaluated' (skipping finished runs and runs another live process holds),
    publishing after each; with `publish_only`, only publish what is evaluated (the verdict included)."""
    budget = ood_budget(budget_name)
    choice = inject_setting(setting, gate)
    runs = plan_ood(seeds, choice, budget, runs_root, results_root, model, task)
    settings = ood_eval_settings(budget)
    if not publish_only:
        for run in runs:
            if run_claimed(run, settings, on_run, progress):
                publish_ood(runs, results_root, budget, choice, command)
    return publish_ood(runs, results_root, budget, choice, command)
