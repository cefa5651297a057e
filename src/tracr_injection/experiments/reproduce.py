"""`tracr-inject reproduce`: train and evaluate inject and baseline runs per task and seed, then compare.

In: tasks, seeds and a budget.  Out: run folders under `runs/reproduce/<budget>/` and, under
`results/<budget>/`, the comparison table (Markdown, CSV), plots, every run's evaluation
(metrics.json, report.md, plots; no weights), the exact commands, versions and the wall time of
each run.  It is safe to run again and again: finished runs are skipped, partial runs resume from
their last checkpoint, unevaluated runs are evaluated, so a reclaimed machine loses at most the
steps since a run's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tracr_injection.evaluate.compare import compare_runs
from tracr_injection.evaluate.pipeline import EVAL_DIR, EvalSettings, evaluate_target
from tracr_injection.experiments.budgets import METHODS, Budget, get_budget
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.trainer import MANIFEST_NAME, METRICS_NAME, checkpoint_dirs, train, versions

RECORD_NAME = "reproduce.json"


@dataclasses.dataclass
class PlannedRun:
    """One (task, method, seed) run of a budget: its training config and where it lives."""

    task: str
    method: str
    seed: int
    config: TrainConfig

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.config.out)

    @property
    def name(self) -> str:
        """`task-method-sSEED`."""
        return self.out.name


def plan_runs(
    tasks: Sequence[str], seeds: int, budget: Budget, runs_root: Path, model: str = "smollm2"
) -> list[PlannedRun]:
    """Every run of the experiment, baseline before inject for each (task, seed)."""
    runs = []
    for task in tasks:
        for seed in range(seeds):
            for method in METHODS:
                out = runs_root / budget.name / f"{task}-{method}-s{seed}"
                fields = budget.train_fields(task)
                config = TrainConfig(task=task, method=method, model=model, seed=seed, out=str(out), **fields)
                runs.append(PlannedRun(task, method, seed, config))
    return runs


def steps_done(run: PlannedRun) -> int:
    """Training steps a run has finished (all of them once its manifest exists)."""
    if (run.out / MANIFEST_NAME).is_file():
        return run.config.steps
    checkpoints = checkpoint_dirs(run.out)
    return int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0


def run_state(run: PlannedRun) -> str:
    """evaluated / trained / partial / todo."""
    if (run.out / EVAL_DIR / "metrics.json").is_file():
        return "evaluated"
    if (run.out / MANIFEST_NAME).is_file():
        return "trained"
    return "partial" if steps_done(run) else "todo"


def status_rows(runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """One row per run: name, state, steps done / planned, recorded wall times."""
    rows = []
    for run in runs:
        record = read_record(run.out)
        rows.append(
            {
                "run": run.name,
                "state": run_state(run),
                "steps": f"{steps_done(run)}/{run.config.steps}",
                "train_seconds": record.get("train_seconds"),
                "eval_seconds": record.get("eval_seconds"),
            }
        )
    return rows


def read_record(out: Path) -> dict[str, Any]:
    """The run's reproduce record (wall times, commands), empty before the run starts."""
    path = out / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def update_record(out: Path, **fields: Any) -> None:
    """Merge `fields` into the run's reproduce record."""
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out) | fields
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2))


def training_seconds(out: Path) -> float:
    """Wall time of the training steps, summed from metrics.jsonl (survives interruptions and resumes)."""
    path = out / METRICS_NAME
    if not path.is_file():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line)


def train_command(run: PlannedRun) -> str:
    """The `tracr-inject train` command that reproduces this run alone."""
    config = run.config
    skip = {"out", "task", "method", "model", "seed"}
    flags = [
        f"--task {config.task}",
        f"--method {config.method}",
        f"--model {config.model}",
        f"--seed {config.seed}",
    ]
    defaults = TrainConfig().to_dict()
    for key, value in config.to_dict().items():
        if key not in skip and value != defaults[key] and value is not None:
            flags.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return f"tracr-inject train {' '.join(flags)} --out {config.out}"


def execute_run(run: PlannedRun, settings: EvalSettings, progress: bool) -> None:
    """Train (or resume) the run unless it is trained, then evaluate it unless it is evaluated."""
    state = run_state(run)
    if state in ("todo", "partial"):
        began = time.perf_counter()
        update_record(run.out, train_command=train_command(run), state="training")
        train(run.config, resume=state == "partial", progress=progress)
        update_record(
            run.out,
            train_seconds=round(training_seconds(run.out), 1),
            last_attempt_seconds=round(time.perf_counter() - began, 1),
        )
    if run_state(run) == "trained":
        began = time.perf_counter()
        evaluate_target(run.out, settings=settings, progress=progress)
        update_record(run.out, eval_seconds=round(time.perf_counter() - began, 1), state="evaluated")


def eval_settings(budget: Budget) -> EvalSettings:
    """The evaluation sizes of a budget."""
    return EvalSettings(
        max_examples=budget.eval_examples,
        probe_examples=budget.probe_examples,
        decoding_examples=min(256, budget.eval_examples),
        causal_examples=budget.causal_examples,
        interchange_pairs=budget.causal_examples,
        language_windows=budget.language_windows,
    )


def publish_results(runs: Sequence[PlannedRun], budget: Budget, results_root: Path, command: str) -> Path:
    """Copy every evaluated run's eval folder (no weights, no probe) and write the comparison, commands and versions."""
    target = results_root / budget.name
    target.mkdir(parents=True, exist_ok=True)
    evaluated = [r for r in runs if run_state(r) == "evaluated"]
    for run in evaluated:
        dest = target / "runs" / run.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run.out / EVAL_DIR, dest, ignore=shutil.ignore_patterns("*.safetensors"))
        for name in (MANIFEST_NAME, RECORD_NAME):
            if (run.out / name).is_file():
                shutil.copy2(run.out / name, dest / name)
    if evaluated:
        compare_runs([r.out for r in evaluated], target)
    (target / "experiment.json").write_text(
        json.dumps(
            {
                "budget": dataclasses.asdict(budget),
                "command": command,
                "versions": versions(),
                "runs": [
                    {"run": r.name, "train_command": train_command(r), **row}
                    for r, row in zip(runs, status_rows(runs))
                ],
            },
            indent=2,
        )
    )
    return target


def reproduce(
    tasks: Sequence[str],
    seeds: int,
    budget_name: str,
    *,
    runs_root: Path = Path("runs/reproduce"),
    results_root: Path = Path("results"),
    model: str = "smollm2",
    progress: bool = True,
    command: str = "",
    on_run: Callable[[PlannedRun, str], None] | None = None,
) -> Path:
    """Bring every planned run to 'evaluated' (skipping what is done), then publish the comparison."""
    budget = get_budget(budget_name)
    runs = plan_runs(tasks, seeds, budget, runs_root, model)
    settings = eval_settings(budget)
    for run in runs:
        if on_run is not None:
            on_run(run, run_state(run))
        execute_run(run, settings, progress)
    return publish_results(runs, budget, results_root, command)
