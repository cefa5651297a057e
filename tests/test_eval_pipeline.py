"""`tracr-inject eval`, `compare` and `reproduce` end to end on tiny runs: the files they write, that the
numbers in metrics.json, report.md and the comparison agree, the clear errors for bad input, and that
reproduce skips finished work and resumes partial runs.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import warnings
from pathlib import Path

import pytest
from conftest import save_tiny_llama
from PIL import Image
from typer.testing import CliRunner

from tracr_injection.cli.main import app
from tracr_injection.compile.compiler import artifact_dir
from tracr_injection.evaluate.compare import CompareError, compare_runs
from tracr_injection.evaluate.pipeline import EvalSettings, default_out, evaluate_target
from tracr_injection.evaluate.report import pct
from tracr_injection.evaluate.subject import RunFolderError, TaskMismatchError, load_subject
from tracr_injection.experiments.budgets import SMOKE
from tracr_injection.experiments.reproduce import (
    claim,
    lock_holder,
    plan_runs,
    release,
    reproduce,
    run_state,
    status_rows,
)
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig, train
from tracr_injection.inject.probing import is_probe_line
from tracr_injection.tasks.base import UnknownTeacherError

SETTINGS = EvalSettings(
    max_examples=12, probe_examples=24, decoding_examples=8, causal_examples=8, interchange_pairs=8,
    language_windows=4, noise_norms=(0.0, 30.0), relative_norms=(0.0, 1.0),
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 4-block random Llama with SmolLM2's tokenizer, saved as a local model folder."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-model"), load_tokenizer("smollm2"), max_position_embeddings=256
    )


def tiny_train_config(model: str, out: Path, method: str, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        task="dyck", method=method, model=model, out=str(out), steps=4, batch_size=4, lr_lm=1e-3, lr_map=1e-2,
        warmup_steps=1, kl_windows=8, kl_window_len=8, kl_batch_size=2, kl_top_k=16, checkpoint_every=1000,
        eval_examples=8, seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def evaluated_runs(tiny_model, tmp_path_factory, module_cache):
    """Baseline (2 seeds) and inject (1 seed) tiny Dyck runs, each trained 4 steps and evaluated."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        runs = {}
        for method, seed in (("baseline", 0), ("baseline", 1), ("inject", 0)):
            out = root / f"dyck-{method}-s{seed}"
            train(tiny_train_config(tiny_model, out, method, seed), progress=False)
            evaluate_target(out, settings=SETTINGS, progress=False)
            runs[(method, seed)] = out
    return runs


def metrics_of(run: Path) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


def test_eval_writes_metrics_report_and_plots(evaluated_runs):
    run = evaluated_runs[("inject", 0)]
    metrics = metrics_of(run)
    assert metrics["subject"]["method"] == "inject" and metrics["subject"]["block"] == 3
    splits = {"test", "almost_balanced", "new_token", "length", "balanced_long", "length_5_90"}
    assert set(metrics["accuracy"]) == splits
    ab, bl = metrics["accuracy"]["almost_balanced"], metrics["accuracy"]["balanced_long"]
    balanced = (ab["accuracy"] + bl["accuracy"]) / 2
    assert metrics["ood"]["balanced_accuracy"]["accuracy"] == pytest.approx(balanced)
    bins = metrics["ood"]["almost_balanced_by_length"].values()
    assert sum(b["n"] for b in bins) == ab["n"] and sum(b["correct"] for b in bins) == ab["correct"]
    assert all(r["n"] == 12 for r in metrics["accuracy"].values())
    assert set(metrics["decoding"]) == {"map", "probe"}
    assert metrics["decoding"]["map"]["new_token"]["skipped"]  # '<' '>' are not program symbols
    assert metrics["causal"]["subspace"] == "map" and metrics["causal"]["k"] == 2  # yes / no dims
    assert metrics["causal"]["noise"]["output"][0] == metrics["causal"]["clean_accuracy"]  # norm 0
    report = (run / "eval" / "report.md").read_text()
    for split, result in metrics["accuracy"].items():
        assert f"| {split} | {result['kind']} | 12 | {100 * result['accuracy']:.1f}% |" in report
    assert "## Out of distribution: generalisation or bias?" in report
    for image in ("accuracy.png", "decoding_map.png", "decoding_probe.png", "noise.png"):
        assert f"({image})" in report
        width, height = Image.open(run / "eval" / image).size
        assert width > 300 and height > 150
    assert (run / "eval" / "probe.safetensors").is_file()
    readout = metrics["readout"]
    assert set(readout) == {"map", "probe"} and set(readout["map"]) == set(metrics["accuracy"])
    assert all(r["positions"] == 8 for r in readout["map"].values())  # decoding_examples, one answer each
    assert "## Answer readout" in report and "| map | almost_balanced | 8 |" in report


