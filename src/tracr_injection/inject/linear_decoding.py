"""Reading a teacher's variables off LM hidden states through a linear decoder (shared by training and evaluation).

In: an LM, a split's `TaskData` built with the teacher, the layer mapping (teacher level i <-> LM
`hidden_states[layer_map[i]]`) and a `LinearDecoder` (an injected run's `AlignmentMap`, the same at every
level, or a per-level probe).  Out: the hidden states and teacher residuals at real positions per aligned
level (`aligned_batches`), and per variable, level and true value the number of positions decoded right and
compared (`decode_counts`), summarised as accuracy, the most common value's share, balanced accuracy and
per true value at the written level (`accuracy_table`, `majority_table`, `balanced_table`, `value_table`);
for the ordinal variables (counts, differences) also the accuracy of reading their block as a number.
Training logs the map's decoding with these functions (`inject.probing`) and `evaluate.decoding` builds its
evaluation on them, so both read a variable the same way.

The map is trained with a cosine loss, so `A h` is right only up to a positive factor per position;
decoding is scale-invariant: a categorical variable is the argmax over its dims (no threshold), a
numerical one is its dim divided by the mapped value of tracr's constant `one` dim (1 at every position
of every level), snapped to the nearest value the variable can take.  The truth is the teacher's own
residual at that level, decoded exactly by `TeacherModel.decode_variable`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tracr_injection.compile.teacher import (
    CATEGORICAL_NONE_THRESHOLD,
    NUMERICAL_SNAP_TOLERANCE,
    TeacherConfig,
    TeacherModel,
    TeacherVariable,
)
from tracr_injection.errors import ArtifactError, TracrInjectionError
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import hidden_states
from tracr_injection.tasks.targets import TeacherTargets

ONE_LABEL = "one"  # tracr's residual dim that is 1 at every position
FALLBACK_REFERENCE = "tokens"  # one-hot at every position: its dims sum to 1 where `one` is missing
SCALE_FLOOR = 1e-3  # a reference scale below this fraction of the mapped vector's norm decodes to None
MAP, PROBE = "map", "probe"
NO_VALUE = -1  # a decoded or true value index meaning None
OFF_VALUES = -2  # a true numerical value off the variable's value list (a fraction tracr's set misses)


class DecodingError(TracrInjectionError, ValueError):
    """Decoding cannot run as asked (no teacher targets, a mismatched layer map, a level too early)."""


# ------------------------------------------------------------------------------------------ decoders


@dataclasses.dataclass
class LinearDecoder:
    """Per aligned level, an affine map from LM hidden states [N, d_lm] to teacher residuals [N, d_teacher].

    `kind` is "map" (an injected run's one map, the same at every level) or "probe" (ridge regression
    per level, `ridge` holding the strength chosen at each level).
    """

    kind: str
    weight_LTD: torch.Tensor
    bias_LT: torch.Tensor
    ridge: list[float] | None = None

    def __call__(self, level: int, hidden_ND: torch.Tensor) -> torch.Tensor:
        """Map hidden states of aligned level `level` into the teacher's residual space."""
        return hidden_ND.float() @ self.weight_LTD[level].T + self.bias_LT[level]

    def rows(self, dims: Sequence[int], level: int = -1) -> torch.Tensor:
        """Its rows [K, d_lm] for teacher dims `dims` at `level` (default: the last): the subspace read."""
        return self.weight_LTD[level][list(dims)]

    @classmethod
    def from_map(cls, amap: AlignmentMap, num_levels: int) -> LinearDecoder:
        """An injected run's alignment map as a decoder, the same map at every level."""
        weight_TD = amap.linear.weight.detach().float().cpu().clone()
        bias_T = amap.linear.bias.detach().float().cpu().clone()
        return cls(MAP, weight_TD.expand(num_levels, -1, -1), bias_T.expand(num_levels, -1))

    def save(self, path: str | Path) -> Path:
        """Write the decoder to one safetensors file (so a run's evaluation need not refit its probe)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight_LTD": self.weight_LTD.contiguous(), "bias_LT": self.bias_LT.contiguous()}
        save_file(tensors, str(path), {"kind": self.kind, "ridge": json.dumps(self.ridge)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearDecoder:
        """Read a decoder written by `save`."""
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
            tensors = load_file(str(path))
            return cls(
                metadata["kind"], tensors["weight_LTD"], tensors["bias_LT"], json.loads(metadata["ridge"])
            )
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ArtifactError(
                f"Cannot load a linear decoder from {path} ({err}); refit the probe."
            ) from err


# ----------------------------------------------------------------------------------- hidden states


@dataclasses.dataclass
class AlignedBatch:
    """LM hidden states and teacher residuals at the real positions of some examples, per aligned level.

    `hidden_LND[i]` is `hidden_states[layer_map[i]]` (float32) and `targets_LNT[i]` the teacher's residual
    after i blocks, both [N real positions, width] in the same order.
    """

    hidden_LND: torch.Tensor
    targets_LNT: torch.Tensor


def require_targets(data: TaskData) -> TeacherTargets:
    """The split's stored teacher targets, or a clear error when `data` was built without the teacher."""
    if data.targets is None:
        raise DecodingError(
            "Decoding needs teacher targets: build the TaskData with teacher=the task's teacher."
        )
    return data.targets


