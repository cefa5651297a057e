"""`tracr-inject reproduce`: train and evaluate inject and baseline runs per task and seed, then compare.

In: tasks, seeds and a budget.  Out: run folders under `runs/reproduce/<budget>/` and, under
`results/<budget>/`, the comparison table (Markdown, CSV), plots, every run's evaluation
(metrics.json, report.md, plots; no weights), the exact commands, versions and the wall time of
each run.  It is safe to run again and again: finished runs are skipped, partial runs resume from
their last checkpoint, unevaluated runs are evaluated, so a reclaimed machine loses at most the
steps since a run's last checkpoint (a trained run's checkpoints are deleted).  Each run is
published to `results/` as soon as it is evaluated, and a run whose published evaluation matches
its planned configuration counts as done even when its run folder is gone (a fresh machine with the
committed results picks up where the last one stopped).  Several `reproduce` processes can share one plan: each claims a run with a
lock file in the run folder and skips runs another live process holds.  `fresh_root` gives a plan a
new folder of its own (runs and results), so it trains and evaluates everything again while the
committed results stay untouched as the reference (the README's main job, `make demo`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracr_injection.evaluate.compare import compare_runs
from tracr_injection.evaluate.pipeline import EvalSettings, add_split_parts, evaluate_target
from tracr_injection.experiments.budgets import Budget, get_budget
from tracr_injection.inject.config import METHODS, TrainConfig
from tracr_injection.inject.run import RunFolder, versions
from tracr_injection.inject.trainer import train

DONE_STATES = ("evaluated", "published")


@dataclasses.dataclass
class PlannedRun:
    """One (task, method, seed) run of a budget: its training config and where it lives."""

    task: str
    method: str
    seed: int
    config: TrainConfig
    published: Path  # where its evaluation goes under results/<budget>/runs/

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.config.out)

    @property
    def folder(self) -> RunFolder:
        """The run folder's layout."""
        return RunFolder(self.out)

    @property
    def published_folder(self) -> RunFolder:
        """The published copy: a run folder without weights, its evaluation at the top."""
        return RunFolder(self.published)

    @property
    def name(self) -> str:
        """`task-method-sSEED`."""
        return self.out.name


def plan_runs(
    tasks: Sequence[str],
    seeds: int,
    budget: Budget,
    runs_root: Path,
    model: str = "smollm2",
    results_root: Path = Path("results"),
    methods: Sequence[str] = METHODS,
    alignment_scales: Mapping[str, float] | None = None,
    setting: Mapping[str, Any] | None = None,
    published_root: Path | None = None,
) -> list[PlannedRun]:
    """Every run of the experiment: seed by seed, each task in turn, baseline before inject, so an
    experiment stopped part-way has covered every task before it repeats one with a new seed.
    `alignment_scales` (see `TrainConfig`) and the chosen `setting`'s overrides (`settings.inject_setting`)
    go to the inject runs (the baseline has no alignment); both methods train with the setting's teacher.
    Runs are published to `published_root/runs/<run>` (default `results_root/<budget>`)."""
    published = published_root if published_root is not None else results_root / budget.name
    runs = []
    teacher = setting.get("teacher") if setting else None
    for seed in range(seeds):
        for task in tasks:
            for method in methods:
                name = f"{task}-{method}-s{seed}"
                fields = budget.train_fields(task)
                if method == "inject" and setting:
                    fields.update(setting["overrides"])
                if method == "inject" and alignment_scales:
                    fields["alignment_scales"] = dict(alignment_scales)
                config = TrainConfig(
                    task=task, method=method, model=model, seed=seed, out=str(runs_root / budget.name / name),
                    teacher=teacher, **fields,
                )  # fmt: skip
                runs.append(PlannedRun(task, method, seed, config, published / "runs" / name))
    return runs


def fresh_root(runs_root: Path, budget_name: str) -> Path:
    """A new, empty folder `runs_root/<budget>-<YYYYmmdd-HHMMSS>` (`-2`, `-3`, ... when taken) for a plan
    that must run anew: its run folders go in it, its results in `results/` inside it."""
    stamp = f"{budget_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        root = runs_root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            root.mkdir()
        except FileExistsError:
            continue
        return root
    raise FileExistsError(f"{runs_root} already holds 999 folders named {stamp}*; clean it up.")


def steps_done(run: PlannedRun) -> int:
    """Training steps a run has finished (all of them once its manifest exists)."""
    return run.config.steps if run.folder.is_finished else run.folder.last_checkpoint_step()


def is_published(run: PlannedRun) -> bool:
    """Whether results/ holds this run's evaluation, trained with exactly the planned configuration."""
    published = run.published_folder
    if published.find_evaluation() is None or not published.is_finished:
        return False
    trained = published.read_manifest().config
    return trained is not None and dataclasses.replace(trained, out=run.config.out) == run.config


def run_state(run: PlannedRun) -> str:
    """evaluated / published (evaluated on an earlier machine) / trained / partial / todo."""
    if run.folder.evaluation_file.is_file():
        return "evaluated"
    if is_published(run):
        return "published"
    if run.folder.is_finished:
        return "trained"
    return "partial" if steps_done(run) else "todo"


def lock_holder(run: PlannedRun) -> str | None:
    """`host:pid` of the live process working on this run, or None (a dead process's lock does not count)."""
    try:
        host, pid = run.folder.lock_file.read_text().split(":")
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return f"{host}:{pid}"
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return None
    except PermissionError:
        pass
    return f"{host}:{pid}"


