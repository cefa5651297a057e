"""Evaluate stage, answer readout: the symbol -> token table, and every rate against a per-example reference
(each prompt run alone, no padding) on a tiny Llama with the real Dyck teacher's output variable."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from tracr_injection.evaluate.decoding import LinearDecoder, decode_mapped, reference_dims, reference_scale
from tracr_injection.evaluate.readout import ReadoutError, answer_readout, symbol_tokens
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.data import TaskData
from tracr_injection.tasks import get_task

pytestmark = pytest.mark.usefixtures("shared_cache")
HIDDEN_INDEX = 3
COUNT = 12


@pytest.fixture(scope="module")
def setup(module_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        teacher = get_task("dyck").teacher()
    tokenizer = load_tokenizer("smollm2")
    model = build_tiny_llama(tokenizer).eval()
    data = TaskData("dyck", "almost_balanced", tokenizer, "smollm2", max_examples=COUNT, progress=False)
    mixed = TaskData("dyck", "test", tokenizer, "smollm2", max_examples=COUNT, progress=False)
    return teacher.config, tokenizer, model, data, mixed


def constant_decoder(config, d_lm: int, value: str) -> LinearDecoder:
    """Decodes `value` for the output variable everywhere (zero weights, bias on its dim and on `one`)."""
    bias_T = torch.zeros(config.d_model)
    var = config.variable(config.output_variable)
    bias_T[var.dims[var.values.index(value)]] = 1.0
    bias_T[reference_dims(config)] = 1.0
    weight_LTD = torch.zeros(config.num_levels, config.d_model, d_lm)
    return LinearDecoder("map", weight_LTD, bias_T.expand(config.num_levels, -1).clone())


def reference(model, data, config, decoder):
    """(expected, decoded, predicted token, label token) at each answer-symbol position, one prompt at a time."""
    rows = []
    var = config.variable(config.output_variable)
    for example in data.bridged:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([example.input_ids]), output_hidden_states=True)
        for p, symbol in enumerate(example.expected):
            if symbol is None:
                continue
            mapped = decoder(config.num_levels - 1, out.hidden_states[HIDDEN_INDEX][0, p : p + 1])
            decoded = decode_mapped(mapped, reference_scale(mapped, reference_dims(config)), var)[0]
            rows.append((symbol, decoded, int(out.logits[0, p].argmax()), example.labels[p + 1]))
    return rows


def test_symbol_tokens_are_the_answer_tokens(setup):
    _, tokenizer, _, _, mixed = setup
    tokens = symbol_tokens(mixed)
    assert tokens == {"yes": tokenizer.encode(" yes")[0], "no": tokenizer.encode(" no")[0]}
    example = mixed.bridged[0]
    labels = list(example.labels)
    example.labels[example.answer_positions[0] + 1] = 7  # 'no' or 'yes' now on another token
    try:
        with pytest.raises(ReadoutError, match="two LM tokens"):
            symbol_tokens(mixed)
    finally:
        example.labels[:] = labels


@pytest.mark.parametrize("kind", ["constant-yes", "random"])
def test_readout_rates_match_a_one_prompt_at_a_time_reference(setup, kind):
    config, _, model, data, mixed = setup
    d_lm = model.config.hidden_size
    if kind == "constant-yes":
        decoder = constant_decoder(config, d_lm, "yes")
    else:
        generator = torch.Generator().manual_seed(0)
        decoder = LinearDecoder(
            "probe",
            torch.randn(config.num_levels, config.d_model, d_lm, generator=generator),
            torch.randn(config.num_levels, config.d_model, generator=generator),
        )
    tokens = symbol_tokens(mixed, data)
    assert set(symbol_tokens(data)) == {"no"} and set(tokens) == {"yes", "no"}
    result = answer_readout(model, data, "almost_balanced", HIDDEN_INDEX, {"d": decoder}, config, tokens)["d"]
    rows = reference(model, data, config, decoder)
    assert result.positions == len(rows) == COUNT  # one answer symbol per Dyck example
    right = [d == e for e, d, _, _ in rows]
    wrong = [r for r, ok in zip(rows, right) if not ok]
    assert result.subspace_accuracy == pytest.approx(sum(right) / len(rows))
    assert result.lm_accuracy == pytest.approx(sum(p == lab for _, _, p, lab in rows) / len(rows))
    assert result.lm_agrees_with_subspace == pytest.approx(sum(tokens[d] == p for _, d, p, _ in rows) / len(rows))
    assert result.subspace_wrong == len(wrong)
    if kind == "constant-yes":  # almost_balanced strings are never balanced: a constant 'yes' is always wrong
        assert result.subspace_accuracy == 0.0 and result.subspace_wrong == COUNT
        assert result.lm_wrong_when_subspace_right is None
    if wrong:
        assert result.lm_follows_subspace_when_wrong == pytest.approx(
            sum(tokens[d] == p for _, d, p, _ in wrong) / len(wrong)
        )
        assert result.lm_right_when_subspace_wrong == pytest.approx(
            sum(p == lab for _, _, p, lab in wrong) / len(wrong)
        )