def aligned_batches(
    model: Any, data: TaskData, layer_map: Sequence[int], positions: Sequence[int], batch_size: int = 16
) -> Iterator[AlignedBatch]:
    """Batches of examples `positions` of `data`: only the aligned hidden states, only at real positions."""
    targets = require_targets(data)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(positions), batch_size):
            batch = data.collate(positions[start : start + batch_size])
            real_BP = batch["teacher_mask"] & batch["attention_mask"].bool()
            with torch.no_grad():
                ids_BP, mask_BP = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                states = hidden_states(model, ids_BP, mask_BP, up_to=max(layer_map))
                hidden_LND = torch.stack([states[i][real_BP.to(device)].float().cpu() for i in layer_map])
            final_BPT = batch["teacher_final"]
            targets_LNT = torch.stack(
                [targets.at_level(final_BPT, level)[real_BP] for level in range(len(layer_map))]
            )
            yield AlignedBatch(hidden_LND, targets_LNT)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------- decoding


def reference_dims(config: TeacherConfig) -> list[int]:
    """Residual dims whose sum is 1 at every real position: tracr's `one`, else the one-hot `tokens` dims."""
    if ONE_LABEL in config.residual_labels:
        return [config.residual_labels.index(ONE_LABEL)]
    names = [v.name for v in config.variables if v.encoding == "categorical"]
    if FALLBACK_REFERENCE in names:
        return list(config.variable(FALLBACK_REFERENCE).dims)
    raise DecodingError(
        f"Teacher {config.program_name!r} has neither a {ONE_LABEL!r} residual dim nor a categorical "
        f"{FALLBACK_REFERENCE!r} variable, so numerical variables have no reference scale to decode against."
    )


def reference_scale(mapped_NT: torch.Tensor, reference: Sequence[int]) -> torch.Tensor:
    """Per position, the factor scaling the mapped vector: the reference dims' sum (1 in the teacher).

    NaN where it is not above `SCALE_FLOOR` times the vector's norm (tiny or negative: nothing to decode).
    """
    scale_N = mapped_NT[:, list(reference)].sum(-1)
    usable_N = scale_N > SCALE_FLOOR * mapped_NT.norm(dim=-1)
    return scale_N.masked_fill(~usable_N, math.nan)


def decoded_indices(mapped_NT: torch.Tensor, scale_N: torch.Tensor, var: TeacherVariable) -> torch.Tensor:
    """Indices [N] into `var.values` read off mapped vectors: argmax (categorical) or dim / scale snapped to
    the nearest value (numerical); NO_VALUE where a numerical value has no usable scale."""
    part_NK = mapped_NT[:, var.dims]
    if var.encoding == "categorical":
        return part_NK.argmax(-1)
    return nearest_value_indices(part_NK[:, 0].double() / scale_N.double(), value_tensor(var))


def value_tensor(var: TeacherVariable) -> torch.Tensor:
    """The values [V] of a variable with numeric values, as float64."""
    return torch.tensor([float(v) for v in var.values], dtype=torch.float64)


def nearest_value_indices(value_N: torch.Tensor, values_V: torch.Tensor) -> torch.Tensor:
    """Indices [N] into `values_V` of the values nearest to numbers `value_N` (float64); NO_VALUE where one is
    NaN."""
    nearest_N = (value_N[:, None] - values_V[None, :]).abs().argmin(-1)
    return nearest_N.masked_fill(value_N.isnan(), NO_VALUE)


