"""The alignment levers (`inject.levers`, issue 21) on hand cases and tiny random models: least-squares map
init against numpy, per-variable weighting against a hand-computed cosine, the balance's ratio logic,
per-term clipping against a hand check, the alignment-first phase, and old records loading.
"""

from __future__ import annotations

import dataclasses
import math
import shlex

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from test_experiments import trained_configs  # noqa: F401  (fixture)
from test_inject import read_metrics, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tracr_injection.cli.main import app
from tracr_injection.compile.teacher import TeacherConfig, TeacherVariable
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig, train
from tracr_injection.inject.levers import (
    BALANCE_SMOOTHING,
    alignment_pairs,
    applied_factor,
    balance_ratio,
    clip_terms_into_grads,
    equal_variable_scales,
    lstsq_map_init,
    ridge_lstsq,
    smoothed_ratio,
    target_norm_shares,
)
from tracr_injection.inject.lm import load_causal_lm
from tracr_injection.inject.objective import InjectionObjective, alignment_dim_scales, level_alignment
from tracr_injection.inject.run import RunFolder
from tracr_injection.inject.trainer import build_parts, warmup_schedule
from tracr_injection.tasks import get_task

pytestmark = pytest.mark.usefixtures("shared_cache", "one_torch_thread")

LEVERS = {
    "alignment_balance": "early_grad",
    "balance_every": 3,
    "balance_cap": 30.0,
    "alignment_first_steps": 5,
    "map_init": "lstsq",
    "clip_per_term": True,
    "alignment_variable_weighting": "equal",
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 4-block random Llama with SmolLM2's real tokenizer (roll block 3 for the 4-level reverse teacher)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer("smollm2"))


# ----------------------------------------------------------------------------- config


def test_records_written_before_the_levers_load_as_the_old_method():
    recorded = TrainConfig().to_dict()
    for name in LEVERS:
        del recorded[name]
    assert TrainConfig.from_record(recorded) == TrainConfig()
    with pytest.raises(ValueError, match="alignment_balance must be one of"):
        TrainConfig(alignment_balance="both")
    with pytest.raises(ValueError, match="clip_per_term clips each term to max_grad_norm"):
        TrainConfig(clip_per_term=True, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="map_init act on the alignment"):
        TrainConfig(method="baseline", map_init="lstsq")


def test_the_recorded_command_of_every_lever_rebuilds_its_config(trained_configs, tmp_path):  # noqa: F811
    config = TrainConfig(out=str(tmp_path / "r"), **LEVERS)
    command = config.command()
    assert "--clip-per-term" in command and "--alignment-first-steps 5" in command
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert trained_configs[-1] == config
    off = dataclasses.replace(config, clip_per_term=False)
    assert CliRunner().invoke(app, shlex.split(off.command())[1:]).exit_code == 0
    assert trained_configs[-1] == off


# ----------------------------------------------------------------------------- least-squares map init


def test_ridge_lstsq_is_numpys_least_squares():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=generator)
    y = x @ torch.randn(4, 3, generator=generator) + torch.randn(3, generator=generator)
    y += 0.1 * torch.randn(50, 3, generator=generator)
    weight, bias = ridge_lstsq(x, y, ridge=0.0)
    augmented = np.hstack([x.double().numpy(), np.ones((50, 1))])
    solution = np.linalg.lstsq(augmented, y.double().numpy(), rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), solution[:4].T, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), solution[4], atol=1e-10)
    # with a ridge: numpy's lstsq on the centred rows stacked over sqrt(lam) I (the bias is not shrunk)
    xc, yc = x.double().numpy() - x.double().numpy().mean(0), y.double().numpy() - y.double().numpy().mean(0)
    lam = 0.5 * np.diag(xc.T @ xc).mean()
    stacked = np.vstack([xc, math.sqrt(lam) * np.eye(4)])
    ridge_w = np.linalg.lstsq(stacked, np.vstack([yc, np.zeros((4, 3))]), rcond=None)[0]
    weight, bias = ridge_lstsq(x, y, ridge=0.5)
    np.testing.assert_allclose(weight.numpy(), ridge_w.T, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), y.double().numpy().mean(0) - x.double().numpy().mean(0) @ ridge_w)


