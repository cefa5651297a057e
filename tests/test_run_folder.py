"""The run folder (`inject.run`): a finished run saved and loaded back unchanged, every committed manifest
under results/ still read (and written back with the same keys in the same order), checkpoints found in step
order, a run published without weights, clear errors for unfinished or damaged folders, and no module but
`inject.run` spelling the folder's file names.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from test_eval_decoding import toy_config

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import run as run_module
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.run import BaseModelRecord, Manifest, Run, RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "results").rglob("manifest.json"))
OLD_KEYS = [  # what `train` wrote before the manifest had a type, in its order
    "task", "method", "model", "base_model", "teacher_program", "teacher_program_hash", "layer_mapping",
    "roll_block", "config", "seed", "versions", "num_processes", "distributed", "test_accuracy_before",
    "test_accuracy_after", "eval_examples",
]  # fmt: skip
LAYOUT_NAMES = [
    run_module.MANIFEST_NAME, run_module.METRICS_NAME, run_module.STATE_NAME, run_module.CHECKPOINTS_DIR,
    run_module.EVALUATION_NAME, run_module.RECORD_NAME, run_module.LOCK_NAME, run_module.PROBE_PLOT,
    run_module.ACCURACY_PLOT,
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def full_manifest(method: str = "inject", **fields) -> Manifest:
    """A manifest with every field `train` fills."""
    config = TrainConfig(task="dyck", method=method, model="tiny", out="runs/x")
    values = {
        "task": "dyck", "method": method, "model": "tiny", "base_model": BaseModelRecord("tiny", "/models/tiny", "abc"),
        "teacher_program": "toy", "teacher_program_hash": "toy", "layer_mapping": [0, 1],
        "roll_block": 1 if method == "inject" else None, "config": config, "seed": 0, "versions": {"torch": "2"},
        "num_processes": 1, "distributed": "DistributedType.NO", "eval_split": "test", "accuracy_before": 0.25,
        "accuracy_after": 0.75, "eval_examples": 8,
    }  # fmt: skip
    return Manifest(**{**values, **fields})


def test_a_saved_run_loads_back_unchanged(tmp_path, tokenizer):
    teacher = TeacherModel(toy_config())
    model = build_tiny_llama(tokenizer)
    torch.manual_seed(1)
    amap = AlignmentMap(32, teacher.config.d_model)
    manifest = full_manifest(alignment_variable_scales={"size": 2.0}, map_init_fit=0.125)
    folder = Run(manifest, model, tokenizer, teacher, amap).save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in folder.path.iterdir()) == ["manifest.json", "map", "model", "teacher"]
    loaded = Run.from_pretrained(tmp_path / "run")
    assert loaded.manifest == manifest
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert torch.equal(loaded.amap.linear.weight, amap.linear.weight)
    assert loaded.teacher.config == teacher.config
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_a_baseline_has_no_map_and_writes_its_roll_block_as_null(tmp_path, tokenizer):
    manifest = full_manifest("baseline")
    Run(manifest, build_tiny_llama(tokenizer), tokenizer, TeacherModel(toy_config())).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert list(written) == OLD_KEYS and written["roll_block"] is None
    loaded = Run.from_pretrained(tmp_path)
    assert loaded.amap is None and loaded.manifest == manifest and not (tmp_path / "map").exists()


def test_the_manifest_keeps_the_keys_train_always_wrote():
    manifest = full_manifest(eval_split="ood", alignment_variable_scales={"v": 1.5}, map_init_fit=0.5)
    values = manifest.to_dict()
    expected = [k.replace("test_", "ood_") for k in OLD_KEYS] + ["alignment_variable_scales", "map_init_fit"]
    assert list(values) == expected
    assert values["ood_accuracy_after"] == 0.75 and values["config"] == manifest.config.to_dict()
    assert values["base_model"] == {"name": "tiny", "path": "/models/tiny", "fingerprint": "abc"}
    assert Manifest.from_dict(values) == manifest


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_every_committed_manifest_loads(path):
    values = json.loads(path.read_text())
    manifest = RunFolder(path.parent).read_manifest()
    assert manifest.eval_split == "test" and manifest.accuracy_after == values["test_accuracy_after"]
    assert manifest.config.seed == values["seed"] and manifest.base_model_record.name == values["model"]
    # written back: the same keys in the same order, the config with the fields added since at their defaults
    assert manifest.to_dict() == {**values, "config": TrainConfig.from_record(values["config"]).to_dict()}
    assert list(manifest.to_dict()) == list(values)


def test_results_hold_committed_manifests():
    assert len(COMMITTED) >= 36, "the committed manifests under results/ moved; point COMMITTED at them"


def test_a_minimal_old_manifest_loads_with_the_rest_unknown(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"task": "dyck", "method": "inject", "model": "m", "layer_mapping": [0, 1], "roll_block": 1})
    )
    manifest = RunFolder(tmp_path).read_manifest()
    assert manifest.config is None and manifest.accuracy_before is None and manifest.eval_split is None
    assert manifest.base_model_record == BaseModelRecord("m")
    assert list(manifest.to_dict()) == ["task", "method", "model", "layer_mapping", "roll_block"]


def test_unfinished_and_damaged_folders_are_clear_errors(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(RunFolderError, match="has no manifest.json; pass a folder written by"):
        folder.read_manifest()
    folder.checkpoint_dir(2).mkdir(parents=True)
    with pytest.raises(RunFolderError, match="did not finish.*--resume"):
        folder.read_manifest()
    folder.manifest_file.write_text("{")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        folder.read_manifest()
    folder.manifest_file.write_text(json.dumps({"task": "dyck"}))
    with pytest.raises(RunFolderError, match="is not a run's manifest"):
        folder.read_manifest()
    folder.write_manifest(full_manifest())
    with pytest.raises(RunFolderError, match="no model/ folder"):
        Run.from_pretrained(folder.path)


def test_checkpoints_are_the_finished_ones_in_step_order(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.checkpoints() == [] and folder.last_checkpoint_step() == 0
    for step in (10, 2, 4):
        folder.checkpoint_dir(step).mkdir(parents=True)
        RunFolder.state_file(folder.checkpoint_dir(step)).write_text("{}")
    folder.checkpoint_dir(12).mkdir()  # cut short: no state file
    assert [d.name for d in folder.checkpoints()] == ["step-2", "step-4", "step-10"]
    assert folder.last_checkpoint_step() == 10
    folder.remove_checkpoints()
    assert not folder.checkpoints_dir.exists()


def test_a_published_run_has_no_weights_and_its_evaluation_at_the_top(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.eval_dir.mkdir(parents=True)
    for path in (run.evaluation_file, run.eval_dir / "report.md", run.eval_dir / "probe.safetensors"):
        path.write_text("x")
    for path in (run.manifest_file, run.metrics_file, run.record_file, run.probe_plot):
        path.write_text("y")
    run.model_dir.mkdir()
    assert run.find_evaluation() == run.evaluation_file
    published = run.publish(tmp_path / "results" / "run")
    names = sorted(p.name for p in published.path.iterdir())
    assert names == ["manifest.json", "metrics.json", "metrics.jsonl", "probes.png", "report.md", "reproduce.json"]
    assert published.find_evaluation() == published.path / "metrics.json" and published.is_finished


def layout_literals(path: Path) -> list[str]:
    """Strings in `path`'s code (docstrings aside) that spell one of the run folder's file names as a path."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    pattern = re.compile(rf"(^|/)({'|'.join(map(re.escape, LAYOUT_NAMES))})(/|$)")
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        and pattern.search(node.value)
    ]  # fmt: skip


def test_only_the_run_module_spells_the_folder_layout():
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "analysis").glob("*.py"), ROOT / "benchmarks" / "gpu_plan.py"]
    found = [line for path in sources if path != Path(run_module.__file__) for line in layout_literals(path)]
    assert not found, "use inject.run.RunFolder instead of these names:\n" + "\n".join(found)
    assert layout_literals(Path(run_module.__file__))  # the scan sees the names where they are spelled
