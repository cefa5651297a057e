"""Bad input to `tracr-inject`: each case is one `error:` line on stderr, a non-zero exit and no traceback,
found before the LM loads, and nothing already written is lost; a real bug still raises.  Also: the
config's YAML and field checks, the names the README documents in `tracr_injection.evaluate`, and
`__version__`.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from conftest import save_tiny_llama
from typer.testing import CliRunner

import tracr_injection
import tracr_injection.evaluate.subject as subject_module
import tracr_injection.inject.run as run_module
import tracr_injection.inject.trainer as trainer_module
from tracr_injection.cli.main import app
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.config import ConfigError, TrainConfig
from tracr_injection.inject.run import RunFolder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    """A 4-block random Llama over SmolLM2's tokenizer, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), tokenizer)


@pytest.fixture
def no_lm_loading(monkeypatch):
    """Fail the test if training or evaluation starts loading an LM (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the LM was loaded before the bad input was reported")

    monkeypatch.setattr(trainer_module, "load_causal_lm", refuse)
    monkeypatch.setattr(subject_module, "load_causal_lm", refuse)
    monkeypatch.setattr(run_module, "load_causal_lm", refuse)


def cli_error(args: list[str]) -> str:
    """Run the CLI; assert a non-zero exit with exactly one `error:` line and no traceback; return the line."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr  # (progress bars aside)
    return errors[0]


def fake_run(folder: Path, model: str, tokenizer) -> Path:
    """A finished inject run folder as `train` leaves it (manifest, model/, map/), without training."""
    folder.mkdir()
    manifest = {"task": "dyck", "method": "inject", "model": model, "layer_mapping": [0, 1], "roll_block": 1}
    RunFolder(folder).manifest_file.write_text(json.dumps(manifest))
    save_tiny_llama(folder / "model", tokenizer)
    AlignmentMap(32, 8).save_pretrained(folder / "map")
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_unknown_task_in_train_is_reported_before_the_lm_loads(tiny_model, no_lm_loading):
    line = cli_error(["train", "--task", "nosuchtask", "--model", tiny_model])
    assert "Unknown task 'nosuchtask'; registered:" in line and "dyck" in line


def test_unknown_task_in_eval_is_reported_before_the_lm_loads(no_lm_loading):
    assert "Unknown task 'nosuch'" in cli_error(["eval", "smollm2", "--task", "nosuch"])


def test_missing_tokenizer_folder():
    assert "'/nonexistent' is not an existing folder" in cli_error(["tasks", "--tokenizer", "/nonexistent"])


@pytest.mark.parametrize("length", ["-5", "0"])
def test_max_len_below_one_is_rejected_not_replaced(length, isolated_cache):
    assert f"--max-len) must be >= 1, got {length}" in cli_error(["compile", "length", "--max-len", length])
    assert not (isolated_cache / "teachers").exists()  # nothing was compiled at another length


def test_truncated_model_weights_are_named(tmp_path, tiny_model, tokenizer):
    run = fake_run(tmp_path / "run", tiny_model, tokenizer)
    truncate(run / "model" / "model.safetensors")
    line = cli_error(["eval", run])
    assert f"{run / 'model' / 'model.safetensors'} is damaged or truncated" in line
    assert line.endswith("re-train or restore it.")


def test_truncated_map_is_reported(tmp_path, tiny_model, tokenizer):
    run = fake_run(tmp_path / "run", tiny_model, tokenizer)
    truncate(run / "map" / "map.safetensors")
    line = cli_error(["eval", run])
    assert f"alignment map from {run / 'map'}" in line and "re-train or restore it" in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps: [1\n", "is not valid YAML at line 2, column 1"),
        ("steps: ten\n", "steps must be an integer, got 'ten'"),
        ("just a string\n", "must hold a mapping of TrainConfig fields (e.g. `steps: 300`), not a str"),
        ("stpes: 10\n", "Unknown keys in"),
    ],
)
def test_bad_config_files(text, expected, tmp_path, no_lm_loading):
    config = tmp_path / "my.yaml"
    config.write_text(text)
    line = cli_error(["train", "--config", config])
    assert expected in line and str(config) in line


def test_missing_config_file(tmp_path, no_lm_loading):
    line = cli_error(["train", "--config", tmp_path / "nope.yaml"])
    assert "Cannot read the config file" in line and "No such file or directory" in line


def test_eval_of_a_missing_folder_says_it_does_not_exist():
    line = cli_error(["eval", "runs/typo"])
    assert "runs/typo does not exist" in line and "is a model" not in line


