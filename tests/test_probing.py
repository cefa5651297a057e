"""Injection-strength probes during training (`inject.probing`) on tiny random models: when they are logged and
with which keys, that their decoding is evaluation's, that their gradient norms are a plain backward of one
term, that they leave the trained weights alone, and `eval --baseline`'s table.
"""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import save_tiny_llama
from test_inject import read_metrics, tensorboard_scalars, tiny_config
from transformers import AutoModelForCausalLM

from tracr_injection.evaluate.decoding import evaluate_decoding
from tracr_injection.evaluate.subject import load_subject
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig, train
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.linear_decoding import LinearDecoder, is_ordinal
from tracr_injection.inject.lm import decoder_blocks, load_causal_lm
from tracr_injection.inject.objective import InjectionObjective
from tracr_injection.inject.probing import (
    PROBE_EXAMPLES,
    block_groups,
    is_probe_line,
    plot_probes,
    probe_data,
    term_gradient_norms,
)
from tracr_injection.inject.run import RunFolder
from tracr_injection.inject.trainer import build_parts
from tracr_injection.tasks import get_task

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")

TERMS = ("task_ce", "alignment", "kl")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 6-block random Llama with SmolLM2's real tokenizer (blocks 4-5 come after the roll block 3)."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), load_tokenizer("smollm2"), num_hidden_layers=6
    )


def probe_lines(out) -> list[dict]:
    return [
        m
        for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        if is_probe_line(m)
    ]


def test_probes_are_logged_every_k_steps_with_the_expected_keys(tiny_llama, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_llama, out, steps=5, probe_every=2), progress=False)
    probes = probe_lines(out)
    assert [p["step"] for p in probes] == [0, 2, 4, 5]  # before training, every 2nd step, the last
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]  # step lines as before
    variables = get_task("reverse").teacher().config.variables
    ordinal = [v.name for v in variables if is_ordinal(v)]
    assert ordinal and len(ordinal) < len(variables)  # both kinds of variable are checked
    expected = {f"probe/decode/{split}/{v.name}" for split in ("test", "length") for v in variables}
    expected |= {f"probe/as_number/{split}/{v}" for split in ("test", "length") for v in ordinal}
    expected |= {f"probe/grad/{t}/{g}" for t in TERMS for g in ("early", "late")}
    assert set(probes[0]) == expected | {"step", "seconds"}
    reads = [p[k] for p in probes for k in p if ("/decode/" in k or "/as_number/" in k) and p[k] is not None]
    assert len(reads) > len(probes) * len(expected) // 2 and all(0.0 <= r <= 1.0 for r in reads)
    # the alignment reads hidden states 0..3 = the input of the roll block 3: nothing after it
    assert all(p["probe/grad/alignment/late"] == 0.0 < p["probe/grad/alignment/early"] for p in probes)
    assert probes[-1]["probe/grad/task_ce/late"] > 0
    tag = "probe/grad/task_ce/early"
    assert tensorboard_scalars(out, tag) == [p[tag] for p in probes]
    assert RunFolder(out).probe_plot.stat().st_size > 10_000


def test_baseline_probes_log_gradient_norms_only(tiny_llama, tmp_path):
    out = tmp_path / "baseline"
    train(tiny_config(tiny_llama, out, method="baseline", steps=2, probe_every=1), progress=False)
    probes = probe_lines(out)
    assert [p["step"] for p in probes] == [0, 1, 2]
    assert set(probes[0]) == {"step", "seconds"} | {
        f"probe/grad/{t}/{g}" for t in ("task_ce", "kl") for g in ("early", "late")
    }
    assert RunFolder(out).probe_plot.is_file()