def is_ordinal(var: TeacherVariable) -> bool:
    """A categorical variable over three or more integers (a count, a difference): one with a numeric reading."""
    return (
        var.encoding == "categorical"
        and len(var.values) > 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in var.values)
    )


def number_read_indices(mapped_NT: torch.Tensor, scale_N: torch.Tensor, var: TeacherVariable) -> torch.Tensor:
    """Indices [N] into `var.values` of an ordinal variable read as a number: its one-hot block's scores
    weighted by the values, over the reference scale, snapped to the nearest value (NO_VALUE without a usable
    scale).  A linear read of the value itself: an LM that holds a count as a magnitude along one direction is
    read right this way, while an argmax over the block picks only the extreme values (every score is then
    linear in that one magnitude)."""
    values_V = value_tensor(var)
    return nearest_value_indices((mapped_NT[:, var.dims].double() @ values_V) / scale_N.double(), values_V)


def decode_mapped(mapped_NT: torch.Tensor, scale_N: torch.Tensor, var: TeacherVariable) -> list[Any]:
    """Values of `var` read off mapped vectors (`decoded_indices`); None where nothing decodes."""
    return [None if i == NO_VALUE else var.values[i] for i in decoded_indices(mapped_NT, scale_N, var).tolist()]


def true_indices(residual_NT: torch.Tensor, var: TeacherVariable) -> torch.Tensor:
    """`TeacherModel.decode_variable` as indices [N] into `var.values`, vectorised: NO_VALUE where it reads None
    (a categorical variable below the threshold), OFF_VALUES where it reads a number off the (sorted) value
    list (no decode can equal it), else the index of the value read."""
    part_NK = residual_NT[:, var.dims].float()
    if var.encoding == "categorical":
        best_N, index_N = part_NK.max(dim=-1)
        return index_N.masked_fill(best_N < CATEGORICAL_NONE_THRESHOLD, NO_VALUE)
    x_N = part_NK[:, 0].double()
    values_V = torch.tensor(var.values, dtype=torch.float64)
    upper_N = torch.searchsorted(values_V, x_N).clamp(max=len(values_V) - 1)  # bisect_left
    lower_N = (upper_N - 1).clamp(min=0)
    gap_lower_N, gap_upper_N = (values_V[lower_N] - x_N).abs(), (values_V[upper_N] - x_N).abs()
    nearest_N = torch.where(gap_lower_N <= gap_upper_N, lower_N, upper_N)  # ties: the lower, as `min` does
    return nearest_N.masked_fill(torch.minimum(gap_lower_N, gap_upper_N) > NUMERICAL_SNAP_TOLERANCE, OFF_VALUES)


def value_classes(values: Sequence[Any]) -> torch.Tensor:
    """Per value, the index of the first value equal to it, NO_VALUE for None: two decodes are equal iff
    their classes are (a list may hold equal values such as 1 and 1.0)."""
    return torch.tensor([NO_VALUE if v is None else next(j for j, w in enumerate(values) if w == v) for v in values])


def variable_counts(
    decoded_N: torch.Tensor, truth_N: torch.Tensor, classes_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct decodes, compared positions) of one variable, each a count per true value [V + 1]: compared
    where the truth is not None, correct where the decoded value equals it (index tensors from
    `decoded_indices` and `true_indices`); the last count holds the truths off the value list."""

    def classes(index_N: torch.Tensor) -> torch.Tensor:
        return torch.where(index_N >= 0, classes_V[index_N.clamp(min=0)], index_N)

    truth_class_N, decoded_class_N = classes(truth_N), classes(decoded_N)
    compared_N = truth_class_N != NO_VALUE
    correct_N = compared_N & (decoded_class_N == truth_class_N)
    bins = len(classes_V) + 1
    slot_N = torch.where(truth_class_N == OFF_VALUES, bins - 1, truth_class_N)
    totals_K = torch.bincount(slot_N[compared_N], minlength=bins)
    return torch.bincount(slot_N[correct_N], minlength=bins), totals_K


Tally = dict[str, list[torch.Tensor | None]]  # per variable and level, counts per true value (None: unwritten)


def empty_table(config: TeacherConfig, ordinal_only: bool = False) -> Tally:
    """Per variable (only the `is_ordinal` ones when `ordinal_only`) and level zero counts per true value, None
    at levels before the variable is written."""
    return {
        v.name: [None if level < v.level else torch.zeros(len(v.values) + 1, dtype=torch.long)
                 for level in range(config.num_levels)]
        for v in config.variables
        if is_ordinal(v) or not ordinal_only
    }  # fmt: skip


Counts = tuple[Tally, Tally, Tally]  # correct decodes, compared positions, correct reads as a number (ordinal)


def empty_counts(config: TeacherConfig) -> Counts:
    """Zero `Counts` for `config`'s variables."""
    return empty_table(config), empty_table(config), empty_table(config, ordinal_only=True)


