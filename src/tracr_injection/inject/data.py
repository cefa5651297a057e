"""Training batches: bridged task examples with their stored teacher targets.

In: a task split, a tokenizer and (for injection) the compiled teacher.  Out: padded batches
(`input_ids`, `attention_mask`, `labels` on exactly the answer tokens, and the teacher's
final residual with its mask), in a seeded order that a resumed run reproduces from the step
number alone.  Only the examples a run will see get teacher targets (computed once, cached).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.tasks import IGNORE_INDEX, BridgedExample, TokenBridge, get_task, teacher_inputs
from tracr_injection.tasks.targets import TeacherTargets, ensure_targets


def run_subset(num_examples: int, needed: int, seed: int) -> list[int]:
    """The example indices a run uses: a seeded permutation of the split, cut to what `needed` steps see."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return order[: min(num_examples, needed)]


def batch_positions(
    step: int, batch_size: int, num_examples: int, rank: int = 0, world: int = 1
) -> list[int]:
    """Positions (into the run subset) of this process's batch at `step`; epochs wrap around."""
    start = (step * world + rank) * batch_size
    return [(start + j) % num_examples for j in range(batch_size)]


class TaskData:
    """One split's bridged examples (and teacher targets when a teacher is given), batched by position."""

    def __init__(
        self,
        task_name: str,
        split: str,
        tokenizer: Any,
        tokenizer_name: str,
        *,
        teacher: TeacherModel | None = None,
        max_examples: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        self.task = get_task(task_name)
        examples = self.task.examples(split)
        keep = run_subset(len(examples), max_examples or len(examples), seed)
        self.bridged: list[BridgedExample] = TokenBridge(tokenizer, self.task).bridge_all(
            [examples[i] for i in keep]
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.targets: TeacherTargets | None = None
        if teacher is not None:
            teacher_inputs(self.bridged, self.task, split, teacher.config.max_seq_len)
            self.targets = ensure_targets(
                teacher,
                self.bridged,
                task=task_name,
                split=f"{split}-seed{seed}-n{len(keep)}",
                tokenizer=tokenizer_name,
                progress=progress,
            )

    def __len__(self) -> int:
        return len(self.bridged)

    def collate(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """A right-padded batch; with targets, also `teacher_final` [B, P, d_teacher] and `teacher_mask`."""
        rows = [self.bridged[p] for p in positions]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r.input_ids)
            labels[i, : len(r)] = torch.tensor(r.labels)
            attention_mask[i, : len(r)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.targets is not None:
            batch["teacher_final"], batch["teacher_mask"] = self.targets.batch(list(positions), width)
        return batch
