"""The experiment plans: every recorded `tracr-inject train` command rebuilds exactly its run's config."""

from __future__ import annotations

import shlex

import pytest
from typer.testing import CliRunner

import tracr_injection.inject as inject_module
from tracr_injection.cli.main import app
from tracr_injection.experiments.budgets import BUDGETS, TASKS
from tracr_injection.experiments.reproduce import plan_runs
from tracr_injection.experiments.settings import inject_setting
from tracr_injection.inject.run import Manifest


@pytest.fixture
def trained_configs(monkeypatch) -> list:
    """The configs `tracr-inject train` would train, recorded instead of training."""
    seen = []

    def fake_train(config, resume=False):
        seen.append(config)
        return Manifest(task=config.task, method=config.method, model=config.model, layer_mapping=[],
                        eval_split=config.eval_split, accuracy_before=0.0, accuracy_after=0.0,
                        eval_examples=config.eval_examples)  # fmt: skip

    monkeypatch.setattr(inject_module, "train", fake_train)
    return seen


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_recorded_train_commands_rebuild_the_planned_configs(budget, tmp_path, trained_configs):
    seen = trained_configs
    runs = plan_runs(list(TASKS), 2, BUDGETS[budget], tmp_path / "runs", "some/model")
    runner = CliRunner()
    for run in runs:
        args = shlex.split(run.config.command())
        assert args[0] == "tracr-inject"
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, result.output
        assert seen[-1].to_dict() == run.config.to_dict()
    assert len(seen) == len(runs) == 2 * 2 * len(TASKS)


def test_plan_covers_every_task_before_repeating_a_seed(tmp_path):
    runs = plan_runs(["dyck", "count"], 2, BUDGETS["cpu"], tmp_path, "m")
    assert [r.name for r in runs] == [
        "dyck-baseline-s0", "dyck-inject-s0", "count-baseline-s0", "count-inject-s0",
        "dyck-baseline-s1", "dyck-inject-s1", "count-baseline-s1", "count-inject-s1",
    ]  # fmt: skip
    only_inject = plan_runs(["dyck_frac"], 2, BUDGETS["cpu"], tmp_path, "m", methods=["inject"])
    assert [r.name for r in only_inject] == ["dyck_frac-inject-s0", "dyck_frac-inject-s1"]
    assert all(r.config.steps == BUDGETS["cpu"].steps["default"] for r in only_inject)


def test_reproduce_status_takes_one_method_and_rejects_unknown_names(tmp_path):
    runner = CliRunner()
    common = ["reproduce", "--budget", "smoke", "--seeds", "1", "--runs-root", str(tmp_path), "--status"]
    result = runner.invoke(app, [*common, "--task", "dyck_frac", "--method", "inject", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "dyck_frac-inject-s0" in result.output and "baseline" not in result.output
    result = runner.invoke(app, [*common, "--task", "nope"])
    assert result.exit_code != 0 and "Unknown task 'nope'" in result.output
    result = runner.invoke(app, [*common, "--method", "both-ish"])
    assert result.exit_code != 0 and "--method must be baseline, inject or both" in result.output


def test_train_takes_alignment_scales_and_names_a_malformed_one(trained_configs, tmp_path):
    runner = CliRunner()
    args = ["train", "--task", "dyck_frac", "--out", str(tmp_path / "r")]
    scales = ["--alignment-scale", "frac_open=10", "--alignment-scale", "frac_close=2.5"]
    result = runner.invoke(app, args + scales)
    assert result.exit_code == 0, result.output
    assert trained_configs[-1].alignment_scales == {"frac_open": 10.0, "frac_close": 2.5}
    result = runner.invoke(app, args + ["--alignment-scale", "frac_open:10"])
    assert result.exit_code != 0 and "VAR=FACTOR" in result.output and "'frac_open:10'" in result.output


def test_planned_alignment_scales_reach_the_inject_runs_and_their_recorded_commands(trained_configs, tmp_path):
    runs = plan_runs(["dyck_frac"], 1, BUDGETS["cpu"], tmp_path, "m", alignment_scales={"dyck_open_frac": 5.0})
    baseline, inject = runs
    assert baseline.config.alignment_scales == {} and inject.config.alignment_scales == {"dyck_open_frac": 5.0}
    command = inject.config.command()
    assert "--alignment-scale dyck_open_frac=5.0" in command
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert trained_configs[-1].to_dict() == inject.config.to_dict()
    status = CliRunner().invoke(app, ["reproduce", "--task", "dyck_frac", "--seeds", "1", "--runs-root", str(tmp_path),
                                      "--results", str(tmp_path), "--alignment-scale", "x=1", "--status"])  # fmt: skip
    assert status.exit_code == 0, status.output
    bad = CliRunner().invoke(app, ["reproduce", "--task", "dyck_frac", "--alignment-scale", "x", "--status"])
    assert bad.exit_code != 0 and "VAR=FACTOR" in bad.output


def test_the_chosen_setting_reaches_the_inject_runs_with_its_teacher(trained_configs, tmp_path):
    gate = tmp_path / "gate.json"
    gate.write_text('{"setting": {"name": "align-first", "alignment_first_steps": 100}, "teacher": '
                    '"dyck_authors_trigger", "passed": false}')  # fmt: skip
    choice = inject_setting("gate", gate)
    assert choice["overrides"] == {"alignment_first_steps": 100} and choice["source"] == str(gate)
    baseline, inject = plan_runs(["dyck"], 1, BUDGETS["cpu"], tmp_path, "m", setting=choice)
    assert (baseline.config.alignment_first_steps, inject.config.alignment_first_steps) == (0, 100)
    assert baseline.config.teacher == inject.config.teacher == "dyck_authors_trigger"
    result = CliRunner().invoke(app, shlex.split(inject.config.command())[1:])
    assert result.exit_code == 0, result.output
    assert trained_configs[-1].to_dict() == inject.config.to_dict()
    assert inject_setting("equal", gate)["overrides"] == {"alignment_variable_weighting": "equal"}
    assert inject_setting("gate", tmp_path / "missing.json")["overrides"] == {}  # before the sweep chose
    bad = CliRunner().invoke(app, ["reproduce", "--task", "dyck", "--setting", "m7", "--status"])
    assert bad.exit_code == 1 and "Unknown setting 'm7'" in bad.output and "Traceback" not in bad.output