def claim(run: PlannedRun) -> bool:
    """Take the run's lock for this process; False when another live process holds it."""
    run.out.mkdir(parents=True, exist_ok=True)
    path = run.folder.lock_file
    me = f"{socket.gethostname()}:{os.getpid()}"
    if path.exists() and lock_holder(run) is None:
        path.unlink(missing_ok=True)  # left by a process that died
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text() == me
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return True


def release(run: PlannedRun) -> None:
    """Drop this process's lock on the run."""
    run.folder.lock_file.unlink(missing_ok=True)


def status_rows(runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """One row per run: name, state, steps done / planned, recorded wall times."""
    rows = []
    for run in runs:
        state = run_state(run)
        record = read_record(run.published if state == "published" else run.out)
        if state not in DONE_STATES and lock_holder(run):
            state = f"running ({lock_holder(run)})"
        rows.append(
            {
                "run": run.name,
                "state": state,
                "steps": f"{run.config.steps if state == 'published' else steps_done(run)}/{run.config.steps}",
                "train_seconds": record.get("train_seconds"),
                "eval_seconds": record.get("eval_seconds"),
            }
        )
    return rows


def read_record(out: Path) -> dict[str, Any]:
    """The run's reproduce record (wall times, commands), empty before the run starts."""
    path = RunFolder(out).record_file
    return json.loads(path.read_text()) if path.is_file() else {}


def update_record(out: Path, **fields: Any) -> None:
    """Merge `fields` into the run's reproduce record."""
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out) | fields
    RunFolder(out).record_file.write_text(json.dumps(record, indent=2))


def training_seconds(out: Path) -> float:
    """Wall time of the training steps, summed from metrics.jsonl (survives interruptions and resumes)."""
    path = RunFolder(out).metrics_file
    if not path.is_file():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line)


def execute_run(run: PlannedRun, settings: EvalSettings, progress: bool, baseline: Path | None = None) -> None:
    """Train (or resume) the run unless it is trained, drop its checkpoints, then evaluate it unless it is
    evaluated (adding the answer readout to an evaluation made before it existed); `baseline`, an evaluated
    baseline run, adds its probe beside the map's decoding (`evaluate_target`)."""
    state = run_state(run)
    if state in ("todo", "partial"):
        began = time.perf_counter()
        update_record(run.out, train_command=run.config.command(), state="training")
        train(run.config, resume=state == "partial", progress=progress)
        update_record(
            run.out,
            train_seconds=round(training_seconds(run.out), 1),
            last_attempt_seconds=round(time.perf_counter() - began, 1),
        )
    if run.folder.is_finished:
        run.folder.remove_checkpoints()  # trained: a 400-step SmolLM2 run would keep 3.2 GB of them
    if run_state(run) == "trained":
        began = time.perf_counter()
        evaluate_target(run.out, settings=settings, progress=progress, baseline=baseline)
        update_record(run.out, eval_seconds=round(time.perf_counter() - began, 1), state="evaluated")
    if "readout" not in json.loads(run.folder.evaluation_file.read_text()):
        add_split_parts(run.out, progress=progress)  # evaluated before the readout existed


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


def publish_run(run: PlannedRun) -> None:
    """Copy an evaluated run's eval folder (no weights, no probe), manifest, record, training metrics
    (`metrics.jsonl`: every step's losses and the probe lines, small), probe and accuracy curves to
    results/."""
    run.folder.publish(run.published)


def publish_evaluated(runs: Sequence[PlannedRun]) -> list[PlannedRun]:
    """Publish every evaluated run; return the finished ones (evaluated or published), in plan order."""
    for run in runs:
        if run_state(run) == "evaluated":
            publish_run(run)
    return [r for r in runs if run_state(r) in DONE_STATES]


def publish_results(runs: Sequence[PlannedRun], budget: Budget, results_root: Path, command: str) -> Path:
    """Publish every evaluated run and write the comparison of all finished runs, commands and versions."""
    target = results_root / budget.name
    target.mkdir(parents=True, exist_ok=True)
    finished = publish_evaluated(runs)
    if finished:
        compare_runs([r.published for r in finished], target)
    (target / "experiment.json").write_text(
        json.dumps(
            {
                "budget": dataclasses.asdict(budget),
                "command": command,
                "versions": versions(),
                "runs": [
                    {"run": r.name, "train_command": r.config.command(), **row}
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
    methods: Sequence[str] = METHODS,
    alignment_scales: Mapping[str, float] | None = None,
    setting: Mapping[str, Any] | None = None,
    progress: bool = True,
    command: str = "",
    on_run: Callable[[PlannedRun, str], None] | None = None,
) -> Path:
    """Bring every planned run to 'evaluated' (skipping what is done or claimed by another live process),
    publishing the comparison after each run."""
    budget = get_budget(budget_name)
    runs = plan_runs(tasks, seeds, budget, runs_root, model, results_root, methods, alignment_scales, setting)
    settings = eval_settings(budget)
    for run in runs:
        if run_claimed(run, settings, on_run, progress):
            publish_results(runs, budget, results_root, command)
    return publish_results(runs, budget, results_root, command)


def run_claimed(
    run: PlannedRun,
    settings: EvalSettings,
    on_run: Callable[[PlannedRun, str], None] | None,
    progress: bool,
    baseline: Path | None = None,
) -> bool:
    """Claim, train, evaluate and release one run, unless it is published or another live process holds it
    (`on_run` hears its state first); True when this process ran it."""
    state = run_state(run)
    if state != "published" and not claim(run):
        state = f"running elsewhere ({lock_holder(run)})"
    if on_run is not None:
        on_run(run, state)
    if state == "published" or state.startswith("running"):
        return False
    try:
        execute_run(run, settings, progress, baseline=baseline)
    finally:
        release(run)
    return True
