"""One teacher-forced LM pass per evaluation split, shared by accuracy, decoding and the answer readout.

In: an LM, a split's `TaskData` (no teacher needed), optionally the teacher targets of its first examples,
the layer map and linear decoders.  Out: a `SplitPass`: per example whether the whole answer is right under
teacher forcing (equal to greedy exact match, see `inject.answers.answers_correct`), the readout rows
(hidden state at the last aligned level, the LM's argmax and the expected symbol at every answer-symbol
position) and per decoder the decoding counts per variable and level.

Why: accuracy, readout and decoding each ran the LM over the same prompts (greedy generation, a full pass
with every hidden state, passes up to block L once per decoder).  One forward pass yields the answer logits
and the aligned hidden states at once; batches of similar length pad little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.evaluate.readout import ReadoutStates, logits_and_hidden_states
from tracr_injection.inject.answers import answer_positions, answers_hit
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (
    AlignedBatch,
    Counts,
    LinearDecoder,
    count_batch,
    empty_counts,
)
from tracr_injection.inject.lm import hidden_size, inference
from tracr_injection.tasks.targets import TeacherTargets


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of `batch_size`, shortest examples first, so that a batch pads little."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclasses.dataclass
class SplitPass:
    """What one teacher-forced pass over a split gives: per example correctness, the readout rows of the first
    `decoding_examples` examples and, where targets were given, per decoder its decoding `Counts`."""

    correct_N: torch.Tensor
    readout: ReadoutStates
    decoding: dict[str, Counts] | None


@dataclasses.dataclass
class PassInputs:
    """What the pass reads besides the LM: the split, the aligned hidden-state indices, the decoders and
    (for decoding) the teacher with the targets of the first examples."""

    data: TaskData
    layer_map: Sequence[int]
    decoders: Mapping[str, LinearDecoder]
    teacher: TeacherModel
    targets: TeacherTargets | None
    decoding_examples: int


class _Accumulator:
    """Per-batch results of the pass, gathered into a `SplitPass`."""

    def __init__(self, inputs: PassInputs):
        self.inputs = inputs
        self.correct_N = torch.zeros(len(inputs.data), dtype=torch.bool)
        self.hidden: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.expected: list[str] = []
        config = inputs.teacher.config
        self.counts = {kind: empty_counts(config) for kind in inputs.decoders}

    def result(self, d_lm: int) -> SplitPass:
        """The gathered `SplitPass`."""
        hidden_ND = torch.cat(self.hidden) if self.hidden else torch.zeros(0, d_lm)
        predicted_N = torch.cat(self.predicted) if self.predicted else torch.zeros(0, dtype=torch.long)
        readout = ReadoutStates(hidden_ND, predicted_N, self.expected)
        return SplitPass(self.correct_N, readout, self.counts if self.inputs.targets is not None else None)


def add_readout_rows(
    acc: _Accumulator, rows: list[int], b_idx_N: torch.Tensor, pos_N: torch.Tensor, argmax_N: torch.Tensor,
    hidden_BPD: torch.Tensor,
) -> None:  # fmt: skip
    """Keep the readout rows (answer-symbol positions of examples below `decoding_examples`) of one batch."""
    bridged = acc.inputs.data.bridged
    keep = [
        i
        for i, (b, p) in enumerate(zip(b_idx_N.tolist(), pos_N.tolist()))
        if rows[b] < acc.inputs.decoding_examples and bridged[rows[b]].expected[p] is not None
    ]
    keep_K = torch.tensor(keep, dtype=torch.long)
    b_K, p_K = b_idx_N[keep_K], pos_N[keep_K]
    acc.hidden.append(hidden_BPD[b_K, p_K].float().cpu())
    acc.predicted.append(argmax_N[keep_K].cpu())
    acc.expected += [bridged[rows[b]].expected[p] for b, p in zip(b_K.tolist(), p_K.tolist())]


def add_decoding_counts(
    acc: _Accumulator, rows: list[int], states: Sequence[torch.Tensor], attention_mask_BP: torch.Tensor
) -> None:
    """Add the decoding counts of the batch's examples that have teacher targets (at their real positions)."""
    targets = acc.inputs.targets
    decoded = [i for i, k in enumerate(rows) if k < acc.inputs.decoding_examples]
    if targets is None or not decoded:
        return
    decoded_B = torch.tensor(decoded)
    final_BPT, teacher_mask_BP = targets.batch([rows[i] for i in decoded], attention_mask_BP.shape[1])
    real_BP = teacher_mask_BP & attention_mask_BP[decoded_B].bool()
    hidden_LND = torch.stack([states[i][decoded_B][real_BP].float().cpu() for i in acc.inputs.layer_map])
    targets_LNT = torch.stack(
        [targets.at_level(final_BPT, level)[real_BP] for level in range(len(acc.inputs.layer_map))]
    )
    batch = AlignedBatch(hidden_LND, targets_LNT)
    for kind, decoder in acc.inputs.decoders.items():
        count_batch(batch, decoder, acc.inputs.teacher, *acc.counts[kind])


def split_pass(model: Any, inputs: PassInputs, batch_size: int = 16, progress: Any = None) -> SplitPass:
    """Run the LM once over every example of `inputs.data` (teacher forcing, batches of similar length).

    `progress`, when given, is called with the number of examples each batch finished.
    """
    data = inputs.data
    acc = _Accumulator(inputs)
    readout_index = inputs.layer_map[-1]
    with inference(model):
        for rows in length_sorted_batches([len(b) for b in data.bridged], batch_size):
            batch = data.collate(rows)
            labels_BP = batch["labels"]
            b_idx_N, pos_N, _ = answer_positions(labels_BP)
            logits_NV, output = logits_and_hidden_states(model, batch, b_idx_N, pos_N)
            acc.correct_N[rows] = answers_hit(logits_NV, labels_BP.to(logits_NV.device)).cpu()
            states = [s.cpu() for s in output.hidden_states[: max(inputs.layer_map) + 1]]
            add_readout_rows(acc, rows, b_idx_N, pos_N, logits_NV.argmax(-1).cpu(), states[readout_index])
            add_decoding_counts(acc, rows, states, batch["attention_mask"])
            if progress is not None:
                progress(len(rows))
    return acc.result(hidden_size(model))
