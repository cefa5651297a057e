"""Evaluate stage, decoding and the post-hoc probe: exact maps decode 100% (scale-invariantly), hand-computed
accuracies, the ridge probe against a direct least-squares solve, the end-to-end split runner on a tiny Llama
with the real Dyck teacher, and the teacher's agreement with the RASP evaluator.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_llama

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel, TeacherVariable
from tracr_injection.evaluate.decoding import (
    DecodingError,
    LinearDecoder,
    accuracy_table,
    balanced_table,
    decode_counts,
    decode_mapped,
    decode_split,
    evaluate_decoding,
    example_table,
    majority_table,
    position_table,
    rasp_agreement,
    reference_dims,
    reference_scale,
    split_rasp_agreement,
)
from tracr_injection.evaluate.probe import fit_ridge, fit_task_probe, ridge_solution
from tracr_injection.evaluate.subject import PRETRAINED, Subject
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (
    NO_VALUE,
    OFF_LABEL,
    OFF_VALUES,
    AlignedBatch,
    decoded_indices,
    is_ordinal,
    number_read_indices,
    value_classes,
    value_table,
    variable_counts,
)
from tracr_injection.inject.lm import hidden_states
from tracr_injection.tasks import TokenBridge, get_task

TOKENIZER = "smollm2"


pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def dyck_teacher(module_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACR_INJECTION_CACHE", str(module_cache))
        return get_task("dyck").teacher()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A 4-block random Llama (hidden 32) with SmolLM2's real tokenizer."""
    return build_tiny_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def subject(tiny_llama, tokenizer, dyck_teacher) -> Subject:
    """The tiny Llama as an untrained subject of Dyck, hidden states 0-3 aligned with the 4 levels."""
    return Subject(
        name="tiny", task="dyck", method=PRETRAINED, model=tiny_llama, tokenizer=tokenizer,
        tokenizer_name=TOKENIZER, base_model=TOKENIZER, teacher=dyck_teacher, amap=None,
        layer_map=[0, 1, 2, 3], block=3,
    )  # fmt: skip


def dyck_symbols(tokenizer, split: str, start: int, count: int) -> list[list[str]]:
    """Teacher symbols of bridged Dyck examples start..start+count of `split`."""
    task = get_task("dyck")
    bridged = TokenBridge(tokenizer, task).bridge_all(task.examples(split)[start : start + count])
    return [b.teacher_symbols for b in bridged]


def teacher_residuals(teacher: TeacherModel, symbols: list[list[str]]) -> torch.Tensor:
    """The teacher's residual at every level and real position (BOS dropped) [L, N, d_teacher]."""
    output, mask = teacher.run(symbols)
    real = mask[:, 1:]
    return torch.stack([r[:, 1:][real] for r in output.residuals])


def exact_map(mixing_TD: torch.Tensor, scale: float = 1.0) -> AlignmentMap:
    """The alignment map inverting h = r M exactly (pinv(M)), times `scale`."""
    d_teacher, d_lm = mixing_TD.shape
    amap = AlignmentMap(d_lm, d_teacher)
    with torch.no_grad():
        amap.linear.weight.copy_(scale * torch.linalg.pinv(mixing_TD.double()).T.float())
        amap.linear.bias.zero_()
    return amap


@pytest.fixture(scope="module")
def mixed(dyck_teacher, tokenizer):
    """Teacher residuals R of 12 test examples and hidden states H = R M (d_lm = d_teacher + 64)."""
    residuals_LNT = teacher_residuals(dyck_teacher, dyck_symbols(tokenizer, "test", 0, 12))
    generator = torch.Generator().manual_seed(0)
    mixing_TD = torch.randn(
        dyck_teacher.config.d_model, dyck_teacher.config.d_model + 64, generator=generator
    )
    return residuals_LNT, mixing_TD


def full_accuracy(config: TeacherConfig) -> dict[str, list[float | None]]:
    return {
        v.name: [None if lvl < v.level else 1.0 for lvl in range(config.num_levels)] for v in config.variables
    }


# ------------------------------------------------------------------------------ exact maps


def test_the_one_dim_is_one_at_every_level_and_position_of_the_dyck_teacher(dyck_teacher, mixed):
    residuals_LNT, _ = mixed
    config = dyck_teacher.config
    assert config.residual_labels[reference_dims(config)[0]] == "one"
    for level in range(config.num_levels):
        assert torch.equal(
            reference_scale(residuals_LNT[level], reference_dims(config)), torch.ones(residuals_LNT.shape[1])
        )


