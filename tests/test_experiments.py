"""The experiment plans: every recorded `tracr-inject train` command rebuilds exactly its run's config."""

from __future__ import annotations

import shlex

import pytest
from typer.testing import CliRunner

import tracr_injection.inject as inject_module
from tracr_injection.cli.main import app
from tracr_injection.experiments.budgets import BUDGETS, TASKS
from tracr_injection.experiments.reproduce import plan_runs, train_command


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_recorded_train_commands_rebuild_the_planned_configs(budget, tmp_path, monkeypatch):
    seen = []

    def fake_train(config, resume=False):
        seen.append(config)
        return {f"{config.eval_split}_accuracy_before": 0.0, f"{config.eval_split}_accuracy_after": 0.0,
                "eval_examples": config.eval_examples}  # fmt: skip

    monkeypatch.setattr(inject_module, "train", fake_train)
    runs = plan_runs(list(TASKS), 2, BUDGETS[budget], tmp_path / "runs", "some/model")
    runner = CliRunner()
    for run in runs:
        args = shlex.split(train_command(run))
        assert args[0] == "tracr-inject"
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, result.output
        assert seen[-1].to_dict() == run.config.to_dict()
    assert len(seen) == len(runs) == 2 * 2 * len(TASKS)