def test_compare_of_a_missing_run_leaves_no_output_folder(tmp_path):
    out = tmp_path / "cmp"
    assert "runs/nope does not exist" in cli_error(["compare", "runs/nope", "--out", out])
    assert not out.exists()


def test_inspect_of_a_missing_folder_is_not_called_a_program():
    line = cli_error(["inspect", "/missing/dir"])
    assert "/missing/dir is not a folder" in line and "Unknown program" not in line


def test_default_kl_top_k_beyond_a_small_vocabulary_names_the_flag(tmp_path, tokenizer, no_lm_loading):
    small = save_tiny_llama(tmp_path / "small-vocab", tokenizer, vocab_size=512)
    line = cli_error(["train", "--model", small, "--out", tmp_path / "run"])
    assert "kl_top_k 1024 is more than the vocabulary" in line and "--kl-top-k 512 or less" in line


def test_changed_config_on_resume_is_found_before_the_lm_loads(tmp_path, tiny_model, no_lm_loading):
    out = tmp_path / "run"
    recorded = TrainConfig(model=tiny_model, out=str(out), kl_top_k=16)
    checkpoint = out / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    RunFolder.state_file(checkpoint).write_text(json.dumps({"step": 2, "config": recorded.resume_key()}))
    args = ["train", "--model", tiny_model, "--out", out, "--kl-top-k", "16", "--resume"]
    assert "different configuration (['lr_lm'])" in cli_error([*args, "--lr-lm", "5e-4"])


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model, tokenizer, no_lm_loading):
    run = fake_run(tmp_path / "run", tiny_model, tokenizer)
    before = RunFolder(run).manifest_file.read_text()
    for resume in ([], ["--resume"]):
        line = cli_error(["train", "--model", tiny_model, "--out", run, "--kl-top-k", "16", *resume])
        assert "already holds a finished run" in line
    assert RunFolder(run).manifest_file.read_text() == before


def test_a_long_message_stays_on_one_line(tmp_path, no_lm_loading):
    config = tmp_path / "my.yaml"
    config.write_text("a_key_that_does_not_exist: 1\n")
    line = cli_error(["train", "--config", config])  # ~600 characters
    assert len(line) > 400 and "eval_examples" in line


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_bug_still_raises(monkeypatch, error):
    def broken(*args, **kwargs):
        raise error("a bug")

    monkeypatch.setattr("tracr_injection.hub.load_tokenizer", broken)
    result = CliRunner().invoke(app, ["tasks"])
    assert type(result.exception) is error  # a ValueError from a bug is not passed off as bad input


def test_an_unknown_setting_and_a_damaged_gate_are_one_line(tmp_path):
    assert "Unknown setting 'm7'" in cli_error(["ood", "--setting", "m7", "--dry-run"])
    gate = tmp_path / "gate.json"
    gate.write_text('{"steps": 400}')
    line = cli_error(["ood", "--gate", gate, "--dry-run", "--runs-root", tmp_path / "runs"])
    assert "is not a sweep's gate.json" in line and "--setting NAME" in line
    assert gate.read_text() == '{"steps": 400}'  # nothing written is lost


def test_yaml_config_values_and_flags():
    assert TrainConfig(lr_lm=1, roll_block=None).lr_lm == 1
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1, got 0"):
        TrainConfig(keep_checkpoints=0)
    with pytest.raises(ConfigError, match="kl_top_k must be an integer, got True"):
        TrainConfig(kl_top_k=True)
    with pytest.raises(ConfigError, match="factor of 'v' must be > 0"):
        TrainConfig(alignment_scales={"v": 0.0})


def test_yaml_exponent_floats_and_flag_overrides(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("lr_lm: 1e-5\nsteps: 10\nalignment_scales: {frac_open: 10}\nroll_block: 3\n")
    loaded = TrainConfig.load(config, steps=5, seed=None)
    assert (loaded.lr_lm, loaded.steps, loaded.seed, loaded.roll_block) == (1e-5, 5, 0, 3)
    assert loaded.alignment_scales == {"frac_open": 10}
    (tmp_path / "empty.yaml").write_text("")
    assert TrainConfig.load(tmp_path / "empty.yaml") == TrainConfig()


def test_readme_evaluate_names_are_importable():
    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"function in `tracr_injection\.evaluate` \(([^)]*)\)", readme)
    names = [name for group in re.findall(r"`([^`]+)`", sentence.group(1)) for name in group.split("/")]
    assert len(names) == 7
    from tracr_injection import evaluate

    for name in names:
        assert callable(getattr(evaluate, name)), name
    assert set(names) <= set(evaluate.__all__)


def test_version_is_the_projects():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert tracr_injection.__version__ == project["version"]
    assert run_module.versions()["tracr_injection"] == project["version"]
