"""`tracr-inject answer-path` on a tiny Dyck inject run: its numbers against computations that do not go
through it (a plain forward, teacher-forced exact match, the training objective's own task loss with and
without subspace forcing, the teacher's decode of the truth, a plain backward), the CLI printing the same
JSON, and one clear line for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from typer.testing import CliRunner

import tracr_injection.evaluate.subject as subject_module
import tracr_injection.inject.run as run_module
from tracr_injection.cli.main import app
from tracr_injection.evaluate.answer_path import (
    CONDITIONS,
    GRADIENT_BATCHES,
    AnswerPathError,
    answer_path,
    run_objective,
)
from tracr_injection.evaluate.subject import load_subject
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig, train
from tracr_injection.inject.answers import answer_positions, answers_correct
from tracr_injection.inject.lm import decoder_blocks, hidden_states
from tracr_injection.inject.run import RunFolder
from tracr_injection.inject.trainer import build_parts

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")
EXAMPLES, BATCH = 16, 8  # two batches; every Dyck answer is two tokens, so batch means average evenly


@pytest.fixture(scope="module")
def run(tmp_path_factory, module_cache) -> Path:
    """A 6-block tiny Llama trained 4 steps on Dyck with injection (roll block 3, blocks 4-5 after it)."""
    root = tmp_path_factory.mktemp("answer-path")
    model = save_tiny_llama(root / "model", load_tokenizer("smollm2"), num_hidden_layers=6)
    config = TrainConfig(
        task="dyck", method="inject", model=model, out=str(root / "run"), steps=4, batch_size=4, lr_lm=1e-3,
        lr_map=1e-2, warmup_steps=1, kl_windows=8, kl_window_len=8, kl_batch_size=2, kl_top_k=16,
        checkpoint_every=1000, eval_examples=8, probe_every=0,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        train(config, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def measured(run, module_cache):
    """The run's subject, its measured answer path and the examples measured."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        subject = load_subject(run)
        result = answer_path(subject, EXAMPLES, BATCH)
        data = subject.task_data("train", EXAMPLES, seed=0, with_targets=True)
    return subject, result, data


def batches(data) -> list[dict[str, torch.Tensor]]:
    return [data.collate(list(range(start, start + BATCH))) for start in range(0, len(data), BATCH)]


def test_unedited_answer_ce_accuracy_and_exact_match_are_a_plain_forward(measured):
    subject, result, data = measured
    assert result["examples"] == EXAMPLES and result["roll_block"] == 3
    assert set(result["conditions"]) == set(CONDITIONS)
    ce, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches(data):
            logits_BPV = subject.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            b_idx, pos, target = answer_positions(batch["labels"])
            logits_NV = logits_BPV[b_idx, pos]
            ce += float(torch.nn.functional.cross_entropy(logits_NV, target, reduction="sum"))
            hits += int((logits_NV.argmax(-1) == target).sum())
            count += len(target)
    plain = result["conditions"]["plain"]
    assert plain["answer_ce"] == pytest.approx(ce / count, abs=1e-4)
    assert plain["token_accuracy"] == round(hits / count, 4)
    exact = answers_correct(subject.model, data, EXAMPLES).float().mean()
    assert plain["exact_match"] == round(float(exact), 4)


def test_rolled_answer_ce_is_the_training_objectives_task_loss(measured):
    subject, result, data = measured
    objective = run_objective(subject, data)
    with torch.no_grad():
        rolled = [float(objective.terms(b)[0]["task_ce"]) for b in batches(data)]
        forced = [float(objective.terms(b, force_subspace=True)[0]["task_ce"]) for b in batches(data)]
    assert result["conditions"]["roll"]["answer_ce"] == pytest.approx(sum(rolled) / len(rolled), abs=1e-4)
    forced_ce = sum(forced) / len(forced)
    assert result["conditions"]["roll_truth"]["answer_ce"] == pytest.approx(forced_ce, abs=1e-4)
    assert result["conditions"]["roll_empty"]["answer_ce"] != result["conditions"]["roll"]["answer_ce"]


