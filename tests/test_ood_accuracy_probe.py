"""Accuracy over training (`TrainConfig.accuracy_every`, `probing.AccuracyProber`) on a tiny random model: when
its lines are logged and with which keys, that each is the task accuracy of the weights at that step on the
fixed examples, that it leaves the trained weights alone, and that old records (no field) still load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_llama
from test_inject import read_metrics, tensorboard_scalars, tiny_config
from transformers import AutoModelForCausalLM

from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig, train
from tracr_injection.inject.answers import answers_correct
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.probing import ACCURACY_EXAMPLES, accuracy_series, is_probe_line
from tracr_injection.inject.run import RunFolder

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer("smollm2"))


def probe_lines(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if is_probe_line(m)]


def test_accuracy_lines_every_k_steps_match_the_trained_model(tiny_llama, tmp_path):
    out = tmp_path / "scored"
    config = tiny_config(tiny_llama, out, method="baseline", steps=3, probe_every=0, accuracy_every=2)
    train(config, progress=False)
    lines = probe_lines(out)
    assert [p["step"] for p in lines] == [0, 2, 3]  # before training, every 2nd step, the last
    assert set(lines[0]) == {
        "step",
        "seconds",
        "probe/accuracy/test",
        "probe/accuracy/length",
    }  # reverse's splits
    tokenizer = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for split in ("test", "length"):
        data = TaskData("reverse", split, tokenizer, tiny_llama, max_examples=ACCURACY_EXAMPLES, seed=0)
        assert len(data) == ACCURACY_EXAMPLES
        expected = float(answers_correct(model, data, len(data)).float().mean())
        assert lines[-1][f"probe/accuracy/{split}"] == pytest.approx(expected)
        assert tensorboard_scalars(out, f"probe/accuracy/{split}") == [
            p[f"probe/accuracy/{split}"] for p in lines
        ]
    assert accuracy_series(lines)["test"] == [(p["step"], p["probe/accuracy/test"]) for p in lines]
    assert RunFolder(out).accuracy_plot.stat().st_size > 5_000
    # the same config without accuracy lines trains the same weights and step lines
    plain = tmp_path / "plain"
    train(tiny_config(tiny_llama, plain, method="baseline", steps=3, probe_every=0), progress=False)
    assert not probe_lines(plain)
    ours, theirs = (AutoModelForCausalLM.from_pretrained(p / "model").state_dict() for p in (out, plain))
    assert all(torch.equal(value, theirs[key]) for key, value in ours.items())
    strip = [[{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(p)] for p in (out, plain)]
    assert strip[0] == strip[1]


def test_accuracy_every_defaults_off_and_is_free_on_resume():
    record = TrainConfig().to_dict()
    del record["accuracy_every"]  # a record written before the field existed
    assert TrainConfig.from_record(record).accuracy_every == 0
    assert TrainConfig(accuracy_every=100).resume_key() == TrainConfig().resume_key()
    assert "--accuracy-every 100" in TrainConfig(accuracy_every=100).command()