def test_eval_in_bf16_moves_only_what_the_lm_computes(evaluated_runs, tmp_path):
    """--precision bf16 runs the LMs under autocast: recorded, language metrics within bf16 rounding, what
    the teacher alone decides (decoding's majority shares, example counts) unchanged; bad values fail early."""
    import dataclasses

    run = evaluated_runs[("inject", 0)]
    fp32 = metrics_of(run)
    bf16 = json.loads((evaluate_target(run, out=tmp_path / "bf16", settings=dataclasses.replace(
        SETTINGS, precision="bf16"), progress=False) / "metrics.json").read_text())  # fmt: skip
    assert fp32["settings"]["precision"] == "fp32" and bf16["settings"]["precision"] == "bf16"
    assert {s: r["n"] for s, r in bf16["accuracy"].items()} == {s: r["n"] for s, r in fp32["accuracy"].items()}
    for split, result in fp32["decoding"]["map"].items():
        assert bf16["decoding"]["map"][split]["majority"] == result["majority"]
    for key in ("perplexity_original", "perplexity_trained"):
        assert bf16["language"][key] == pytest.approx(fp32["language"][key], rel=0.03)
    assert bf16["language"]["perplexity_trained"] != fp32["language"]["perplexity_trained"]  # bf16 did run
    assert metrics_of(run) == fp32  # its own evaluation untouched
    result = CliRunner().invoke(app, ["eval", str(run), "--precision", "fp16", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--precision must be one of fp32, bf16" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_readout_is_added_to_a_run_evaluated_before_it_existed(evaluated_runs, tmp_path):
    from tracr_injection.evaluate.pipeline import add_split_parts

    run = tmp_path / "old-run"
    shutil.copytree(evaluated_runs[("inject", 0)], run)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["base_model"]  # written before runs recorded the base model's folder and kept the teacher
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "teacher")
    path = run / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    expected = metrics.pop("readout")
    path.write_text(json.dumps(metrics))
    add_split_parts(run, progress=False)
    assert json.loads(path.read_text())["readout"] == expected  # same settings, same saved probe
    assert "## Answer readout" in (run / "eval" / "report.md").read_text()


def test_decoding_of_one_split_is_computed_again_for_an_older_evaluation(evaluated_runs, tmp_path):
    run = tmp_path / "older-run"
    shutil.copytree(evaluated_runs[("inject", 0)], run)
    path = run / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    expected = json.loads(json.dumps(metrics["decoding"]))
    for by_split in metrics["decoding"].values():  # as evaluated before majority and balanced existed
        for result in by_split.values():
            result.pop("majority"), result.pop("balanced")
    path.write_text(json.dumps(metrics))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(run), "--add", "decoding", "--split", "test"])
    assert result.exit_code == 0, result.output
    again = json.loads(path.read_text())["decoding"]
    assert again["map"]["test"] == expected["map"]["test"]  # the same numbers, majority and balanced back
    assert "majority" not in again["map"]["almost_balanced"]  # the other splits stay as they were
    result = runner.invoke(app, ["eval", str(run), "--add", "causal"])
    assert result.exit_code != 0 and "Cannot add ['causal']" in result.output


def test_baseline_is_probed_and_its_causal_subspace_comes_from_the_probe(evaluated_runs):
    metrics = metrics_of(evaluated_runs[("baseline", 0)])
    assert set(metrics["decoding"]) == {"probe"} and metrics["causal"]["subspace"] == "probe"
    assert metrics["subject"]["block"] == 3  # where inject would roll


