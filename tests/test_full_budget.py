"""The `full` budget is the authors' schedule: its fields, the KL summed per window as their `batchmean`,
and clipping that 0 turns off (the gradients stay as they are, their norm is still reported)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from accelerate import Accelerator

from tracr_injection.experiments.budgets import FULL, TASKS
from tracr_injection.inject import TrainConfig
from tracr_injection.inject.kl_cache import topk_of_logits
from tracr_injection.inject.objective import topk_kl


def test_full_budget_is_the_authors_schedule_with_bf16_only_on_cuda():
    for task in TASKS:
        fields = FULL.train_fields(task, cuda=True)
        assert (fields["steps"], fields["batch_size"]) == (20_000, 2)
        assert (fields["lr_lm"], fields["lr_map"]) == (1e-6, 1e-4)
        assert fields["max_grad_norm"] == 0.0 and fields["kl_reduction"] == "window_sum"
        assert fields["mixed_precision"] == "bf16"
        assert "mixed_precision" not in FULL.train_fields(task, cuda=False)  # the CPU keeps fp32
        config = TrainConfig(task=task, **fields)
        assert config.clip_norm == math.inf
    recorded = dataclasses.asdict(FULL)["deviations"]  # what experiment.json records
    assert (
        len(recorded) >= 5 and any("SmolLM2" in d for d in recorded) and any("warm-up" in d for d in recorded)
    )


def hand_kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor, keep: list[int]) -> float:
    """KL(p || q) over the buckets `keep` + one tail bucket holding every other token, by the formula."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    rest = [i for i in range(len(p)) if i not in keep]
    buckets = [(p[i], q[i]) for i in keep] + [(p[rest].sum(), q[rest].sum())]
    return float(sum(pb * math.log(pb / qb) for pb, qb in buckets))


def test_window_sum_kl_is_the_token_mean_times_the_window_length():
    torch.manual_seed(0)
    original, student = torch.randn(2, 3, 6) * 2, torch.randn(2, 3, 6) * 2  # 2 windows of 3 tokens, 6 tokens
    ids, logp, tail = topk_of_logits(original, 2)
    batch = {"topk_ids": ids, "topk_logp": logp, "log_tail": tail}
    per_token = [
        [hand_kl_per_token(original[b, t], student[b, t], ids[b, t].tolist()) for t in range(3)]
        for b in range(2)
    ]
    token_mean = topk_kl(student, batch)
    window_sum = topk_kl(student, batch, "window_sum")
    assert token_mean.item() == pytest.approx(sum(map(sum, per_token)) / 6, rel=1e-5)
    assert window_sum.item() == pytest.approx(sum(sum(w) for w in per_token) / 2, rel=1e-5)
    assert window_sum.item() == pytest.approx(3 * token_mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="window_sum"):
        topk_kl(student, batch, "sum")
    with pytest.raises(ValueError, match="kl_reduction"):
        TrainConfig(kl_reduction="batchmean")


def gradients_after_clipping(max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """A parameter's gradient (norm 50) after the trainer's clipping call, and the norm that call reports."""
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([30.0, 40.0])
    norm = Accelerator(cpu=True).clip_grad_norm_([weight], TrainConfig(max_grad_norm=max_grad_norm).clip_norm)
    return weight.grad, float(norm)


def test_max_grad_norm_zero_leaves_gradients_unclipped_and_still_reports_their_norm():
    grad, norm = gradients_after_clipping(0.0)
    assert grad.tolist() == [30.0, 40.0] and norm == pytest.approx(50.0)
    grad, norm = gradients_after_clipping(1.0)
    assert grad.norm().item() == pytest.approx(1.0, rel=1e-4) and norm == pytest.approx(50.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=-1.0)