def test_lstsq_map_init_fits_every_aligned_level_jointly(tiny_llama, tmp_path):
    config = tiny_config(tiny_llama, tmp_path / "unused", steps=2)
    model = load_causal_lm(tiny_llama)
    parts = build_parts(config, load_tokenizer(tiny_llama), model, progress=False)
    x, y = alignment_pairs(model, parts.data, parts.layer_map, parts.dim_levels, count=8)
    real = int(parts.data.collate(list(range(8)))["teacher_mask"].sum())
    assert x.shape == (4 * real, 32) and y.shape[0] == 4 * real  # 4 levels of every real position
    with torch.no_grad():
        random_start = float((1 - torch.cosine_similarity(parts.amap(x), y, dim=-1)).mean())
    default_rms = float(parts.amap.linear.weight.square().mean().sqrt())
    fit = lstsq_map_init(parts.amap, model, parts.data, parts.layer_map, parts.dim_levels, count=8, ridge=0.0)
    augmented = np.hstack([x.double().numpy(), np.ones((len(x), 1))])
    solution = np.linalg.lstsq(augmented, y.double().numpy(), rcond=None)[0]
    scale = default_rms / np.sqrt(np.mean(solution[:32] ** 2))  # the fit at the default init's weight scale
    np.testing.assert_allclose(parts.amap.linear.weight.detach().numpy(), scale * solution[:32].T, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(parts.amap.linear.bias.detach().numpy(), scale * solution[32], rtol=1e-3, atol=1e-5)
    assert fit < random_start, (fit, random_start)


def test_a_lstsq_run_records_its_fit_and_starts_lower(tiny_llama, tmp_path):
    plain = train(tiny_config(tiny_llama, tmp_path / "plain", steps=1), progress=False)
    fitted = train(tiny_config(tiny_llama, tmp_path / "lstsq", steps=1, map_init="lstsq"), progress=False)
    assert plain.map_init_fit is None and 0 <= fitted.map_init_fit < 1
    assert read_metrics(tmp_path / "lstsq")[0]["alignment"] < read_metrics(tmp_path / "plain")[0]["alignment"]


# ----------------------------------------------------------------------------- per-variable weighting


def two_variable_teacher() -> TeacherConfig:
    """A made-up 3-dim residual: a one-hot `a` (dims 0-1, level 0) and a numerical `b` (dim 2, level 1)."""
    variables = [
        TeacherVariable("a", "categorical", "input", [0, 1], ["x", "y"], 0),
        TeacherVariable("b", "numerical", "output", [2], [0.0, 0.5], 1),
    ]
    return TeacherConfig(
        program_name="two", program_hash="0", vocab=["x", "y"], max_seq_len=4, causal=True, bos="BOS", pad="PAD",
        token_values=["x", "y"], num_layers=1, num_heads=1, key_size=1, mlp_hidden_size=1,
        residual_labels=["a:x", "a:y", "b"], variables=variables, output_variable="b", mlp_exactness=100,
        tracr_version="test",
    )  # fmt: skip


def test_equal_weighting_gives_each_variable_a_one_hots_norm_in_the_cosine():
    config = two_variable_teacher()
    rows = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    scales = equal_variable_scales(config, rows)
    assert scales == {"a": 1.0, "b": pytest.approx(2.0)}  # mean ||a||^2 = 1, mean b^2 = 0.25
    counts = torch.tensor([[1.0, 0.0, 3 / 128], [0.0, 1.0, 1 / 128]])  # a count x 1/128, as the authors' teacher's
    assert equal_variable_scales(config, counts)["b"] == pytest.approx(1 / math.sqrt(5 / 128**2))  # 57, not capped
    tiny = torch.tensor([[1.0, 0.0, 1e-4], [0.0, 1.0, 0.0]])
    assert equal_variable_scales(config, tiny)["b"] == 100.0  # a variable almost always 0: bounded
    dim_scales = alignment_dim_scales(config, scales, torch.tensor([1.0, 3.0, 1.0]))  # on top of a stretch
    assert dim_scales.tolist() == pytest.approx([1.0, 3.0, 2.0])
    mapped, target = torch.tensor([[[1.0, 0.0, 0.0]]]), torch.tensor([[[1.0, 0.0, 0.5]]])
    loss = level_alignment(mapped, target, torch.ones(1, 1), alignment_dim_scales(config, scales))
    assert float(loss) == pytest.approx(1 - 1 / math.sqrt(2))  # cos([1,0,0], [1,0,1]) by hand
    assert float(level_alignment(mapped, target, torch.ones(1, 1))) == pytest.approx(1 - 1 / math.sqrt(1.25))
    shares = target_norm_shares(config, rows, torch.tensor([0, 0, 1]))
    assert shares == {0: {"a": 1.0}, 1: {"a": pytest.approx(0.8), "b": pytest.approx(0.2)}}


def test_equal_weighting_reaches_the_training_loss(tiny_llama, tmp_path):
    config = tiny_config(tiny_llama, tmp_path / "equal", steps=1, alignment_variable_weighting="equal")
    manifest = train(config, progress=False)
    scales = manifest.alignment_variable_scales
    assert set(scales) == {v.name for v in get_task("reverse").teacher().config.variables}
    assert all(1 / 10 <= s <= 10 for s in scales.values())


# ----------------------------------------------------------------------------- gradient balance


def test_balance_ratio_logic_on_a_hand_case():
    # alignment entered with f = 2 and has early norm 12; the task's is 3: f = 2 * 3 / 12 = 0.5 matches them
    assert balance_ratio(2.0, 3.0, 12.0) == 0.5
    assert balance_ratio(1.0, 3.0, 0.0) == 0.0
    assert smoothed_ratio(0.0, 4.0) == 4.0  # the first measurement is taken as it is
    assert smoothed_ratio(4.0, 1.0) == pytest.approx(BALANCE_SMOOTHING * 4 + (1 - BALANCE_SMOOTHING) * 1)
    assert applied_factor(0.5, 100.0) == 1.0  # never below the fixed weight
    assert applied_factor(7.0, 100.0) == 7.0 and applied_factor(500.0, 100.0) == 100.0


def test_balanced_run_logs_its_factor_and_resumes_exactly(tiny_llama, tmp_path):
    balance = {"alignment_balance": "early_grad", "balance_every": 2, "balance_cap": 1e6}
    train(tiny_config(tiny_llama, tmp_path / "full", steps=4, **balance), progress=False)
    metrics = read_metrics(tmp_path / "full")
    ratios = [m["balance_ratio"] for m in metrics if "balance_ratio" in m]
    assert [("balance_ratio" in m) for m in metrics] == [True, False, True, False]  # steps 0 and 2
    assert metrics[0]["alignment_factor"] == pytest.approx(applied_factor(ratios[0], 1e6))
    assert metrics[1]["alignment_factor"] == metrics[0]["alignment_factor"]
    ema = smoothed_ratio(ratios[0], ratios[1])
    assert metrics[2]["alignment_factor"] == pytest.approx(applied_factor(ema, 1e6), rel=1e-6)
    # the step's alignment term entered at the balanced weight: m * factor * the cosine loss
    assert metrics[2]["loss"] == pytest.approx(
        metrics[2]["task_ce"] + metrics[2]["alignment_factor"] * metrics[2]["alignment"] + metrics[2]["kl"],
        rel=1e-5,
    )
    cut = tiny_config(tiny_llama, tmp_path / "resumed", steps=3, checkpoint_every=2, **balance)
    train(cut, progress=False)
    assert [d.name for d in RunFolder(tmp_path / "resumed").checkpoints()] == ["step-2"]
    train(dataclasses.replace(cut, steps=4), resume=True, progress=False)
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["alignment_factor"] for m in resumed] == pytest.approx([m["alignment_factor"] for m in metrics])