def test_an_exactly_right_map_decodes_everything_and_is_scale_invariant(dyck_teacher, mixed):
    residuals_LNT, mixing_TD = mixed
    config = dyck_teacher.config
    n = residuals_LNT.shape[1]
    batch = AlignedBatch(residuals_LNT @ mixing_TD, residuals_LNT)
    for scale in (1.0, 3.0):
        decoder = LinearDecoder.from_map(exact_map(mixing_TD, scale), config.num_levels)
        hits, totals, number_hits = decode_counts([batch], decoder, dyck_teacher)
        assert accuracy_table(hits, totals) == full_accuracy(config)
        assert set(number_hits) == {"dyck_lhs", "dyck_rhs"}  # the counts: an exact one-hot reads as a number too
        number_totals = {n: totals[n] for n in number_hits}
        assert accuracy_table(number_hits, number_totals) == {n: full_accuracy(config)[n] for n in number_hits}
        assert position_table(totals) == {
            v.name: [None if lvl < v.level else n for lvl in range(config.num_levels)]
            for v in config.variables
        }
    # a different positive factor at every position (all a cosine loss pins down) changes nothing either
    factor_N1 = torch.linspace(0.2, 5.0, n)[:, None]
    rescaled = AlignedBatch(residuals_LNT @ mixing_TD * factor_N1, residuals_LNT)
    hits, totals, _ = decode_counts(
        [rescaled], LinearDecoder.from_map(exact_map(mixing_TD), config.num_levels), dyck_teacher
    )
    assert accuracy_table(hits, totals) == full_accuracy(config)


def test_a_count_held_as_one_magnitude_reads_right_as_a_number_and_only_at_its_ends_by_argmax():
    var = TeacherVariable("count", "categorical", "intermediate", [1, 2, 3, 4], [0, 1, 2, 3], level=0)
    assert is_ordinal(var)
    assert not is_ordinal(dataclasses.replace(var, values=[False, True]))
    assert not is_ordinal(dataclasses.replace(var, values=["a", "b", "c", "d"]))
    # The least-squares read of the one-hot from (count, 1), counts 0..3 equally often: score_k = a_k + b_k count.
    count_N = torch.arange(4.0)
    design_N2 = torch.stack([torch.ones(4), count_N], 1)
    solution_2K = torch.linalg.lstsq(design_N2, torch.eye(4)).solution
    assert torch.allclose(solution_2K, torch.tensor([[0.7, 0.4, 0.1, -0.2], [-0.3, -0.1, 0.1, 0.3]]), atol=1e-6)
    mapped_NT = torch.cat([torch.ones(4, 1), design_N2 @ solution_2K], 1)  # dim 0: tracr's `one`
    scale_N = reference_scale(mapped_NT, [0])
    assert decoded_indices(mapped_NT, scale_N, var).tolist() == [0, 0, 3, 3]  # scores at 1: .4 .3 .2 .1
    assert number_read_indices(mapped_NT, scale_N, var).tolist() == [0, 1, 2, 3]  # .3 + .4 + .3 = 1
    assert number_read_indices(mapped_NT * 2.5, scale_N * 2.5, var).tolist() == [0, 1, 2, 3]  # scale-invariant
    negative_N = reference_scale(-mapped_NT, [0])  # no usable scale: nothing is read
    assert number_read_indices(-mapped_NT, negative_N, var).tolist() == [NO_VALUE] * 4


def test_corrupted_positions_give_the_hand_computed_accuracy(dyck_teacher, mixed):
    residuals_LNT, mixing_TD = mixed
    config = dyck_teacher.config
    n, level, corrupt = residuals_LNT.shape[1], 2, [0, 5, 17, 40]
    hidden_LND = residuals_LNT @ mixing_TD
    # A negated one-hot has its argmax on a dim other than the true one, and a negative scale decodes
    # numerical variables to None: every variable is wrong at exactly these positions of this level.
    hidden_LND[level, corrupt] *= -1
    decoder = LinearDecoder.from_map(exact_map(mixing_TD), config.num_levels)
    hits, totals, _ = decode_counts([AlignedBatch(hidden_LND, residuals_LNT)], decoder, dyck_teacher)
    expected = full_accuracy(config)
    for var in config.variables:
        if var.level <= level:
            expected[var.name][level] = (n - len(corrupt)) / n
    assert accuracy_table(hits, totals) == expected


