"""Evaluate stage, the shared split pass: its accuracy, decoding counts and readout rows equal the standalone
paths (greedy generation of every prompt, `evaluate_decoding` per decoder, `answer_readout`) on a tiny Llama
with the real Dyck teacher, and the vectorised truth decode equals `TeacherModel.decode_variable`."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from tracr_injection.evaluate.accuracy import split_accuracy
from tracr_injection.evaluate.decoding import LinearDecoder, evaluate_decoding
from tracr_injection.evaluate.readout import answer_readout, readout_rates, symbol_tokens
from tracr_injection.evaluate.split_pass import PassInputs, length_sorted_batches, split_pass
from tracr_injection.evaluate.subject import PRETRAINED, Subject
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (
    NO_VALUE,
    OFF_VALUES,
    accuracy_table,
    balanced_table,
    majority_table,
    position_table,
    true_indices,
)
from tracr_injection.tasks import get_task

pytestmark = pytest.mark.usefixtures("shared_cache")
TOKENIZER = "smollm2"
LAYER_MAP = [0, 1, 2, 3]
COUNT = 12


@pytest.fixture(scope="module")
def setup(module_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        teacher = get_task("dyck").teacher()
    tokenizer = load_tokenizer(TOKENIZER)
    model = build_tiny_llama(tokenizer).eval()
    torch.manual_seed(3)
    config = teacher.config
    generator = torch.Generator().manual_seed(1)
    probe = LinearDecoder(
        "probe",
        torch.randn(config.num_levels, config.d_model, 32, generator=generator),
        torch.randn(config.num_levels, config.d_model, generator=generator),
    )
    decoders = {
        "map": LinearDecoder.from_map(AlignmentMap(32, config.d_model), config.num_levels),
        "probe": probe,
    }
    return teacher, tokenizer, model, decoders


def run_pass(setup, split: str, count: int, decoded: int):
    teacher, tokenizer, model, decoders = setup
    data = TaskData("dyck", split, tokenizer, TOKENIZER, max_examples=count, progress=False)
    with_teacher = TaskData(
        "dyck", split, tokenizer, TOKENIZER, teacher=teacher, max_examples=decoded, progress=False
    )
    inputs = PassInputs(data, LAYER_MAP, decoders, teacher, with_teacher.targets, decoded)
    return data, split_pass(model, inputs, batch_size=5)


def test_length_sorted_batches_cover_every_example_once_shortest_first():
    batches = length_sorted_batches([5, 2, 9, 2, 7], 2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_accuracy_from_the_pass_equals_greedy_generation_of_every_prompt(setup):
    _, tokenizer, model, _ = setup
    data, result = run_pass(setup, "test", 20, 8)
    forced = result.correct_N.tolist()
    dyck = get_task("dyck")
    fast = split_accuracy(
        model, tokenizer, dyck, "test", max_examples=20, batch_size=8, forced_correct=forced
    )
    reference = split_accuracy(model, tokenizer, dyck, "test", max_examples=20, batch_size=8)
    assert fast == reference
    assert len(data) == 20


@pytest.mark.parametrize("split", ["test", "almost_balanced"])
def test_decoding_counts_from_the_pass_equal_evaluate_decoding_per_decoder(setup, split):
    teacher, tokenizer, model, decoders = setup
    _, result = run_pass(setup, split, COUNT + 4, COUNT)  # more examples than decoded: only the first count
    subject = Subject(
        name="tiny", task="dyck", method=PRETRAINED, model=model, tokenizer=tokenizer,
        tokenizer_name=TOKENIZER, base_model=TOKENIZER, teacher=teacher, amap=None, layer_map=LAYER_MAP,
        block=LAYER_MAP[-1],
    )  # fmt: skip
    for kind, decoder in decoders.items():
        (reference,) = evaluate_decoding(subject, decoder, splits=[split], max_examples=COUNT)
        hits, totals, number_hits = result.decoding[kind]
        assert position_table(totals) == reference.positions
        assert accuracy_table(hits, totals) == reference.accuracy
        assert (majority_table(totals), balanced_table(hits, totals)) == (reference.majority, reference.balanced)
        number_totals = {name: totals[name] for name in number_hits}
        assert accuracy_table(number_hits, number_totals) == reference.as_number and reference.as_number


def test_readout_from_the_pass_equals_answer_readout(setup):
    teacher, tokenizer, model, decoders = setup
    _, result = run_pass(setup, "test", COUNT + 4, COUNT)
    first = TaskData("dyck", "test", tokenizer, TOKENIZER, max_examples=COUNT, progress=False)
    tokens = symbol_tokens(first)
    reference = answer_readout(model, first, "test", LAYER_MAP[-1], decoders, teacher.config, tokens)
    assert readout_rates(result.readout, "test", decoders, teacher.config, tokens) == reference
    assert len(result.readout.expected) == COUNT  # one answer symbol per Dyck example


def test_true_indices_equal_the_teachers_own_decode(setup):
    teacher = setup[0]
    config = teacher.config
    generator = torch.Generator().manual_seed(0)
    residual_NT = torch.rand(300, config.d_model, generator=generator)
    any_bad = config.variable("dyck_any_bad")  # numerical: exact values, near misses and off-list fractions
    values = torch.tensor(any_bad.values[:50], dtype=torch.float32)
    residual_NT[:100, any_bad.dims[0]] = values.repeat(2)
    residual_NT[100:150, any_bad.dims[0]] = values + 5e-5
    residual_NT[150:200, any_bad.dims[0]] = 0.4  # 2/5: off tracr's value list
    residual_NT[250:] *= 0.4  # every categorical part below the threshold: None
    for var in config.variables:
        truth = teacher.decode_variable(residual_NT, var.name)
        index_N = true_indices(residual_NT, var)
        off = (index_N == OFF_VALUES).tolist()
        read = [
            None if i == NO_VALUE else (None if o else var.values[i]) for i, o in zip(index_N.tolist(), off)
        ]
        assert [None if o else t for t, o in zip(truth, off)] == read
        assert all(t not in var.values for t, o in zip(truth, off) if o)
        if var.encoding == "categorical":
            assert None in read and any(r is not None for r in read)