def test_eval_baseline_sets_the_maps_decoding_beside_the_baselines_probe(evaluated_runs, tmp_path):
    from typer.testing import CliRunner

    from tracr_injection.cli.main import app
    from tracr_injection.tasks import get_task

    run, base = evaluated_runs[("inject", 0)], evaluated_runs[("baseline", 0)]
    folder = evaluate_target(run, out=tmp_path / "eval", settings=SETTINGS, progress=False, baseline=base)
    metrics = json.loads((folder / "metrics.json").read_text())
    table = metrics["baseline_comparison"]
    ours, theirs = metrics["decoding"]["map"], metrics_of(base)["decoding"]["probe"]
    assert table["baseline"]["name"] == base.name and table["baseline"]["method"] == "baseline"
    assert table["splits"] == [s for s in ours if not ours[s]["skipped"]] and "new_token" not in table["splits"]
    report = (folder / "report.md").read_text()
    assert "## Map decoding beside the baseline's probe" in report
    variables = get_task("dyck").teacher().config.variables
    assert list(table["variables"]) == [v.name for v in variables]
    for var in variables:
        row = table["variables"][var.name]
        assert row["level"] == var.level
        for split in table["splits"]:
            assert row[split] == {
                "map": ours[split]["accuracy"][var.name][var.level],
                "baseline_probe": theirs[split]["accuracy"][var.name][var.level],
                "majority": ours[split]["majority"][var.name][var.level],
                "map_balanced": ours[split]["balanced"][var.name][var.level],
                "baseline_probe_balanced": theirs[split]["balanced"][var.name][var.level],
                "map_as_number": ours[split]["as_number"].get(var.name, [None] * 9)[var.level],
                "baseline_probe_as_number": theirs[split]["as_number"].get(var.name, [None] * 9)[var.level],
            }
            assert (var.name in ours[split]["as_number"]) == (var.name in ("dyck_lhs", "dyck_rhs"))  # the counts
            assert ours[split]["majority"][var.name][var.level] == theirs[split]["majority"][var.name][var.level]
        cells = " | ".join(f"{pct(row[s]['map'])} | {pct(row[s]['baseline_probe'])}" for s in table["splits"])
        assert f"| {var.name} | L{var.level} | {cells} |" in report
    with pytest.raises(RunFolderError, match="is not an inject run"):
        evaluate_target(base, settings=SETTINGS, progress=False, baseline=run)
    result = CliRunner().invoke(app, ["eval", str(run), "--baseline", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "evaluate it first" in result.output


def test_comparison_is_mean_and_std_over_seeds(evaluated_runs, tmp_path):
    out = compare_runs(list(evaluated_runs.values()), tmp_path / "cmp")
    table = (out / "comparison.md").read_text()
    assert "| metric | baseline (n=2) | inject (n=1) |" in table
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    ratio = next(r for r in rows if r["method"] == "baseline" and r["metric"] == "perplexity ratio")
    seeds = [metrics_of(evaluated_runs[("baseline", s)])["language"]["perplexity_ratio"] for s in (0, 1)]
    assert float(ratio["mean"]) == pytest.approx(statistics.fmean(seeds))
    assert float(ratio["std"]) == pytest.approx(statistics.stdev(seeds))
    decode = next(r for r in rows if r["method"] == "baseline" and r["metric"] == "decode output (map)")
    assert decode["n"] == "0"  # a baseline has no map
    # the counts (dyck_lhs, dyck_rhs) through the inject run's map, at the level written, by argmax and as a number
    test_map = metrics_of(evaluated_runs[("inject", 0)])["decoding"]["map"]["test"]
    level = next(i for i, n in enumerate(test_map["positions"]["dyck_lhs"]) if n is not None)
    for metric, table in (("decode counts/diffs (map)", "accuracy"), ("decode counts/diffs as number (map)", "as_number")):
        row = next(r for r in rows if r["method"] == "inject" and r["metric"] == metric)
        expected = statistics.fmean(test_map[table][name][level] for name in ("dyck_lhs", "dyck_rhs"))
        assert float(row["mean"]) == pytest.approx(expected)
    readout = next(r for r in rows if r["method"] == "inject" and r["metric"] == "readout almost_balanced: subspace right")
    inject = metrics_of(evaluated_runs[("inject", 0)])
    assert float(readout["mean"]) == inject["readout"]["map"]["almost_balanced"]["subspace_accuracy"]
    assert Image.open(out / "comparison.png").size[0] > 300


def test_a_moved_run_is_evaluated_anywhere_without_the_teacher_cache(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tracr_injection.cli.main import app

    here, there, elsewhere, empty_cache = (tmp_path / n for n in ("here", "there", "elsewhere", "empty"))
    shutil.copytree(tiny_model, here / "tiny")
    monkeypatch.chdir(here)
    train(tiny_train_config("./tiny", Path("run"), "inject"), progress=False)  # the model as typed: relative
    manifest = json.loads((here / "run" / "manifest.json").read_text())
    assert manifest["model"] == "./tiny" and manifest["base_model"]["path"] == str(here / "tiny")
    assert json.loads((here / "run" / "teacher" / "teacher.json").read_text())["program_hash"] == (
        manifest["teacher_program_hash"]
    )
    cached = artifact_dir("dyck_trigger", manifest["teacher_program_hash"]) / "model.safetensors"
    assert (here / "run" / "teacher" / "model.safetensors").samefile(cached)  # a hard link: no space used
    evaluate_target("run", settings=SETTINGS, progress=False)

    shutil.copytree(here / "run", there / "run", ignore=shutil.ignore_patterns("eval"))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(empty_cache))
    evaluate_target(there / "run", settings=SETTINGS, progress=False)
    assert not (empty_cache / "teachers").exists()  # the run's own teacher copy, nothing compiled
    moved, original = metrics_of(there / "run"), metrics_of(here / "run")
    for part in ("accuracy", "language", "decoding", "readout", "causal"):
        assert moved[part] == original[part], part

    # On a machine without the base model's folder: a clear error naming --base-model, then the flag
    (here / "tiny").rename(tmp_path / "tiny-moved")
    with pytest.raises(RunFolderError, match=r"started from model './tiny' \(at .*here/tiny\).*--base-model"):
        load_subject(there / "run")
    result = CliRunner().invoke(app, ["eval", str(there / "run")])
    assert result.exit_code == 1 and "--base-model" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no fingerprint warning
        assert load_subject(there / "run", base_model=str(tmp_path / "tiny-moved")).base_model == str(
            tmp_path / "tiny-moved"
        )
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-moved")
    for weight in other.parameters():
        weight.data.add_(0.01)  # same config, other weights
    other.save_pretrained(tmp_path / "other")
    with pytest.warns(UserWarning, match="is not the model run .* was trained from"):
        load_subject(there / "run", base_model=str(tmp_path / "other"))
    result = CliRunner().invoke(
        app, ["eval", str(there / "run"), "--add", "readout", "--base-model", str(tmp_path / "tiny-moved")]
    )
    assert result.exit_code == 0, result.output


def test_a_model_is_evaluated_against_a_chosen_teacher_in_its_own_folder(tmp_path):
    model = save_tiny_llama(tmp_path / "deep", load_tokenizer("smollm2"), num_hidden_layers=12)  # hosts 12 levels
    default = load_subject(model, task="dyck")
    authors = load_subject(model, task="dyck", teacher="dyck_authors_trigger")
    names = (default.teacher.config.program_name, authors.teacher.config.program_name)
    assert names == ("dyck_trigger", "dyck_authors_trigger")
    assert authors.layer_map == list(range(authors.teacher.config.num_levels))  # one level per hidden state
    assert default_out(default).name == "deep-dyck" and default_out(authors).name == "deep-dyck-dyck_authors_trigger"


def test_bad_input_gives_clear_errors(evaluated_runs, tmp_path, tiny_model):
    with pytest.raises(TaskMismatchError, match="trained on task 'dyck', not 'count'"):
        load_subject(evaluated_runs[("inject", 0)], task="count")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="did not finish.*--resume"):
        load_subject(unfinished)
    with pytest.raises(TaskMismatchError, match="say which task"):
        load_subject(tiny_model)
    with pytest.raises(TaskMismatchError, match="--teacher only applies to a model"):
        load_subject(evaluated_runs[("inject", 0)], teacher="dyck_authors_trigger")
    with pytest.raises(UnknownTeacherError, match="cannot be taught by 'nope'"):
        load_subject(tiny_model, task="dyck", teacher="nope")
    result = CliRunner().invoke(app, ["eval", str(tiny_model), "--task", "dyck", "--teacher", "nope"])
    assert result.exit_code == 1 and "cannot be taught by 'nope'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["eval", str(tiny_model), "--add", "decoding", "--teacher", "dyck_trigger"])
    assert result.exit_code == 1 and "--teacher chooses the teacher" in result.output
    damaged = tmp_path / "damaged"
    shutil.copytree(evaluated_runs[("inject", 0)], damaged, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(RunFolderError, match="no model/ folder"):
        load_subject(damaged)
    with pytest.raises(CompareError, match="tracr-inject eval"):
        compare_runs([unfinished], tmp_path / "cmp")


def test_reproduce_skips_finished_work_and_resumes_partial_runs(tiny_model, tmp_path, monkeypatch):
    import tracr_injection.experiments.reproduce as reproduce_module

    monkeypatch.setattr(reproduce_module, "eval_settings", lambda budget: SETTINGS)
    runs = plan_runs(["dyck"], 1, SMOKE, tmp_path / "runs", tiny_model, tmp_path / "results")
    assert [(r.method, r.config.steps) for r in runs] == [("baseline", 4), ("inject", 4)]
    partial = runs[1]
    partial_config = TrainConfig(**{**partial.config.to_dict(), "steps": 3})
    train(partial_config, progress=False)  # killed after step 3: its last checkpoint is step 2
    (partial.out / "manifest.json").unlink()
    shutil.rmtree(partial.out / "model")
    assert [run_state(r) for r in runs] == ["todo", "partial"]
    assert status_rows(runs)[1]["steps"] == "2/4"

    states = []
    results = reproduce(["dyck"], 1, "smoke", runs_root=tmp_path / "runs", results_root=tmp_path / "results",
                        model=tiny_model, progress=False, on_run=lambda run, state: states.append(state))  # fmt: skip
    assert states == ["todo", "partial"]
    assert [run_state(r) for r in runs] == ["evaluated", "evaluated"]
    metrics = [json.loads(line) for line in (partial.out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if not is_probe_line(m)] == [1, 2, 3, 4]  # resumed at 3, not restarted
    assert not any((r.out / "checkpoints").exists() for r in runs)  # trained runs keep no checkpoints
    assert (results / "comparison.md").is_file() and (results / "runs" / partial.name / "report.md").is_file()
    experiment = json.loads((results / "experiment.json").read_text())
    assert [r["state"] for r in experiment["runs"]] == ["evaluated", "evaluated"]
    assert experiment["runs"][0]["train_command"].startswith(
        "tracr-inject train --task dyck --method baseline"
    )

    stamp = (partial.out / "eval" / "metrics.json").stat().st_mtime_ns
    states.clear()
    reproduce(["dyck"], 1, "smoke", runs_root=tmp_path / "runs", results_root=tmp_path / "results",
              model=tiny_model, progress=False, on_run=lambda run, state: states.append(state))  # fmt: skip
    assert states == ["evaluated", "evaluated"]
    assert (partial.out / "eval" / "metrics.json").stat().st_mtime_ns == stamp
    assert not any(r.folder.lock_file.exists() for r in runs)

    # A fresh machine: run folders gone, results/ committed -> nothing is trained again.
    shutil.rmtree(tmp_path / "runs")
    assert [run_state(r) for r in runs] == ["published", "published"]
    assert [row["steps"] for row in status_rows(runs)] == ["4/4", "4/4"]
    states.clear()
    reproduce(["dyck"], 1, "smoke", runs_root=tmp_path / "runs", results_root=tmp_path / "results",
              model=tiny_model, progress=False, on_run=lambda run, state: states.append(state))  # fmt: skip
    assert states == ["published", "published"] and not (tmp_path / "runs").exists()
    assert "baseline (n=1)" in (results / "comparison.md").read_text()

    # --fresh (the README's main job) trains and evaluates again, each time in a new folder, and leaves the
    # committed results alone as the reference.
    from typer.testing import CliRunner

    from tracr_injection.cli.main import app

    committed = {p: p.read_bytes() for p in sorted((tmp_path / "results").rglob("*")) if p.is_file()}
    fresh_args = ["reproduce", "--task", "dyck", "--seeds", "1", "--budget", "smoke", "--method", "baseline",
                  "--model", tiny_model, "--runs-root", str(tmp_path / "fresh"),
                  "--results", str(tmp_path / "results"), "--fresh"]  # fmt: skip
    for attempt in (1, 2):
        result = CliRunner().invoke(app, fresh_args)
        assert result.exit_code == 0, result.output
        assert "dyck-baseline-s0: todo" in result.output and "| metric | baseline (n=1) |" in result.output
        assert f"Compare with the committed reference: {results / 'comparison.md'}" in result.output
        assert len(list((tmp_path / "fresh").iterdir())) == attempt
    for root in (tmp_path / "fresh").iterdir():
        assert root.name.startswith("smoke-")
        assert (root / "smoke" / "dyck-baseline-s0" / "eval" / "metrics.json").is_file()
        assert (root / "results" / "smoke" / "comparison.md").is_file()
    assert {p: p.read_bytes() for p in sorted((tmp_path / "results").rglob("*")) if p.is_file()} == committed

    # A published run carries what a reader needs to check its training curves: every step's losses and
    # the probe lines, and the probe curves.
    for run in runs:
        records = [json.loads(line) for line in (run.published / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if not is_probe_line(r)] == list(range(1, run.config.steps + 1))
        assert any(is_probe_line(r) for r in records) and (run.published / "probes.png").is_file()

    # A run published before a config field existed (at its default now) still counts as done ...
    manifest_path = runs[0].published / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["alignment_scales"]
    manifest_path.write_text(json.dumps(manifest))
    assert [run_state(r) for r in runs] == ["published", "published"]
    # ... but one of another configuration (the budget changed since) does not.
    manifest["config"]["steps"] = 3
    manifest_path.write_text(json.dumps(manifest))
    assert [run_state(r) for r in runs] == ["todo", "published"]


def test_run_locks_let_processes_share_a_plan(tmp_path):
    import socket
    import subprocess
    import sys

    run = plan_runs(["dyck"], 1, SMOKE, tmp_path / "runs", "unused", tmp_path / "results")[0]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.out.mkdir(parents=True)
        run.folder.lock_file.write_text(f"{socket.gethostname()}:{other.pid}")
        assert lock_holder(run) == f"{socket.gethostname()}:{other.pid}"
        assert not claim(run)  # a live process holds it
        assert status_rows([run])[0]["state"].startswith("running")
    finally:
        other.kill()
        other.wait()
    assert lock_holder(run) is None  # its holder died
    assert claim(run) and claim(run)  # taken over; claiming again in the same process is fine
    release(run)
    assert not run.folder.lock_file.exists()


def test_cli_eval_compare_and_status(evaluated_runs, tmp_path, tiny_model):
    from typer.testing import CliRunner

    from tracr_injection.cli.main import app

    runner = CliRunner()
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    result = runner.invoke(app, ["eval", str(unfinished)])
    assert result.exit_code == 1 and "did not finish" in result.output
    result = runner.invoke(
        app, ["compare", *map(str, evaluated_runs.values()), "--out", str(tmp_path / "cmp")]
    )
    assert result.exit_code == 0 and "baseline (n=2)" in result.output
    result = runner.invoke(
        app,
        ["reproduce", "--task", "dyck", "--seeds", "2", "--budget", "smoke", "--status",
         "--runs-root", str(tmp_path / "runs"), "--model", tiny_model],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("todo") == 4 and "dyck-inject-s1" in result.output
