"""`tracr-inject ood` on a tiny smoke plan: paired runs, summary.json in the issue's format, accuracy curves over
seeds, the inject setting read from gate.json, published runs counting as done, and the CLI's plan."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import save_tiny_llama
from test_eval_pipeline import SETTINGS
from typer.testing import CliRunner

import tracr_injection.experiments.ood as ood_module
from tracr_injection.cli.main import app
from tracr_injection.evaluate.compare import bootstrap_ci
from tracr_injection.experiments.ood import OOD, ood, plan_ood
from tracr_injection.experiments.settings import inject_setting
from tracr_injection.hub import load_tokenizer

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-model"), load_tokenizer("smollm2"), max_position_embeddings=256
    )


def test_inject_setting_from_gate_flag_or_default(tmp_path):
    assert inject_setting(gate=tmp_path / "none.json")["overrides"] == {}
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"setting": {"name": "m10", "alignment_weight": 10.0}, "teacher": "dyck_trigger",
                                "passed": False}))  # fmt: skip
    chosen = inject_setting(gate=gate)
    assert chosen["overrides"] == {"alignment_weight": 10.0} and chosen["teacher"] == "dyck_trigger"
    assert inject_setting("lstsq", gate)["overrides"] == {"map_init": "lstsq"}  # a named setting wins
    with pytest.raises(ValueError, match="Unknown setting"):
        inject_setting("nope", gate)
    runs = plan_ood(5, chosen, OOD, tmp_path / "runs", tmp_path / "results")
    assert [r.name for r in runs[:4]] == [
        "dyck-baseline-s0",
        "dyck-inject-s0",
        "dyck-baseline-s1",
        "dyck-inject-s1",
    ]
    assert all(
        r.config.steps == 400 and r.config.batch_size == 8 and r.config.accuracy_every == 100 for r in runs
    )
    assert runs[1].config.alignment_weight == 10.0 and runs[0].config.alignment_weight == 1.0
    settings = ood_module.ood_eval_settings(OOD)
    assert (
        settings.max_examples == 1000
        and settings.decoding_examples == 200
        and settings.causal_examples == 100
    )


def test_smoke_plan_writes_summary_curves_and_resumes_from_results(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ood_module, "ood_eval_settings", lambda budget: SETTINGS)
    roots = {
        "runs_root": tmp_path / "runs",
        "results_root": tmp_path / "results",
        "gate": tmp_path / "no-gate.json",
    }
    results = ood(2, None, "smoke", model=tiny_model, progress=False, **roots)
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary) == {"task", "seeds", "examples_per_split", "splits", "verdict"}
    assert summary["verdict"] == ood_module.verdict(summary["splits"])
    assert (summary["task"], summary["seeds"], summary["examples_per_split"]) == ("dyck", 2, 12)
    splits = summary["splits"]
    assert {"test", "almost_balanced", "balanced_long", "length", "length_5_90", "new_token"} <= set(splits)
    assert "balanced acc (almost_balanced, balanced_long)" in splits
    gains = []
    for seed in (0, 1):
        acc = {m: json.loads((results / "runs" / f"dyck-{m}-s{seed}" / "metrics.json").read_text())["accuracy"]
               for m in ("baseline", "inject")}  # fmt: skip
        gains.append(
            acc["inject"]["almost_balanced"]["accuracy"] - acc["baseline"]["almost_balanced"]["accuracy"]
        )
    ab = splits["almost_balanced"]
    assert set(ab) == {"baseline_mean", "inject_mean", "gain_mean", "gain_ci95", "gain_t95"}
    assert ab["gain_mean"] == pytest.approx(sum(gains) / 2)
    assert ab["gain_ci95"] == pytest.approx(list(bootstrap_ci(gains)))
    assert all(0.0 <= ab[k] <= 1.0 for k in ("baseline_mean", "inject_mean"))
    curves = json.loads((results / "accuracy_curves.json").read_text())
    smoke_curve = curves["inject"]["splits"]["almost_balanced"]
    assert curves["inject"]["runs"] == 2 and smoke_curve["steps"] == [0, 2, 4]  # smoke: 4 steps, every 2nd
    assert (results / "accuracy_curves.png").is_file() and (results / "paired.png").is_file()
    assert (results / "runs" / "dyck-inject-s0" / "accuracy_curves.png").is_file()
    assert "paired by seed" in (results / "comparison.md").read_text()
    # a fresh machine with the committed results: nothing is trained again
    shutil.rmtree(tmp_path / "runs")
    states = []
    ood(
        2,
        None,
        "smoke",
        model=tiny_model,
        progress=False,
        on_run=lambda run, state: states.append(state),
        **roots,
    )
    assert states == ["published"] * 4 and not (tmp_path / "runs").exists()
    # --publish-only: the summary again from the published runs, the verdict printed, nothing trained
    (results / "summary.json").unlink()
    args = ["ood", "--seeds", "2", "--budget", "smoke", "--gate", str(roots["gate"]), "--model", str(tiny_model),
            "--runs-root", str(roots["runs_root"]), "--results", str(results), "--publish-only"]  # fmt: skip
    published = CliRunner().invoke(app, args)
    assert published.exit_code == 0, published.output
    assert json.loads((results / "summary.json").read_text()) == summary
    assert f"Injection generalises better out of distribution: {summary['verdict']['answer']}" in published.output
    assert not (tmp_path / "runs").exists()


def splits_with(gain_t95, bias_t95, gain_mean=0.0):
    """A summary's splits with only what the verdict reads."""
    return {
        ood_module.VERDICT_SPLIT: {"gain_mean": gain_mean, "gain_t95": list(gain_t95)},
        ood_module.BIAS_CHECK: {"gain_mean": 0.0, "gain_t95": list(bias_t95)},
    }


@pytest.mark.parametrize(
    ("gain_t95", "bias_t95", "answer"),
    [
        ((0.01, 0.20), (0.005, 0.1), "supported"),  # both intervals above 0
        ((0.01, 0.20), (-0.01, 0.1), "not decidable"),  # the gain may be a bias towards "no"
        ((-0.058, 0.018), (-0.066, 0.067), "not supported"),  # session 27's two pairs: +5 points ruled out
        ((-0.10, 0.049), (0.01, 0.2), "not supported"),
        ((-0.02, 0.05), (-0.1, 0.1), "not decidable"),  # +5 points not ruled out (the bound is strict)
        ((None, None), (None, None), "not decidable"),  # one seed: no interval
    ],
)
def test_verdict_rule(gain_t95, bias_t95, answer):
    found = ood_module.verdict(splits_with(gain_t95, bias_t95, gain_mean=0.03))
    assert found["answer"] == answer and found["gain_mean"] == 0.03 and found["min_effect"] == 0.05
    line = ood_module.verdict_line({"seeds": 3, "verdict": found})
    assert answer in line and ("no interval" in line) == (gain_t95[0] is None)


def test_cli_dry_run_and_bad_setting(tmp_path):
    runner = CliRunner()
    args = ["ood", "--seeds", "2", "--gate", str(tmp_path / "none.json"), "--runs-root", str(tmp_path / "r"),
            "--results", str(tmp_path / "res")]  # fmt: skip
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "inject setting m1 (default)" in result.output and result.output.count("tracr-inject train") == 4
    assert "--accuracy-every 100" in result.output
    bad = runner.invoke(app, [*args, "--setting", "nope"])
    assert bad.exit_code != 0 and "Unknown setting 'nope'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "res").exists()