def test_per_value_counts_give_the_hand_computed_majority_and_balanced_accuracy():
    classes_V = value_classes([0, 1, 2])
    truth_N = torch.tensor([0, 0, 0, 1, 2, NO_VALUE, OFF_VALUES])
    decoded_N = torch.tensor([0, 0, 1, 1, 0, 0, 2])
    hits_K, totals_K = variable_counts(decoded_N, truth_N, classes_V)
    assert totals_K.tolist() == [3, 1, 1, 1] and hits_K.tolist() == [2, 1, 0, 0]  # the None truth not compared
    hits, totals = {"v": [None, hits_K]}, {"v": [None, totals_K]}
    assert accuracy_table(hits, totals) == {"v": [None, 3 / 6]}
    assert position_table(totals) == {"v": [None, 6]}
    assert majority_table(totals) == {"v": [None, 3 / 6]}  # always "0" is as accurate as this decoder
    assert balanced_table(hits, totals)["v"][1] == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    size = toy_config().variable("size")  # numerical 0, 0.5, 1 written at level 1: the same counts as labels
    sized = {"tokens": [torch.zeros(3, dtype=torch.long)] * 2, "size": [None, hits_K]}
    sized_totals = {"tokens": [torch.zeros(3, dtype=torch.long)] * 2, "size": [None, totals_K]}
    assert value_table(sized, sized_totals, toy_config())["size"] == {
        str(size.values[0]): [2, 3], str(size.values[1]): [1, 1], str(size.values[2]): [0, 1], OFF_LABEL: [0, 1]
    }


def toy_config(reference_label: str = "one") -> TeacherConfig:
    """Two levels: `tokens` (categorical a/b, level 0) and `size` (numerical 0, 0.5, 1, from level 1)."""
    return TeacherConfig(
        program_name="toy",
        program_hash="toy",
        vocab=["a", "b"],
        max_seq_len=4,
        causal=True,
        bos="BOS",
        pad="PAD",
        token_values=["a", "b", "BOS", "PAD"],
        num_layers=1,
        num_heads=1,
        key_size=1,
        mlp_hidden_size=1,
        residual_labels=[reference_label, "tokens:a", "tokens:b", "size"],
        variables=[
            TeacherVariable("tokens", "categorical", "input", [1, 2], ["a", "b"], 0),
            TeacherVariable("size", "numerical", "output", [3], [0, 0.5, 1], 1),
        ],
        output_variable="size",
        mlp_exactness=1,
        tracr_version="toy",
    )


def test_hand_computed_decoding_and_accuracy():
    teacher = TeacherModel(toy_config())
    targets_LNT = torch.tensor(
        [
            [[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]],
            [[1, 1, 0, 0.5], [1, 0, 1, 1], [1, 1, 0, 0]],
        ]
    )
    hidden_LND = torch.tensor(
        [
            [[2, 0.9, 1.1, 7], [1, 0, 1, 0], [0.5, 3, 1, 0]],  # tokens: b (wrong), b, a -> 2/3
            # tokens: a, b, a -> 3/3; size: 1.2/2 = 0.6 -> 0.5 (right), 0.3/0.5 = 0.6 -> 0.5 (truth 1),
            # negative scale -> None (truth 0) -> 1/3
            [[2, 1.5, 0.2, 1.2], [0.5, 0, 1, 0.3], [-1, 1, 0, 0]],
        ]
    )
    identity = AlignmentMap(4, 4)
    with torch.no_grad():
        identity.linear.weight.copy_(torch.eye(4))
        identity.linear.bias.zero_()
    decoder = LinearDecoder.from_map(identity, 2)
    hits, totals, _ = decode_counts([AlignedBatch(hidden_LND, targets_LNT)], decoder, teacher)
    assert accuracy_table(hits, totals) == {"tokens": [2 / 3, 1.0], "size": [None, 1 / 3]}
    assert position_table(totals) == {"tokens": [3, 3], "size": [None, 3]}
    mapped_NT = torch.tensor([[1e-5, 1, 0, 0.00001], [4, 0, 1, 2.1], [1, 0, 0, 0.2]])
    scale_N = reference_scale(mapped_NT, reference_dims(teacher.config))
    assert decode_mapped(mapped_NT, scale_N, teacher.config.variable("size")) == [None, 0.5, 0]


