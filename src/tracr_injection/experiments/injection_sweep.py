"""`tracr-inject sweep`: the alignment levers of issue 21 on Dyck, seed 0, each a resumable run, and the gate.

In: teachers, named settings (each a dict of `TrainConfig` overrides on top of the `sweep` budget), a long
run's setting.  Out: per teacher, run folders under `runs/injection/<teacher>/<setting>` and, as soon as a
run is evaluated, `results/injection/<teacher>/<setting>/` (its evaluation without weights, manifest,
reproduce record with the train command and wall times, metrics.jsonl with the probe lines, probes.png);
`results/injection/summary.{md,csv,png}` over every finished run (final ID map decoding per variable, ID
task accuracy, the alignment's early-block gradient over the task's), `curves.png` (ID map decoding vs step of
every lagging variable and finished run) and `results/injection/gate.json` for
the setting chosen by in-distribution decoding and accuracy only.  The plan is every teacher's baseline (the
post-hoc probe the gate compares with), then setting by setting one run per teacher, then per teacher a long
run (`LONG_STEPS`) of one setting: named, or `auto` (the best finished one).  Runs are claimed, resumed and skipped exactly as `reproduce`'s
(`experiments.reproduce`), so several one-thread workers can share a plan and a reclaimed machine loses
only the steps since a run's last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tracr_injection.errors import InvalidArgumentError
from tracr_injection.evaluate.decoding import written_level, written_value
from tracr_injection.experiments.budgets import CPU_PRECISION, Budget, get_budget
from tracr_injection.experiments.reproduce import (
    DONE_STATES,
    PlannedRun,
    eval_settings,
    lock_holder,
    publish_evaluated,
    run_claimed,
    run_state,
    status_rows,
)
from tracr_injection.experiments.settings import SETTINGS
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.probing import probe_series, read_probe_lines
from tracr_injection.inject.run import versions

TASK = "dyck"
SEED = 0
TEACHERS = ("dyck_trigger", "dyck_authors_trigger")
# The teacher gate.json chooses for the next experiments whenever one of its runs is finished: its per-type
# differences at an almost_balanced string's trigger (0 or 1) are values seen in training, while dyck_trigger's
# total counts on long strings never are (issue 21), so only this teacher can show the OOD claim.  The choice
# compares settings within it: worst variables of teachers with different variables do not compare.
GATE_TEACHER = "dyck_authors_trigger"
BASELINE = "baseline"  # the identity layout's; a setting with another `layer_strategy` gets "baseline-<strategy>"
IDENTITY = "identity"
LONG_PREFIX = "long-"
LONG_STEPS = 1500
GATE_DECODING = 0.95
GATE_ACCURACY = 0.97

SWEEP = Budget(
    name="sweep",
    description="the levers' budget: 400 steps at batch 8 (training within an hour on one 1-thread worker "
    "beside another), probes every 25 steps, 200 examples per evaluated split; fp32, unlike `cpu`, so that its "
    "settings compare with the runs it held before the CPU budgets moved to bf16 (its long runs are bf16)",
    steps={"default": 400},
    train={
        "batch_size": 8, "lr_lm": 1e-5, "lr_map": 1e-3, "warmup_steps": 20, "eval_examples": 200,
        "probe_every": 25,
    },  # fmt: skip
    eval_examples=200,
    probe_examples=400,
    causal_examples=64,
    language_windows=32,
    checkpoint_every=50,
)


def sweep_budget(name: str) -> Budget:
    """The `sweep` budget, or any `reproduce` budget by name (`smoke` for tests)."""
    return SWEEP if name == SWEEP.name else get_budget(name)


def planned(
    teacher: str,
    setting: str,
    overrides: Mapping[str, Any],
    budget: Budget,
    roots: tuple[Path, Path],
    model: str,
    task: str = TASK,
) -> PlannedRun:
    """One run of the sweep: Dyck (another task in tests), seed 0, the budget's fields, then the overrides."""
    runs_root, results_root = roots
    method = "baseline" if setting.startswith(BASELINE) else "inject"
    fields = {**budget.train_fields(task), **overrides}
    config = TrainConfig(
        task=task, teacher=teacher, method=method, model=model, seed=SEED,
        out=str(runs_root / teacher / setting), **fields,
    )  # fmt: skip
    return PlannedRun(task, method, SEED, config, results_root / teacher / setting)


def layout(overrides: Mapping[str, Any]) -> str:
    """The layer strategy a setting's runs use."""
    return overrides.get("layer_strategy", IDENTITY)


