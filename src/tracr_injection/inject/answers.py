"""Where a batch's answer tokens are, and whether an LM answers right, at one teacher-forced pass per batch.

In: answer labels [B, P] (-100 outside the answer tokens), an LM's logits at the answer-predicting
positions, or a causal LM and `TaskData`.  Out: the answer positions and their target tokens
(`answer_positions`, also what the objective's task term reads), per row whether the whole answer (EOS
included) is the argmax at every answer position, which equals greedy exact match (`answers_hit`,
`answers_correct`), and that exact-match accuracy (`exact_match_accuracy`).  Used by the trainer (accuracy
before and after training), the accuracy probe over training and evaluation's causal tests and split pass.
"""

from __future__ import annotations

from typing import Any

import torch

from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import inference, logits_at


def answer_positions(
    labels_BP: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, position, target token) of every answer token: the model at p-1 predicts label p."""
    batch_idx, pos = torch.nonzero(labels_BP[:, 1:] != ignore_index, as_tuple=True)
    return batch_idx, pos, labels_BP[batch_idx, pos + 1]


def answers_correct(model: Any, data: TaskData, count: int, batch_size: int = 16) -> torch.Tensor:
    """Per example (the first `count` of `data`), whether the whole answer is right under teacher forcing.

    Greedy decoding emits the answer (EOS included) iff the argmax at every answer position is the
    next answer token, so this equals greedy exact match at one forward pass per batch.
    """
    device = next(model.parameters()).device
    total = min(count, len(data))
    correct_N = torch.zeros(total, dtype=torch.bool)
    with inference(model):
        for start in range(0, total, batch_size):
            positions = list(range(start, min(total, start + batch_size)))
            batch = {
                k: v.to(device)
                for k, v in data.collate(positions).items()
                if k in ("input_ids", "attention_mask", "labels")
            }
            b_idx, pos, _ = answer_positions(batch["labels"])
            logits_NV, _ = logits_at(model, batch["input_ids"], batch["attention_mask"], b_idx, pos)
            correct_N[start : start + len(positions)] = answers_hit(logits_NV, batch["labels"]).cpu()
    return correct_N


def answers_hit(logits_NV: torch.Tensor, labels_BP: torch.Tensor) -> torch.Tensor:
    """Per row, whether the argmax at every answer-predicting position is the labelled next token
    (`logits_NV` at those positions, in `answer_positions` order)."""
    b_idx, _, target = answer_positions(labels_BP)
    miss = logits_NV.argmax(-1) != target
    wrong_B = torch.zeros(labels_BP.shape[0], dtype=torch.bool, device=labels_BP.device)
    return ~wrong_B.index_put_((b_idx,), miss, accumulate=True)


def exact_match_accuracy(model: Any, data: TaskData, count: int, batch_size: int = 16) -> float:
    """Teacher-forced exact-match accuracy (equal to greedy decoding's, EOS included) on the first `count` examples."""
    correct_N = answers_correct(model, data, count, batch_size)
    return float(correct_N.float().mean()) if len(correct_N) else 0.0