def test_without_a_one_dim_the_tokens_dims_are_the_reference(dyck_teacher, mixed):
    assert reference_dims(toy_config("unused")) == [1, 2]
    config = dyck_teacher.config
    labels = [("not_one" if label == "one" else label) for label in config.residual_labels]
    fallback = TeacherModel(dataclasses.replace(config, residual_labels=labels))
    assert reference_dims(fallback.config) == config.variable("tokens").dims
    residuals_LNT, mixing_TD = mixed
    for level in range(config.num_levels):
        scale_N = reference_scale(residuals_LNT[level], reference_dims(fallback.config))
        assert torch.allclose(scale_N, torch.ones_like(scale_N))
    decoder = LinearDecoder.from_map(exact_map(mixing_TD, 3.0), config.num_levels)
    hits, totals, _ = decode_counts([AlignedBatch(residuals_LNT @ mixing_TD, residuals_LNT)], decoder, fallback)
    assert accuracy_table(hits, totals) == full_accuracy(config)
    bare = dataclasses.replace(
        toy_config("unused"), variables=[dataclasses.replace(v, name="x") for v in toy_config().variables]
    )
    with pytest.raises(DecodingError, match="reference scale"):
        reference_dims(bare)


# ------------------------------------------------------------------------------------ probe


def test_ridge_solution_matches_a_direct_least_squares_solve():
    generator = torch.Generator().manual_seed(1)
    x_ND = torch.randn(30, 5, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 0.5, 10])
    y_NT = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    x_NE = torch.cat([x_ND, torch.ones(30, 1, dtype=torch.float64)], 1)
    strength = 0.1
    lam = strength * x_ND.square().sum(0).mean()
    penalty_rows = torch.cat([torch.eye(5, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)], 1)
    augmented = torch.cat([x_NE, lam.sqrt() * penalty_rows])
    direct = torch.linalg.lstsq(augmented, torch.cat([y_NT, torch.zeros(5, 3, dtype=torch.float64)])).solution
    ours = ridge_solution(x_NE.T @ x_NE, x_NE.T @ y_NT, strength)
    assert torch.allclose(ours, direct, atol=1e-10)


def test_a_probe_fitted_on_noisy_mixed_states_decodes_held_out_examples(
    dyck_teacher, tokenizer, mixed, tmp_path
):
    _, mixing_TD = mixed
    config = dyck_teacher.config
    generator = torch.Generator().manual_seed(2)

    def batches(start: int, count: int) -> list[AlignedBatch]:
        residuals_LNT = teacher_residuals(dyck_teacher, dyck_symbols(tokenizer, "train", start, count))
        hidden_LND = residuals_LNT @ mixing_TD
        noise = 1e-3 * torch.randn(hidden_LND.shape, generator=generator)
        return [AlignedBatch(hidden_LND + noise, residuals_LNT)]

    probe = fit_ridge(batches(0, 64), batches(64, 16))
    assert probe.kind == "probe" and len(probe.ridge) == config.num_levels
    held_out = teacher_residuals(dyck_teacher, dyck_symbols(tokenizer, "test", 100, 24))
    hits, totals, _ = decode_counts([AlignedBatch(held_out @ mixing_TD, held_out)], probe, dyck_teacher)
    accuracy = accuracy_table(hits, totals)
    for var in config.variables:
        for level in range(var.level, config.num_levels):
            assert accuracy[var.name][level] >= 0.99, (var.name, level, accuracy[var.name][level])
    loaded = LinearDecoder.load(probe.save(tmp_path / "probe.safetensors"))
    assert loaded.kind == "probe" and loaded.ridge == probe.ridge
    assert torch.equal(loaded.weight_LTD, probe.weight_LTD) and torch.equal(loaded.bias_LT, probe.bias_LT)


# ------------------------------------------------------------------------------ end to end


