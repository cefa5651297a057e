"""Does an injected run's answer go through its output subspace? Answer CE under edits of the roll block.

In: an inject run's `Subject` (LM, map, teacher, layer mapping, roll block L and the recorded training
config) and a split of its task (default: the first 96 training examples of the seed-0 draw, in batches of
8, the training batch size and donor rule).  Out: a JSON-ready dict (`tracr-inject answer-path` prints
it) with, per edit of block L's output, the answer cross-entropy, per-token accuracy and exact match under
teacher forcing, overall and per answer step:

- `plain`: unedited (what evaluation sees);
- `roll`: detach-and-roll as in training (the rest of the state from the previous row);
- `roll_truth`: roll, with the output-subspace part replaced by the teacher's true output variable
  (`objective.teacher_inside`: the map then reads exactly c * truth, c the mapped state's own scale);
- `roll_empty`: roll, with the output-subspace part removed (nothing of this example is left);
- `plain_truth`: unedited but the output-subspace part replaced by the truth as in `roll_truth`.

It also holds how often the map's argmax of the output variable is right at the answer-predicting
positions, read at the last aligned hidden state and at the roll point, and how large the gradients of
the task loss (under the training roll) and of the alignment term are on the blocks 0..L, on the first
`GRADIENT_BATCHES` batches: the task loss reaches those blocks only through what the later layers read
of the subspace (the `early` group training's probes log).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate.causal import edited_answer_logits
from tracr_injection.evaluate.subject import Subject
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.answers import answer_positions, answers_hit
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import decoder_blocks, hidden_states
from tracr_injection.inject.objective import (
    InjectionObjective,
    RunParts,
    detach_and_roll,
    first_answer_positions,
    output_projector,
    run_dim_scales,
    teacher_inside,
)
from tracr_injection.inject.probing import block_groups, term_gradient_norms

CONDITIONS = ("plain", "roll", "roll_truth", "roll_empty", "plain_truth")
GRADIENT_BATCHES = 4  # batches the early-block gradient norms are averaged over

Edit = Callable[[torch.Tensor], torch.Tensor]


class AnswerPathError(TracrInjectionError, ValueError):
    """The answer path cannot be measured on this run or with these sizes."""


def make_edit(
    condition: str,
    amap: AlignmentMap,
    dims: list[int],
    projector_DD: torch.Tensor,
    anchors_B: torch.Tensor,
    teacher_final_BPT: torch.Tensor,
) -> Edit | None:
    """The block-output edit of one condition (`teacher_inside` writes the truth as subspace forcing does)."""

    def truth(h: torch.Tensor) -> torch.Tensor:
        return teacher_inside(h, amap, dims, teacher_final_BPT)

    edits: dict[str, Edit | None] = {
        "plain": None,
        "roll": lambda h: detach_and_roll(h, projector_DD, anchors_B),
        "roll_truth": lambda h: detach_and_roll(h, projector_DD, anchors_B, truth(h)),
        "roll_empty": lambda h: detach_and_roll(h, projector_DD, anchors_B, torch.zeros_like(h)),
        "plain_truth": lambda h: h - h @ projector_DD + truth(h),
    }
    return edits[condition]


class Tally:
    """Sums of answer CE and hits per answer step (0 = the first answer token), and whole-answer hits."""

    def __init__(self) -> None:
        self.ce: collections.Counter[int] = collections.Counter()
        self.hits: collections.Counter[int] = collections.Counter()
        self.tokens: collections.Counter[int] = collections.Counter()
        self.rows_right = self.rows = 0

    def add(
        self,
        logits_NV: torch.Tensor,
        target_N: torch.Tensor,
        step_N: torch.Tensor,
        rows_hit_B: torch.Tensor | None = None,
    ) -> None:
        """Add one batch's answer-position scores (and, for LM logits, each row's whole-answer hit)."""
        ce_N = torch.nn.functional.cross_entropy(logits_NV, target_N, reduction="none")
        hit_N = logits_NV.argmax(-1) == target_N
        for step, ce, hit in zip(step_N.tolist(), ce_N.tolist(), hit_N.tolist()):
            self.ce[step] += ce
            self.hits[step] += hit
            self.tokens[step] += 1
        if rows_hit_B is not None:
            self.rows_right += int(rows_hit_B.sum())
            self.rows += len(rows_hit_B)

    def summary(self) -> dict[str, Any]:
        """Mean CE and token accuracy overall and per step, and exact match."""
        tokens = sum(self.tokens.values())
        return {
            "answer_ce": round(sum(self.ce.values()) / tokens, 4),
            "token_accuracy": round(sum(self.hits.values()) / tokens, 4),
            "exact_match": round(self.rows_right / self.rows, 4) if self.rows else None,
            "ce_by_step": {s: round(self.ce[s] / n, 3) for s, n in sorted(self.tokens.items())},
            "accuracy_by_step": {s: round(self.hits[s] / n, 3) for s, n in sorted(self.tokens.items())},
        }


def run_objective(subject: Subject, data: TaskData) -> InjectionObjective:
    """The run's training objective (its recorded config) over the subject's model and map; no KL term."""
    config, teacher_config = subject.manifest.config, subject.teacher.config
    variable_scales = subject.manifest.alignment_variable_scales or {}  # "equal" weighting, as trained
    parts = RunParts(
        model=subject.model, tokenizer=subject.tokenizer, amap=subject.amap, data=data, kl_cache=None,
        layer_map=subject.layer_map, roll_block=subject.block, output_dims=subject.output_dims,
        dim_levels=data.targets.dim_levels, teacher=subject.teacher, variable_scales=variable_scales,
        dim_scales=run_dim_scales(teacher_config, config.alignment_scales, variable_scales),
    )  # fmt: skip
    return InjectionObjective(config, parts)


@torch.enable_grad()
def early_gradient_norms(subject: Subject, data: TaskData, batches: list[list[int]]) -> dict[str, float]:
    """Mean over `batches` of the gradient norms of the task loss (training roll) and of the alignment term
    (times its weight) on the blocks 0..roll block."""
    objective = run_objective(subject, data)
    groups = block_groups(subject.model, subject.block)
    norms = {"task_ce": 0.0, "alignment": 0.0}
    for positions in batches:
        terms, _ = objective.terms(data.collate(positions))
        for name, by_group in term_gradient_norms({k: terms[k] for k in norms}, groups).items():
            norms[name] += by_group["early"] / len(batches)
    return {k: round(v, 4) for k, v in norms.items()}


def check_sizes(examples: int, batch_size: int) -> None:
    """Raise unless both sizes are positive (no examples would silently mean the whole split)."""
    if examples < 1 or batch_size < 1:
        raise AnswerPathError(
            f"--examples and --batch-size must be at least 1, got {examples} and {batch_size}."
        )


def check_inject_run(subject: Subject) -> None:
    """Raise unless the subject is an inject run: only its map defines the output subspace edited."""
    if subject.amap is None:
        raise AnswerPathError(
            f"{subject.name} is a {subject.method} run: the answer path edits an inject run's output "
            "subspace; pass a run folder trained with --method inject."
        )


@torch.no_grad()
def answer_path(
    subject: Subject, examples: int = 96, batch_size: int = 8, split: str = "train"
) -> dict[str, Any]:
    """Answer CE / token accuracy / exact match per condition, the map's output accuracy per answer step and
    the early-block gradient norms, on the first `examples` examples of `split` (seed-0 draw)."""
    check_sizes(examples, batch_size)
    check_inject_run(subject)
    model, amap, config = subject.model.eval(), subject.amap, subject.teacher.config
    dims = subject.output_dims
    block = decoder_blocks(model)[subject.block]
    projector_DD = output_projector(amap, dims)
    data = subject.task_data(split, examples, seed=0, with_targets=True)
    batches = [list(range(i, min(len(data), i + batch_size))) for i in range(0, len(data), batch_size)]
    tallies = {c: Tally() for c in CONDITIONS}
    read = {"last_level": Tally(), "roll_point": Tally()}
    for positions in batches:
        batch = data.collate(positions)
        labels = batch["labels"]
        b_idx, pos, target = answer_positions(labels)
        anchors_B = first_answer_positions(labels)
        step_N = pos - anchors_B[b_idx]
        truth_BPK = batch["teacher_final"][..., dims]
        states = hidden_states(model, batch["input_ids"], batch["attention_mask"])
        for name, index in (("last_level", subject.layer_map[-1]), ("roll_point", subject.block + 1)):
            mapped_NK = amap(states[index][b_idx, pos])[:, dims]
            read[name].add(mapped_NK, truth_BPK[b_idx, pos].argmax(-1), step_N)
        for condition in CONDITIONS:
            edit = make_edit(condition, amap, dims, projector_DD, anchors_B, batch["teacher_final"])
            logits_NV = edited_answer_logits(model, block, batch, edit)
            tallies[condition].add(logits_NV, target, step_N, answers_hit(logits_NV, labels))
    return {
        "run": str(subject.run_dir),
        "split": split,
        "examples": len(data),
        "roll_block": subject.block,
        "output_variable": config.output_variable,
        "conditions": {c: t.summary() for c, t in tallies.items()},
        "early_block_gradient_norms": early_gradient_norms(subject, data, batches[:GRADIENT_BATCHES]),
        "map_output_accuracy": {
            k: {"overall": t.summary()["token_accuracy"], "by_step": t.summary()["accuracy_by_step"]}
            for k, t in read.items()
        },
    }