# ----------------------------------------------------------------------------- per-term clipping


def test_per_term_clipping_clips_each_term_before_the_sum():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    terms = {"big": 3.0 * (param * torch.tensor([3.0, 4.0])).sum(), "small": 0.1 * param.sum()}
    norms = clip_terms_into_grads(terms, [param], max_norm=1.0)
    assert norms == {"big": pytest.approx(15.0), "small": pytest.approx(0.1 * math.sqrt(2))}
    # big: gradient [9, 12] (norm 15) clipped to [0.6, 0.8]; small: [0.1, 0.1] is under the limit
    expected = torch.tensor([9.0, 12.0]) / (15.0 + 1e-6) + torch.tensor([0.1, 0.1])
    assert torch.allclose(param.grad, expected, atol=1e-6)


def test_per_term_clipping_trains_and_logs_each_terms_norm(tiny_llama, tmp_path):
    train(tiny_config(tiny_llama, tmp_path / "clip", steps=2, clip_per_term=True, max_grad_norm=0.5), progress=False)
    for m in read_metrics(tmp_path / "clip"):
        assert {"grad_norm/task_ce", "grad_norm/alignment", "grad_norm/kl"} <= set(m)
        assert m["grad_norm"] <= 3 * 0.5 + 1e-5  # a sum of three clipped terms