def test_evaluate_decoding_runs_every_representable_dyck_split(subject, tokenizer, dyck_teacher):
    config = dyck_teacher.config
    torch.manual_seed(3)
    decoder = LinearDecoder.from_map(AlignmentMap(32, config.d_model), config.num_levels)
    results = evaluate_decoding(subject, decoder, max_examples=4, rasp_examples=2)
    assert [r.split for r in results] == [
        "test",
        "almost_balanced",
        "new_token",
        "length",
        "balanced_long",
        "length_5_90",
    ]
    for result in results:
        if result.split == "new_token":
            assert "not symbols of the compiled program" in result.skipped and not result.accuracy
            continue
        assert result.skipped is None and result.decoder == "map" and result.num_examples == 4
        data = TaskData(
            "dyck", result.split, tokenizer, TOKENIZER, teacher=dyck_teacher, max_examples=4, progress=False
        )
        real_positions = sum(len(b) for b in data.bridged)
        assert set(result.accuracy) == {v.name for v in config.variables}
        for var in config.variables:
            assert result.accuracy[var.name][: var.level] == [None] * var.level
            assert len(result.accuracy[var.name]) == config.num_levels
            assert all(0.0 <= a <= 1.0 for a in result.accuracy[var.name][var.level :])
            assert result.positions[var.name][var.level :] == [real_positions] * (
                config.num_levels - var.level
            )
        assert set(result.rasp_agreement.values()) == {1.0}
        assert result.to_dict()["accuracy"] == result.accuracy


def test_probe_end_to_end_and_the_example_table(subject, tiny_llama, tokenizer, dyck_teacher):
    config = dyck_teacher.config
    probe = fit_task_probe(subject, num_examples=10)
    output_dims = config.variable(config.output_variable).dims
    assert probe.weight_LTD.shape == (4, config.d_model, 32)
    assert torch.equal(probe.rows(output_dims), probe.weight_LTD[3][output_dims])
    (result,) = evaluate_decoding(subject, probe, splits=["test"], max_examples=3, rasp_examples=0)
    assert result.decoder == "probe" and result.rasp_agreement == {}
    assert all(0.0 <= a <= 1.0 for accs in result.accuracy.values() for a in accs if a is not None)

    data = TaskData(
        "dyck", "test", tokenizer, TOKENIZER, teacher=dyck_teacher, max_examples=3, progress=False
    )
    rows = example_table(subject, data, probe, index=1, levels={"dyck_lhs": 1})
    example = data.bridged[1]
    assert [r["token"] for r in rows] == example.tokens
    assert [r["symbol"] for r in rows] == example.teacher_symbols
    output, _ = dyck_teacher.run([example.teacher_symbols])
    truth = dyck_teacher.decode_variable(output.residuals[-1][0, 1:], config.output_variable)
    assert [r["values"][config.output_variable]["true"] for r in rows] == truth
    assert {r["values"]["dyck_lhs"]["level"] for r in rows} == {1}
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        mapped_PT = probe(3, hidden_states(tiny_llama, ids)[3][0])
    by_argmax = [
        config.variable(config.output_variable).values[i] for i in mapped_PT[:, output_dims].argmax(-1)
    ]
    assert [r["values"][config.output_variable]["decoded"] for r in rows] == by_argmax
    with pytest.raises(DecodingError, match="written at level 1"):
        example_table(subject, data, probe, levels={"dyck_lhs": 0})


def test_bad_inputs_raise_clear_errors(subject, tokenizer, dyck_teacher):
    decoder = LinearDecoder.from_map(AlignmentMap(32, dyck_teacher.config.d_model), 4)
    with_teacher = TaskData(
        "dyck", "test", tokenizer, TOKENIZER, teacher=dyck_teacher, max_examples=2, progress=False
    )
    with pytest.raises(DecodingError, match="4 levels"):
        decode_split(dataclasses.replace(subject, layer_map=[0, 1, 2]), with_teacher, "test", decoder)
    other_teacher = LinearDecoder.from_map(AlignmentMap(32, 10), 4)
    with pytest.raises(DecodingError, match="width 10"):
        decode_split(subject, with_teacher, "test", other_teacher)
    without = TaskData("dyck", "test", tokenizer, TOKENIZER, max_examples=2, progress=False)
    with pytest.raises(DecodingError, match="teacher="):
        decode_split(subject, without, "test", decoder)


# ------------------------------------------------------------------------------------- RASP


def test_the_dyck_teacher_agrees_with_the_rasp_evaluator(tokenizer, dyck_teacher):
    data = TaskData(
        "dyck", "test", tokenizer, TOKENIZER, teacher=dyck_teacher, max_examples=6, progress=False
    )
    agreement = split_rasp_agreement(data, dyck_teacher, 6)
    assert agreement == {v.name: 1.0 for v in dyck_teacher.config.variables}
    # the teacher values of other examples disagree with these symbols: the check can fail
    final_BPT, _ = data.targets.batch([0, 1])
    swapped = rasp_agreement(
        dyck_teacher, [data.bridged[0].teacher_symbols], [final_BPT[1, : len(data.bridged[0])]]
    )
    assert swapped["tokens"] < 1.0