def test_map_output_accuracy_matches_the_teachers_decode(measured):
    subject, result, data = measured
    config = subject.teacher.config
    output = config.variable(config.output_variable)
    right = {"last_level": 0, "roll_point": 0}
    total = 0
    with torch.no_grad():
        for batch in batches(data):
            states = hidden_states(subject.model, batch["input_ids"], batch["attention_mask"])
            b_idx, pos, _ = answer_positions(batch["labels"])
            truth = subject.teacher.decode_variable(batch["teacher_final"][b_idx, pos], output.name)
            for name, index in (("last_level", subject.layer_map[-1]), ("roll_point", subject.block + 1)):
                mapped_NK = subject.amap(states[index][b_idx, pos])[:, list(output.dims)]
                decoded = [output.values[i] for i in mapped_NK.argmax(-1).tolist()]
                right[name] += sum(d == t for d, t in zip(decoded, truth))
            total += len(truth)
    for name in right:
        assert result["map_output_accuracy"][name]["overall"] == round(right[name] / total, 4)


def test_early_block_gradient_norms_are_a_plain_backward(measured):
    subject, result, data = measured
    objective = run_objective(subject, data)
    early = [p for block in decoder_blocks(subject.model)[: subject.block + 1] for p in block.parameters()]
    used = batches(data)[:GRADIENT_BATCHES]
    norms = {"task_ce": 0.0, "alignment": 0.0}
    for name in norms:
        for batch in used:
            subject.model.zero_grad()
            objective.terms(batch)[0][name].backward()
            squares = sum(float(p.grad.square().sum()) for p in early if p.grad is not None)
            norms[name] += squares**0.5 / len(used)
    subject.model.zero_grad()
    assert result["early_block_gradient_norms"] == pytest.approx(norms, abs=1e-4)
    assert norms["task_ce"] > 0 and norms["alignment"] > 0


def test_the_rebuilt_objective_stretches_the_cosine_as_an_equal_weighting_run_trained(tmp_path, module_cache):
    model = save_tiny_llama(tmp_path / "model", load_tokenizer("smollm2"), num_hidden_layers=6)
    config = TrainConfig(
        task="dyck", method="inject", model=model, out=str(tmp_path / "run"), steps=2, batch_size=4,
        warmup_steps=1, kl_windows=8, kl_window_len=8, kl_batch_size=2, kl_top_k=16, checkpoint_every=1000,
        eval_examples=8, probe_every=0, alignment_variable_weighting="equal",
    )  # fmt: skip
    train(config, progress=False)
    subject = load_subject(tmp_path / "run")
    data = subject.task_data("train", EXAMPLES, seed=0, with_targets=True)
    trained = build_parts(config, subject.tokenizer, subject.model, progress=False)  # the trainer's own scales
    assert trained.variable_scales and (trained.dim_scales != 1).any()
    rebuilt = run_objective(subject, data).parts
    assert rebuilt.variable_scales == pytest.approx(trained.variable_scales)
    assert torch.allclose(rebuilt.dim_scales, trained.dim_scales)


def test_cli_prints_the_same_json(run, measured, module_cache, monkeypatch):
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
    args = ["answer-path", str(run), "--examples", str(EXAMPLES), "--batch-size", str(BATCH)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == json.loads(json.dumps(measured[1]))


def cli_error(args: list[str]) -> str:
    """Run the CLI; assert exit 1 with exactly one `error:` line on stderr and no traceback; return it."""
    result = CliRunner().invoke(app, ["answer-path", *map(str, args)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr
    return lines[0]


def test_bad_input_is_one_clear_line(run, tmp_path, monkeypatch, module_cache):
    monkeypatch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
    assert "is not a run folder" in cli_error([tmp_path / "missing"])
    assert "is not a run folder" in cli_error([run / "model"])  # a model folder, not a run

    def refuse(*args, **kwargs):
        raise AssertionError("the LM was loaded before the bad sizes were reported")

    with monkeypatch.context() as patch:
        patch.setattr(subject_module, "load_causal_lm", refuse)
        patch.setattr(run_module, "load_causal_lm", refuse)
        line = cli_error([run, "--examples", "0"])
    assert "--examples and --batch-size must be at least 1, got 0 and 8" in line
    assert "has no split 'nosuch'" in cli_error([run, "--split", "nosuch", "--examples", "2"])
    baseline = tmp_path / "baseline"
    shutil.copytree(run, baseline, ignore=shutil.ignore_patterns("map", "teacher", "tensorboard"))
    manifest_file = RunFolder(baseline).manifest_file
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "method": "baseline"}))
    assert "baseline is a baseline run" in cli_error([baseline])
    with pytest.raises(AnswerPathError, match="at least 1"):
        answer_path(load_subject(run), examples=4, batch_size=0)