def count_batch(
    batch: AlignedBatch,
    decoder: LinearDecoder,
    teacher: TeacherModel,
    hits: Tally,
    totals: Tally,
    number_hits: Tally,
) -> None:
    """Add one batch's correct decodes, compared positions (truth not None) and, for the variables in
    `number_hits`, correct reads as a number (`number_read_indices`), per variable, level and true value."""
    config = teacher.config
    reference = reference_dims(config)
    classes = {var.name: value_classes(var.values) for var in config.variables}
    for level in range(config.num_levels):
        mapped_NT = decoder(level, batch.hidden_LND[level])
        scale_N = reference_scale(mapped_NT, reference)
        for var in config.variables:
            if level < var.level:
                continue
            truth_N = true_indices(batch.targets_LNT[level], var)
            correct_K, compared_K = variable_counts(
                decoded_indices(mapped_NT, scale_N, var), truth_N, classes[var.name]
            )
            hits[var.name][level] += correct_K
            totals[var.name][level] += compared_K
            if var.name in number_hits:
                read_N = number_read_indices(mapped_NT, scale_N, var)
                number_hits[var.name][level] += variable_counts(read_N, truth_N, classes[var.name])[0]


def decode_counts(batches: Iterable[AlignedBatch], decoder: LinearDecoder, teacher: TeacherModel) -> Counts:
    """(correct, compared, correct as a number) per variable, level and true value over `batches`; None before
    a variable is written."""
    counts = empty_counts(teacher.config)
    for batch in batches:
        count_batch(batch, decoder, teacher, *counts)
    return counts


def accuracy_table(hits: Tally, totals: Tally) -> dict[str, list[float | None]]:
    """Correct / compared per variable of `hits` (all, or the ordinal ones' reads as a number) and level (None
    where not written or nothing was compared)."""
    return {
        name: [None if t is None or not t.sum() else int(h.sum()) / int(t.sum()) for h, t in zip(row, totals[name])]
        for name, row in hits.items()
    }


def position_table(totals: Tally) -> dict[str, list[int | None]]:
    """Positions compared per variable and level (None where not written)."""
    return {name: [None if t is None else int(t.sum()) for t in counts] for name, counts in totals.items()}


def majority_table(totals: Tally) -> dict[str, list[float | None]]:
    """The accuracy of always answering the most common true value, per variable and level: the floor a
    decoder must rise above to carry information about the variable (most positions of a counter hold 0)."""
    return {
        name: [None if t is None or not t.sum() else int(t.max()) / int(t.sum()) for t in counts]
        for name, counts in totals.items()
    }


def balanced_table(hits: Tally, totals: Tally) -> dict[str, list[float | None]]:
    """Per variable and level the mean over the true values present of the share decoded right (balanced
    accuracy): a decoder that only knows the most common value scores 1 / (values present)."""
    table = {}
    for name, counts in totals.items():
        row = []
        for h, t in zip(hits[name], counts):
            present = t > 0 if t is not None else None
            row.append(None if t is None or not present.any() else float((h[present] / t[present]).mean()))
        table[name] = row
    return table


OFF_LABEL = "off"  # `value_table`'s label of the truths off a numerical variable's value list


def value_table(hits: Tally, totals: Tally, config: TeacherConfig) -> dict[str, dict[str, list[int]]]:
    """Per variable at the level it is written, `{value: [decoded right, positions]}` for every true value
    present (keyed by `str(value)`, `OFF_LABEL` for truths off the value list): where decoding fails."""
    table = {}
    for var in config.variables:
        h, t = hits[var.name][var.level], totals[var.name][var.level]
        labels = [str(v) for v in var.values] + [OFF_LABEL]
        table[var.name] = {labels[k]: [int(h[k]), int(t[k])] for k in t.nonzero().flatten().tolist()}
    return table