# ----------------------------------------------------------------------------- alignment-first phase


def test_alignment_first_phase_has_no_task_term_and_no_roll(tiny_llama, tmp_path):
    config = tiny_config(tiny_llama, tmp_path / "unused", steps=2, alignment_first_steps=1)
    tokenizer = load_tokenizer(tiny_llama)
    parts = build_parts(config, tokenizer, load_causal_lm(tiny_llama), progress=False)
    objective = InjectionObjective(config, parts)
    batch = parts.data.collate([0, 1, 2, 3])
    phase_one, metrics = objective.terms(batch, alignment_only=True)
    joint, _ = objective.terms(batch)
    assert list(phase_one) == ["alignment"] and "task_ce" not in metrics and metrics["alignment_only"] == 1.0
    assert list(joint) == ["task_ce", "alignment"]
    # no roll: the alignment reads the same hidden states either way (the roll edits block 3's output only)
    assert phase_one["alignment"].item() == pytest.approx(joint["alignment"].item(), rel=1e-6)


def test_alignment_first_steps_keep_the_task_loss_off_then_turn_it_on(tiny_llama, tmp_path):
    # no KL: in the phase only the alignment trains, and it reaches blocks 0..2 only (hidden states 0..3)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    for steps, late_moves in ((2, False), (3, True)):
        out = tmp_path / f"steps-{steps}"
        train(tiny_config(tiny_llama, out, steps=steps, alignment_first_steps=2, kl_weight=0.0), progress=False)
        trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
        moved = {k for k in original if not torch.equal(original[k], trained[k])}
        late = {k for k in original if k.startswith(("model.layers.3.", "model.norm"))}  # embedding: level 0
        assert bool(moved & late) == late_moves, sorted(moved & late)
        assert any(k.startswith("model.layers.0.") for k in moved)
        metrics = read_metrics(out)
        assert [m["alignment_only"] for m in metrics] == [1.0, 1.0, 0.0][:steps]
        assert ["task_ce" in m for m in metrics] == [False, False, True][:steps]


def test_the_lms_warm_up_starts_again_after_the_alignment_first_phase():
    lm, amap = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [lm], "lr": 1.0}, {"params": [amap], "lr": 1.0}])
    schedule = warmup_schedule(optimizer, warmup_steps=2, lm_restart=3)
    rates = []
    for _ in range(6):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert rates == [[0.5, 0.5], [1, 1], [1, 1], [0.5, 1], [1, 1], [1, 1]]
    plain = warmup_schedule(torch.optim.SGD([lm], lr=1.0), warmup_steps=2)
    assert plain.get_last_lr() == [0.5]