def test_probing_leaves_the_trained_weights_and_losses_unchanged(tiny_llama, tmp_path):
    for every in (0, 1):
        train(
            tiny_config(tiny_llama, tmp_path / f"every-{every}", steps=4, probe_every=every), progress=False
        )
    assert not probe_lines(tmp_path / "every-0") and len(probe_lines(tmp_path / "every-1")) == 5
    lm = {
        e: AutoModelForCausalLM.from_pretrained(tmp_path / f"every-{e}" / "model").state_dict()
        for e in (0, 1)
    }
    for key, value in lm[0].items():
        assert torch.equal(value, lm[1][key]), key
    maps = {e: AlignmentMap.from_pretrained(tmp_path / f"every-{e}" / "map").state_dict() for e in (0, 1)}
    assert all(torch.equal(maps[0][k], maps[1][k]) for k in maps[0])
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(tmp_path / "every-0")]
    assert strip == [
        {k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(tmp_path / "every-1")
    ]


def test_probe_decoding_is_evaluations_decoding_of_the_trained_run(tiny_llama, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_llama, out, steps=6, probe_every=3), progress=False)
    last = probe_lines(out)[-1]
    assert last["step"] == 6  # the final weights, as saved
    subject = load_subject(out)
    teacher = subject.teacher
    assert subject.layer_map == [0, 1, 2, 3] and subject.tokenizer_name == tiny_llama
    decoder = LinearDecoder.from_map(subject.amap, teacher.config.num_levels)
    results = evaluate_decoding(subject, decoder, max_examples=PROBE_EXAMPLES)
    compared = 0
    for result in results:
        assert result.split in ("test", "length") and result.num_examples == PROBE_EXAMPLES
        for var in teacher.config.variables:
            assert last[f"probe/decode/{result.split}/{var.name}"] == result.accuracy[var.name][var.level]
            compared += result.accuracy[var.name][var.level] is not None
            if is_ordinal(var):
                as_number = result.as_number[var.name][var.level]
                assert as_number is not None
                assert last[f"probe/as_number/{result.split}/{var.name}"] == as_number
                compared += 1
    ordinal = sum(map(is_ordinal, teacher.config.variables))
    assert ordinal and compared == 2 * (len(teacher.config.variables) + ordinal)


def test_gradient_norms_are_a_plain_backward_of_each_term(tiny_llama, tmp_path):
    config = tiny_config(
        tiny_llama, tmp_path / "unused", steps=2, probe_every=1, alignment_weight=0.7, kl_weight=1.3
    )
    tokenizer = load_tokenizer(tiny_llama)
    model = load_causal_lm(tiny_llama)
    parts = build_parts(config, tokenizer, model, progress=False)
    objective = InjectionObjective(config, parts).eval()
    data = probe_data(config, tokenizer, parts.teacher, parts.kl_cache, with_map=True)
    groups = block_groups(model, 3)  # blocks 0-3 (up to the roll block) vs 4-5
    terms, _ = objective.terms(data.gradient, data.kl)
    norms = term_gradient_norms(terms, groups)
    assert set(norms) == set(TERMS)
    blocks = decoder_blocks(model)
    for name in TERMS:
        objective.zero_grad(set_to_none=True)
        alone, metrics = objective.terms(data.gradient, data.kl)
        alone[name].backward()
        for group, members in (("early", blocks[:4]), ("late", blocks[4:])):
            grads = [p.grad for block in members for p in block.parameters() if p.grad is not None]
            by_hand = math.sqrt(sum(float(g.square().sum()) for g in grads))
            assert norms[name][group] == pytest.approx(by_hand, rel=1e-5, abs=1e-9), (name, group)
    # the terms enter the loss with their weights
    assert alone["alignment"].item() == pytest.approx(0.7 * metrics["alignment"], rel=1e-6)
    assert alone["kl"].item() == pytest.approx(1.3 * metrics["kl"], rel=1e-6)
    assert norms["task_ce"]["late"] > 0 and norms["alignment"]["early"] > 0


def test_probe_every_is_checked_free_on_resume_and_optional_in_old_records():
    recorded = TrainConfig().to_dict()
    del recorded["probe_every"]  # a manifest or checkpoint written before the field existed
    assert TrainConfig.from_record(recorded) == TrainConfig()
    assert TrainConfig(probe_every=7).resume_key() == TrainConfig().resume_key()
    with pytest.raises(ValueError, match="probe_every must be >= 0"):
        TrainConfig(probe_every=-1)


def test_probe_plot_draws_every_split_and_the_as_number_panel(tmp_path):
    """Five splits (the Dyck task's ID split and four OOD ones, more than three dash styles), both reads and the
    gradient norms: one PNG with a panel for each read and one for the gradients."""
    splits = ["test", "almost_balanced", "balanced_long", "length", "length_5_90"]
    records = [
        {"step": step,
         **{f"probe/decode/{s}/{v}": 0.1 * i + 0.01 * step for i, s in enumerate(splits) for v in ("a", "b")},
         **{f"probe/as_number/{s}/b": 0.5 for s in splits},
         "probe/grad/task_ce/early": 1.0 + step, "probe/grad/alignment/early": 0.0}
        for step in (0, 25, 50)
    ]  # fmt: skip
    both = plt.imread(plot_probes(records, tmp_path / "both.png", {}, "test"))
    argmax_only = [{k: v for k, v in r.items() if "/as_number/" not in k} for r in records]
    one = plt.imread(plot_probes(argmax_only, tmp_path / "one.png", {}, "test"))
    assert both.shape[1] > 1.3 * one.shape[1] and both.shape[0] == one.shape[0]  # a third panel beside the two
    assert plot_probes([{"step": 0, "probe/decode/test/a": 1.0}], tmp_path / "none.png", {}, "test") is None
