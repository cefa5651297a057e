"""`tracr-inject sweep` (`experiments.injection_sweep`) on a tiny random model at the smoke budget: the plan, the
resumable driver publishing each run with its curves, the summary, the gate chosen by ID numbers only."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_llama
from typer.testing import CliRunner

from tracr_injection.cli.main import app
from tracr_injection.experiments import injection_sweep
from tracr_injection.experiments.injection_sweep import (
    BASELINE,
    GATE_TEACHER,
    LONG_STEPS,
    SWEEP,
    TEACHERS,
    baseline_of,
    best_setting,
    passes_gate,
    plan_sweep,
    reported_runs,
    sweep,
)
from tracr_injection.experiments.settings import SETTINGS
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.run import LOCK_NAME

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")


def row(setting: str, accuracy: float, decoded: dict[str, float], probe: float = 0.5, teacher: str = "t") -> dict:
    variables = {name: {"level": 0, "map_id": v, "baseline_probe_id": probe} for name, v in decoded.items()}
    return {"teacher": teacher, "setting": setting, "steps": 1, "id_task_accuracy": accuracy, "variables": variables}


def test_the_plan_is_the_baselines_then_every_setting_for_each_teacher(tmp_path):
    runs = plan_sweep(TEACHERS, list(SETTINGS), SWEEP, tmp_path / "runs", tmp_path / "results")
    assert [r.name for r in runs] == [name for name in (BASELINE, "baseline-spaced", *SETTINGS) for _ in TEACHERS]
    assert [r.config.teacher for r in runs] == list(TEACHERS) * (len(SETTINGS) + 2)
    assert plan_sweep(TEACHERS, ["m1"], SWEEP, tmp_path, tmp_path)[0].name == BASELINE  # no layout, one baseline
    m10 = next(r for r in runs if r.name == "m10")
    assert m10.config.alignment_weight == 10.0 and m10.config.steps == 400 and m10.config.seed == 0
    assert runs[0].config.method == "baseline" and str(runs[0].published).endswith("dyck_trigger/baseline")
    with pytest.raises(ValueError, match="Unknown setting"):
        plan_sweep(TEACHERS, ["m7"], SWEEP, tmp_path, tmp_path)


def test_a_spaced_setting_is_compared_with_a_baseline_probed_at_its_hidden_states(tmp_path, monkeypatch):
    runs = plan_sweep(["dyck_authors_trigger"], ["m1", "spaced"], SWEEP, tmp_path / "runs", tmp_path / "results")
    by_name = {r.name: r for r in runs}
    assert list(by_name) == [BASELINE, "baseline-spaced", "m1", "spaced"]
    assert (by_name["baseline-spaced"].method, by_name["baseline-spaced"].config.layer_strategy) == (
        "baseline", "spaced",
    )  # fmt: skip
    assert by_name["spaced"].config.layer_strategy == "spaced"
    assert by_name[BASELINE].config.layer_strategy == "identity"
    monkeypatch.setattr(injection_sweep, "is_done", lambda run: True)  # both evaluated: each gets its layout's
    assert baseline_of(by_name["spaced"], runs) == by_name["baseline-spaced"].out
    assert baseline_of(by_name["m1"], runs) == by_name[BASELINE].out
    assert baseline_of(by_name["baseline-spaced"], runs) is None


def test_the_report_keeps_the_teachers_swept_before(tmp_path):
    roots = (tmp_path / "runs", tmp_path / "results")
    (roots[0] / "dyck_trigger" / "m1").mkdir(parents=True)  # a sweep of the other teacher ran here before
    runs = plan_sweep(["dyck_authors_trigger"], ["m1"], SWEEP, *roots)
    teachers = [r.config.teacher for r in reported_runs(runs, SWEEP, roots, LONG_STEPS)]
    assert list(dict.fromkeys(teachers)) == ["dyck_authors_trigger", "dyck_trigger"]
    assert teachers.count("dyck_trigger") == teachers.count("dyck_authors_trigger") == 2 + len(SETTINGS)


def test_the_gate_choice_uses_in_distribution_numbers_only():
    worst_low = row("a", 0.99, {"x": 0.99, "y": 0.60})
    even = row("b", 0.98, {"x": 0.90, "y": 0.90})
    inaccurate = row("c", 0.90, {"x": 1.0, "y": 1.0})
    assert best_setting([worst_low, even, inaccurate])["setting"] == "b"  # the worst variable decides
    passing = row("d", 0.97, {"x": 0.96, "y": 0.95})
    assert passes_gate(passing) and not passes_gate(even)
    assert best_setting([even, passing])["setting"] == "d"
    assert not passes_gate(row("e", 0.99, {"x": 0.96}, probe=0.97))  # not above the baseline's probe


def test_the_gate_chooses_within_the_authors_teacher_once_it_has_a_finished_run():
    other = row("m1", 0.995, {"x": 0.99, "y": 0.78}, teacher="dyck_trigger")
    authors = [row("m1", 0.995, {"x": 0.99, "y": 0.29}, teacher=GATE_TEACHER),
               row("long-equal", 0.99, {"x": 0.99, "y": 0.50}, teacher=GATE_TEACHER)]  # fmt: skip
    assert GATE_TEACHER == "dyck_authors_trigger"
    chosen = best_setting([other, *authors])
    assert (chosen["teacher"], chosen["setting"]) == (GATE_TEACHER, "long-equal")  # not the other's better worst
    assert best_setting([other])["teacher"] == "dyck_trigger"  # the other teacher while the authors' has none


def test_the_sweep_runs_publishes_and_writes_the_gate(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny", load_tokenizer("smollm2"), num_hidden_layers=6)
    roots = {"runs_root": tmp_path / "runs", "results_root": tmp_path / "results"}
    teacher = "reverse_trigger"
    seen = []
    results = sweep(
        [teacher], ["m10"], "smoke", model=model, long_setting="auto", long_steps=2, progress=False,
        task="reverse", on_run=lambda run, state: seen.append((run.name, state)), **roots,
    )  # fmt: skip
    assert seen == [(BASELINE, "todo"), ("m10", "todo"), ("long-m10", "todo")]
    for name in (BASELINE, "m10", "long-m10"):
        published = results / teacher / name
        assert {"metrics.json", "manifest.json", "reproduce.json", "metrics.jsonl", "probes.png"} <= {
            p.name for p in published.iterdir()
        }, name
    precision = {n: json.loads((results / teacher / n / "manifest.json").read_text())["config"]["mixed_precision"]
                 for n in ("m10", "long-m10")}  # fmt: skip
    assert precision == {"m10": "no", "long-m10": "bf16"}  # the long run trains in bf16, the sweep's runs in fp32
    evaluated = json.loads((results / teacher / "m10" / "metrics.json").read_text())
    assert "baseline_comparison" in evaluated  # the baseline was evaluated first
    gate = json.loads((results / "gate.json").read_text())
    assert gate["teacher"] == teacher and gate["setting"]["name"] == "m10"
    assert gate["steps"] in (2, 4) and 0 <= gate["id_task_accuracy"] <= 1
    assert set(gate["variables"]) == set(evaluated["baseline_comparison"]["variables"])
    for name, values in gate["variables"].items():
        comparison = evaluated["baseline_comparison"]["variables"][name]
        if gate["run"] == "m10":
            assert values["map_id"] == comparison["test"]["map"]
        assert values["baseline_probe_id"] == comparison["test"]["baseline_probe"]
        assert values["level"] == comparison["level"]
    summary = (results / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2 * len(gate["variables"]) and (results / "summary.png").stat().st_size > 5000
    assert (results / "curves.png").stat().st_size > 5000  # decoding vs step of the variables below 95%
    header, first = summary[0].split(","), dict(zip(summary[0].split(","), summary[1].split(",")))
    assert header[-5:] == ["majority_id", "map_balanced_id", "baseline_probe_balanced_id", "map_as_number_id",
                           "baseline_probe_as_number_id"]  # fmt: skip
    test_split = evaluated["decoding"]["map"]["test"]
    level = int(first["level"])
    assert float(first["majority_id"]) == test_split["majority"][first["variable"]][level]
    assert (results / "by_value.png").stat().st_size > 5000  # the program's many-valued variables by true value
    # again: everything is done, nothing trains (a second worker or a restart skips finished runs)
    again = []
    sweep([teacher], ["m10"], "smoke", model=model, long_setting="auto", long_steps=2, progress=False,
          task="reverse", on_run=lambda run, state: again.append(state), **roots)  # fmt: skip
    assert again == ["evaluated"] * 3
    # a later sweep of another setting keeps the finished settings' rows, the long run's too
    sweep([teacher], ["m1"], "smoke", model=model, long_setting=None, long_steps=2, progress=False,
          task="reverse", **roots)  # fmt: skip
    rows = (results / "summary.csv").read_text().splitlines()[1:]
    assert {line.split(",")[1] for line in rows} == {"m10", "long-m10", "m1"}
    reported = [r["run"] for r in json.loads((results / "experiment.json").read_text())["runs"]]
    assert reported == [BASELINE, "baseline-spaced", *SETTINGS, "long-m10"]  # every setting, its layout's baseline


def test_the_long_run_is_left_to_the_worker_that_ends_the_teachers_last_run(tmp_path):
    import socket
    import subprocess
    import sys

    model = save_tiny_llama(tmp_path / "tiny", load_tokenizer("smollm2"), num_hidden_layers=6)
    roots = {"runs_root": tmp_path / "runs", "results_root": tmp_path / "results"}
    held = tmp_path / "runs" / "reverse_trigger" / "m30"
    held.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (held / LOCK_NAME).write_text(f"{socket.gethostname()}:{other.pid}")  # another worker trains m30
        seen = []
        sweep(["reverse_trigger"], ["m10", "m30"], "smoke", model=model, long_setting="auto", long_steps=2,
              progress=False, task="reverse", on_run=lambda run, state: seen.append((run.name, state)), **roots)  # fmt: skip
    finally:
        other.kill()
        other.wait()
    assert [name for name, _ in seen] == [BASELINE, "m10", "m30"] and seen[2][1].startswith("running elsewhere")
    # `auto` is not resolved over m10 alone: the worker that ends m30 resolves it over both
    assert not [p.name for p in (tmp_path / "runs" / "reverse_trigger").iterdir() if p.name.startswith("long-")]


def test_sweep_status_prints_the_plan_and_rejects_unknown_names(tmp_path):
    common = ["sweep", "--runs-root", str(tmp_path), "--results", str(tmp_path)]
    status = CliRunner().invoke(app, [*common, "--status", "--setting", "m10"])
    assert status.exit_code == 0, status.output
    assert "dyck_trigger/m10: todo" in status.output and "dyck_authors_trigger/baseline: todo" in status.output
    dry = CliRunner().invoke(app, [*common, "--dry-run", "--setting", "lstsq", "--teacher", "dyck_trigger"])
    assert dry.exit_code == 0 and "--map-init lstsq" in dry.output
    for bad, message in ((["--teacher", "nope"], "cannot be taught by 'nope'"), (["--setting", "m7"], "Unknown setting"),
                         (["--long", "m7"], "--long must be auto, none or one of")):  # fmt: skip
        result = CliRunner().invoke(app, [*common, "--status", *bad])
        assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