def baseline_name(strategy: str) -> str:
    """The baseline run whose post-hoc probe reads the hidden states a `strategy` run aligns."""
    return BASELINE if strategy == IDENTITY else f"{BASELINE}-{strategy}"


def baseline_overrides(strategy: str) -> dict[str, Any]:
    """A baseline's overrides: its layer strategy, where it is not the identity."""
    return {} if strategy == IDENTITY else {"layer_strategy": strategy}


def plan_sweep(
    teachers: Sequence[str],
    settings: Sequence[str],
    budget: Budget,
    runs_root: Path,
    results_root: Path,
    model: str = "smollm2",
    task: str = TASK,
) -> list[PlannedRun]:
    """Every teacher's baseline (one per layer strategy the settings use: the probe the gate compares with must
    read the hidden states the run aligns), then setting by setting (in the order given) one inject run per
    teacher, so that workers taking runs in order finish the teachers' comparisons of the first settings
    first."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise InvalidArgumentError(f"Unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}.")
    roots = (runs_root, results_root)
    strategies = dict.fromkeys([IDENTITY, *(layout(SETTINGS[name]) for name in settings)])
    runs = [
        planned(teacher, baseline_name(strategy), baseline_overrides(strategy), budget, roots, model, task)
        for strategy in strategies
        for teacher in teachers
    ]
    for name in settings:
        runs += [planned(teacher, name, SETTINGS[name], budget, roots, model, task) for teacher in teachers]
    return runs


def long_run(
    teacher: str, setting: str, budget: Budget, runs_root: Path, results_root: Path, model: str = "smollm2",
    steps: int = LONG_STEPS, task: str = TASK,
) -> PlannedRun:
    """The long run of `setting`: its overrides, `steps` steps, probes every 50 and checkpoints every 100, in
    bf16 autocast (1.5x faster here, so 1,500 steps fit one session; its first 400 steps, on the same data
    order, compare with the setting's fp32 400-step run)."""
    overrides = {**SETTINGS[setting], **CPU_PRECISION, "steps": steps, "probe_every": 50, "checkpoint_every": 100}
    return planned(teacher, LONG_PREFIX + setting, overrides, budget, (runs_root, results_root), model, task)


# ----------------------------------------------------------------------------- reading finished runs


def is_done(run: PlannedRun) -> bool:
    """Whether the run is evaluated here or published."""
    return run_state(run) in DONE_STATES


def evaluation(run: PlannedRun) -> dict[str, Any]:
    """The run's evaluation metrics (published copy first)."""
    for folder in (run.published_folder, run.folder):
        if (path := folder.find_evaluation()) is not None:
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{run.name} has no evaluation yet.")


def written_level_accuracies(
    metrics: dict[str, Any], decoder: str, split: str, table: str = "accuracy"
) -> dict[str, tuple[int, float | None]]:
    """Per teacher variable, (level it is written, decoding accuracy there) for `decoder` (map or probe); with
    `table` "majority", "balanced" or "as_number" that measure instead (None where the evaluation predates it
    or, for "as_number", the variable is not ordinal)."""
    result = metrics["decoding"][decoder][split]
    levels = {name: written_level(positions) for name, positions in result["positions"].items()}
    return {name: (level, written_value(result, table, name, level)) for name, level in levels.items()}


def early_gradient_ratio(run: PlannedRun) -> float | None:
    """The last probe's alignment / task gradient norm on the early blocks (None without both)."""
    for folder in (run.published_folder, run.folder):
        if folder.metrics_file.is_file():
            lines = read_probe_lines(folder.metrics_file)
            if not lines:
                return None
            last = lines[-1]
            task, align = last.get("probe/grad/task_ce/early"), last.get("probe/grad/alignment/early")
            return align / task if task and align is not None else None
    return None


def run_row(run: PlannedRun, baseline: PlannedRun | None) -> dict[str, Any]:
    """One summary row of a finished inject run: ID accuracy, per variable ID map decoding (and the baseline's
    probe when it is evaluated), the early-block gradient ratio."""
    metrics = evaluation(run)
    split = run.config.eval_split
    ours = written_level_accuracies(metrics, "map", split)
    majority, balanced, as_number = (
        written_level_accuracies(metrics, "map", split, t) for t in ("majority", "balanced", "as_number")
    )
    theirs, theirs_balanced, theirs_as_number, theirs_by_value = {}, {}, {}, {}
    if baseline and is_done(baseline):
        baseline_metrics = evaluation(baseline)
        theirs = written_level_accuracies(baseline_metrics, "probe", split)
        theirs_balanced = written_level_accuracies(baseline_metrics, "probe", split, "balanced")
        theirs_as_number = written_level_accuracies(baseline_metrics, "probe", split, "as_number")
        theirs_by_value = baseline_metrics["decoding"]["probe"][split].get("by_value", {})
    return {
        "teacher": run.config.teacher,
        "setting": run.name,
        "steps": run.config.steps,
        "id_task_accuracy": metrics["accuracy"][split]["accuracy"],
        "grad_ratio_early": early_gradient_ratio(run),
        "variables": {
            name: {
                "level": level, "map_id": value, "baseline_probe_id": theirs.get(name, (level, None))[1],
                "majority_id": majority[name][1], "map_balanced_id": balanced[name][1],
                "baseline_probe_balanced_id": theirs_balanced.get(name, (level, None))[1],
                "map_as_number_id": as_number[name][1],
                "baseline_probe_as_number_id": theirs_as_number.get(name, (level, None))[1],
            }  # fmt: skip
            for name, (level, value) in ours.items()
        },
        "by_value": {
            "map": metrics["decoding"]["map"][split].get("by_value", {}), "baseline_probe": theirs_by_value,
        },  # fmt: skip
    }


def passes_gate(row: dict[str, Any]) -> bool:
    """Every variable decodes at >= 95% ID through the map, above the baseline's probe; ID accuracy >= 97%."""
    variables = row["variables"].values()
    return row["id_task_accuracy"] >= GATE_ACCURACY and all(
        v["map_id"] is not None and v["map_id"] >= GATE_DECODING
        and v["baseline_probe_id"] is not None and v["map_id"] > v["baseline_probe_id"]
        for v in variables
    )  # fmt: skip


def choice_key(row: dict[str, Any]) -> tuple:
    """Order of preference, by in-distribution numbers only: passes the gate, keeps ID accuracy >= 97%, then
    the worst variable's map decoding, the mean decoding, the ID accuracy."""
    decoded = [v["map_id"] or 0.0 for v in row["variables"].values()]
    return (
        passes_gate(row),
        row["id_task_accuracy"] >= GATE_ACCURACY,
        min(decoded),
        sum(decoded) / len(decoded),
        row["id_task_accuracy"],
    )


def best_setting(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The preferred row (`choice_key`) of `GATE_TEACHER`'s rows when there are any, else of all; None without
    rows."""
    preferred = [r for r in rows if r["teacher"] == GATE_TEACHER] or rows
    return max(preferred, key=choice_key) if preferred else None


# ----------------------------------------------------------------------------- publishing


def comparison_key(run: PlannedRun) -> tuple[str, str]:
    """What a run and the baseline it is compared with share: the teacher and the layer strategy (the hidden
    states the baseline's probe reads)."""
    return run.config.teacher, run.config.layer_strategy


def summary_rows(runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """A row per finished inject run (`run_row`), with its teacher's baseline of the same layer strategy."""
    baselines = {comparison_key(r): r for r in runs if r.method == "baseline"}
    return [
        run_row(r, baselines.get(comparison_key(r)))
        for r in runs
        if r.method != "baseline" and is_done(r)
    ]


def write_summary(rows: Sequence[dict[str, Any]], folder: Path) -> None:
    """summary.md / summary.csv (a line per run and variable) and summary.png (map decoding per variable and
    setting, per teacher, with the ID accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    measures = ["map_id", "baseline_probe_id", "majority_id", "map_balanced_id", "baseline_probe_balanced_id",
                "map_as_number_id", "baseline_probe_as_number_id"]  # fmt: skip
    header = ["teacher", "setting", "steps", "id_task_accuracy", "grad_ratio_early", "variable", "level",
              *measures]  # fmt: skip
    lines = [
        [row[k] for k in header[:5]] + [name, v["level"]] + [v.get(m) for m in measures]
        for row in rows
        for name, v in row["variables"].items()
    ]
    with (folder / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *lines])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell_text(c) for c in line) + " |" for line in lines]
    (folder / "summary.md").write_text("\n".join(md) + "\n")
    plot_summary(rows, folder / "summary.png")
    plot_by_value(rows, folder / "by_value.png")


def cell_text(value: Any) -> str:
    """A table cell: 3 decimals for floats, '' for None."""
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def plot_summary(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One heat map per teacher: settings x (ID accuracy, each variable's ID map decoding)."""
    teachers = sorted({r["teacher"] for r in rows})
    if not teachers:
        return
    fig, axes = plt.subplots(len(teachers), 1, figsize=(12, 1.2 + 0.45 * len(rows)), squeeze=False)
    for ax, teacher in zip(axes[:, 0], teachers):
        mine = [r for r in rows if r["teacher"] == teacher]
        variables = list(mine[0]["variables"])
        columns = ["ID accuracy", *variables]
        grid = [[r["id_task_accuracy"]] + [r["variables"].get(v, {}).get("map_id") or 0.0 for v in variables]
                for r in mine]  # fmt: skip
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, values in enumerate(grid):
            for j, value in enumerate(values):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(mine)), [r["setting"] for r in mine], fontsize=7)
        ax.set_title(f"{teacher}: ID task accuracy and ID map decoding at the level written (%)", fontsize=9)
    save_figure(fig, path, 120)


def panel_grid(panels: int, cols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure with `panels` axes in rows of `cols` (each width x height inches), the unused ones hidden."""
    cols = min(cols, panels)
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(width * cols, height * -(-panels // cols)),
                             squeeze=False)  # fmt: skip
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig, list(axes.flat)[:panels]


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


BY_VALUE_MIN_POSITIONS = 5  # a true value held at fewer ID positions is left out of by_value.png


def counted_values(by_value: dict[str, list[int]]) -> list[tuple[float, float]]:
    """(value, share decoded right) for the numeric true values held at enough positions, in value order."""
    points = [(float(v), h / t) for v, (h, t) in by_value.items()
              if t >= BY_VALUE_MIN_POSITIONS and v.lstrip("-").replace(".", "", 1).isdigit()]  # fmt: skip
    return sorted(points)


def plot_by_value(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Per teacher and many-valued variable (counts, differences), ID decoding accuracy by true value: each
    finished setting's map beside the baseline's probe.  A decoder that knows only the most common value (0
    at most positions) is right there and nowhere else."""
    panels = []
    for teacher in sorted({r["teacher"] for r in rows}):
        mine = [r for r in rows if r["teacher"] == teacher and r.get("by_value", {}).get("map")]
        if mine:
            names = [n for n, by in mine[0]["by_value"]["map"].items() if len(counted_values(by)) > 2]
            panels += [(teacher, name, mine) for name in names]
    if not panels:
        return
    fig, axes = panel_grid(len(panels), 4, 3.4, 2.6)
    for ax, (teacher, name, mine) in zip(axes, panels):
        for row in mine:
            points = counted_values(row["by_value"]["map"].get(name, {}))
            ax.plot(*zip(*points), marker=".", lw=1, label=f"{row['setting']} (map)")
        probe = counted_values(mine[0]["by_value"]["baseline_probe"].get(name, {}))
        if probe:
            ax.plot(*zip(*probe), color="k", ls="--", marker="x", lw=1, label="baseline probe")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{teacher}: {name}", fontsize=7)
        ax.set_xlabel("true value", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("ID decoding accuracy", fontsize=7)
    axes[0].legend(fontsize=5)
    save_figure(fig, path, 120)


def decoding_curves(run: PlannedRun) -> dict[str, list[tuple[int, float]]]:
    """Per teacher variable, the ID map decoding of the run's probe lines as [(step, accuracy)]."""
    for folder in (run.published_folder, run.folder):
        if folder.metrics_file.is_file():
            series = probe_series(read_probe_lines(folder.metrics_file), "decode")
            return {name: points for (split, name), points in series.items() if split == run.config.eval_split}
    return {}


def plot_curves(rows: Sequence[dict[str, Any]], runs: Sequence[PlannedRun], path: Path) -> None:
    """Per teacher and lagging variable (below the gate's 95% at the end of some finished run), ID map decoding
    vs training step for every finished run (the long runs show how it grows with steps), with the baseline's
    post-hoc probe (dashed) and the most common value's share (dotted) at the end."""
    by_name = {(r.config.teacher, r.name): r for r in runs}
    panels = []
    for teacher in sorted({r["teacher"] for r in rows}):
        mine = [r for r in rows if r["teacher"] == teacher]
        lagging = [n for n in mine[0]["variables"]
                   if any((r["variables"].get(n, {}).get("map_id") or 0.0) < GATE_DECODING for r in mine)]  # fmt: skip
        curves = {r["setting"]: decoding_curves(by_name[(teacher, r["setting"])]) for r in mine}
        panels += [(teacher, name, mine, curves) for name in lagging]
    if not panels:
        return
    fig, axes = panel_grid(len(panels), 6, 2.9, 2.3)
    for ax, (teacher, name, mine, curves) in zip(axes, panels):
        for row in mine:
            if points := curves[row["setting"]].get(name):
                ax.plot(*zip(*points), lw=1, label=row["setting"])
        ends = mine[0]["variables"][name]
        if ends.get("baseline_probe_id") is not None:
            ax.axhline(ends["baseline_probe_id"], color="k", ls="--", lw=0.8, label="baseline probe")
        if ends.get("majority_id") is not None:
            ax.axhline(ends["majority_id"], color="grey", ls=":", lw=0.8, label="most common value")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{teacher}: {name}", fontsize=6)
        ax.tick_params(labelsize=6)
        if name == next(n for t, n, *_ in panels if t == teacher):  # each teacher's first panel
            ax.legend(fontsize=5)
    axes[0].set_ylabel("ID map decoding", fontsize=7)
    fig.supxlabel("training step", fontsize=8)
    save_figure(fig, path, 110)


def write_gate(rows: Sequence[dict[str, Any]], runs: Sequence[PlannedRun], path: Path) -> dict[str, Any] | None:
    """`gate.json` for the preferred finished setting (`choice_key`), None before any finished inject run."""
    best = best_setting(rows)
    if best is None:
        return None
    run = next(r for r in runs if r.config.teacher == best["teacher"] and r.name == best["setting"])
    setting = best["setting"].removeprefix(LONG_PREFIX)
    gate = {
        "setting": {"name": setting, **SETTINGS.get(setting, {})},
        "steps": best["steps"],
        "teacher": best["teacher"],
        "id_task_accuracy": best["id_task_accuracy"],
        "variables": best["variables"],
        "passed": passes_gate(best),
        "run": best["setting"],
        "train_command": run.config.command(),
        "chosen_by": f"among {GATE_TEACHER}'s runs when there are any: passes the gate, ID accuracy >= 0.97, "
        "then worst and mean ID map decoding, ID accuracy (never the OOD splits)",
    }
    path.write_text(json.dumps(gate, indent=2))
    return gate


def reported_runs(
    runs: Sequence[PlannedRun], budget: Budget, roots: tuple[Path, Path], long_steps: int
) -> list[PlannedRun]:
    """What the summary, gate.json and experiment.json cover: every setting of every teacher swept under the
    runs root, not only those this invocation takes (a sweep started with `--setting` or `--teacher` keeps the
    other settings' and teachers' rows), and every long run planned here or finished before."""
    task, model = runs[0].task, runs[0].config.model
    swept_before = sorted(p.name for p in roots[0].iterdir() if p.is_dir()) if roots[0].is_dir() else []
    teachers = list(dict.fromkeys([*(r.config.teacher for r in runs), *swept_before]))
    report = plan_sweep(teachers, list(SETTINGS), budget, *roots, model, task)
    longs = [r for r in runs if r.name.startswith(LONG_PREFIX)]
    for teacher in teachers:
        for setting in SETTINGS:
            candidate = long_run(teacher, setting, budget, *roots, model=model, steps=long_steps, task=task)
            if all(r.out != candidate.out for r in longs) and is_done(candidate):
                longs.append(candidate)
    return report + longs


def publish_sweep(
    runs: Sequence[PlannedRun], report: Sequence[PlannedRun], results_root: Path, budget: Budget, command: str
) -> Path:
    """Publish every evaluated run of `runs`, then the summary, gate.json and experiment.json over every
    finished run of `report` (`reported_runs`)."""
    results_root.mkdir(parents=True, exist_ok=True)
    publish_evaluated(runs)
    rows = summary_rows(report)
    write_summary(rows, results_root)
    plot_curves(rows, report, results_root / "curves.png")
    write_gate(rows, report, results_root / "gate.json")
    (results_root / "experiment.json").write_text(
        json.dumps(
            {
                "budget": dataclasses.asdict(budget),
                "command": command,
                "versions": versions(),
                "settings": SETTINGS,
                "runs": [
                    {"teacher": r.config.teacher, "train_command": r.config.command(), **row}
                    for r, row in zip(report, status_rows(report))
                ],
            },
            indent=2,
        )
    )
    return results_root


# ----------------------------------------------------------------------------- driving


def resolve_long(
    teacher: str, long_setting: str | None, runs: Sequence[PlannedRun], budget: Budget, roots: tuple[Path, Path],
    model: str, steps: int,
) -> PlannedRun | None:
    """The teacher's long run: of `long_setting`, or with `auto` of the best finished setting so far, among
    every setting's finished runs (None while none is finished, or with `long_setting` None)."""
    if long_setting is None:
        return None
    if long_setting == "auto":
        report = reported_runs(runs, budget, roots, steps)
        best = best_setting([r for r in summary_rows(report) if r["teacher"] == teacher])
        if best is None:
            return None
        long_setting = best["setting"].removeprefix(LONG_PREFIX)
    if long_setting not in SETTINGS:
        raise InvalidArgumentError(
            f"Unknown long setting {long_setting!r}; choose auto or one of {', '.join(SETTINGS)}."
        )
    return long_run(teacher, long_setting, budget, *roots, model=model, steps=steps, task=runs[0].task)


def baseline_of(run: PlannedRun, runs: Sequence[PlannedRun]) -> Path | None:
    """The evaluated baseline of the run's teacher and layer strategy, for `eval --baseline` (None while it is
    not evaluated)."""
    if run.method == "baseline":
        return None
    for other in runs:
        if other.method == "baseline" and comparison_key(other) == comparison_key(run) and is_done(other):
            return other.published if other.published_folder.find_evaluation() else other.out
    return None


def sweep(
    teachers: Sequence[str],
    settings: Sequence[str],
    budget_name: str = SWEEP.name,
    *,
    runs_root: Path = Path("runs/injection"),
    results_root: Path = Path("results/injection"),
    model: str = "smollm2",
    long_setting: str | None = "auto",
    long_steps: int = LONG_STEPS,
    progress: bool = True,
    command: str = "",
    on_run: Callable[[PlannedRun, str], None] | None = None,
    task: str = TASK,
) -> Path:
    """Bring every planned run to 'evaluated' (skipping finished runs and runs another live process holds),
    publishing after each it ran and once at the end; each teacher's long run is resolved by the worker that
    ends its last sweep run (`long_is_due`)."""
    budget = sweep_budget(budget_name)
    runs = plan_sweep(teachers, settings, budget, runs_root, results_root, model, task)
    roots = (runs_root, results_root)
    pending = list(runs)
    while pending:
        run = pending.pop(0)
        if execute_planned(run, runs, budget, on_run, progress):
            publish_sweep(runs, reported_runs(runs, budget, roots, long_steps), results_root, budget, command)
        if long_is_due(run, pending, runs):
            extra = resolve_long(run.config.teacher, long_setting, runs, budget, roots, model, long_steps)
            if extra is not None:
                runs.append(extra)
                pending.insert(0, extra)
    return publish_sweep(runs, reported_runs(runs, budget, roots, long_steps), results_root, budget, command)


def long_is_due(run: PlannedRun, pending: Sequence[PlannedRun], runs: Sequence[PlannedRun]) -> bool:
    """Whether this worker resolves the long run of `run`'s teacher now: `run` was the teacher's last sweep run
    left here and no other live process still holds one of them.  So `auto` is resolved once, by the worker
    that finishes the teacher's last run, over all of them (not by each worker over what it saw finished)."""
    teacher = run.config.teacher
    if run.name.startswith(LONG_PREFIX) or any(r.config.teacher == teacher for r in pending):
        return False
    return not any(lock_holder(r) is not None for r in runs if r.config.teacher == teacher)


def execute_planned(
    run: PlannedRun, runs: Sequence[PlannedRun], budget: Budget, on_run: Callable | None, progress: bool
) -> bool:
    """Claim, train, evaluate (beside the baseline's probe when it is evaluated) and release one run; True when
    this worker ran it (a published run or one held elsewhere leaves nothing new to publish)."""
    return run_claimed(run, eval_settings(budget), on_run, progress, baseline=baseline_of(run, runs))


def plan_rows(runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """`--status`/`--dry-run`: per run its teacher, setting, overrides, state and train command."""
    rows = []
    for run, status in zip(runs, status_rows(runs)):
        name = run.name.removeprefix(LONG_PREFIX)
        rows.append({
            "teacher": run.config.teacher, "setting": run.name,
            "overrides": SETTINGS.get(name, baseline_overrides(run.config.layer_strategy)),
            "state": status["state"], "steps": status["steps"], "command": run.config.command(),
        })  # fmt: skip
    return rows
