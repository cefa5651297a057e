"""Causal tests: does the LM use the injected output subspace to produce its answer?

In: an LM, a task split (`TaskData`, no teacher needed), the block L whose output is edited, and a
subspace of the LM's hidden space given as rows `rows_KD` (an injected run's map rows for the
output variable, or a baseline's probe rows).  Out: a `CausalResult` with, for that subspace and for
a seeded random subspace of the same dimension, the accuracy under Gaussian noise inside the subspace
(absolute and relative norms), the accuracy with the subspace projected out, and interchange rates
(base prompt + the source's subspace component at the answer positions -> the source's answer?).

Every edit replaces the output of block L through `inject.lm.edit_block_output`, and accuracy is
measured with teacher forcing.  That equals greedy exact match under the same edit: an edit at a
position depends only on that position's state (and, for noise, on a fixed draw for that position),
and by causal attention the state at a position depends only on the tokens up to it; so by
induction over the answer, greedy decoding emits the teacher-forced answer (EOS included) iff the
argmax at every answer-predicting position is the next answer token.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate.split_pass import length_sorted_batches
from tracr_injection.inject.answers import answer_positions, answers_hit
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import (
    decoder_blocks,
    edit_block_output,
    first_hidden_states,
    hidden_size,
    inference,
    logits_at,
    num_blocks,
)
from tracr_injection.tasks import IGNORE_INDEX

NOISE_NORMS: tuple[float, ...] = (0.0, 5.0, 10.0, 30.0)
RELATIVE_NORMS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
SUBSPACES: tuple[str, ...] = ("output", "random")
BATCH_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

Edit = Callable[[torch.Tensor], torch.Tensor]


class CausalTestError(TracrInjectionError, ValueError):
    """Arguments the causal tests cannot run with (bad subspace rows, block, norms or too little data)."""


# ------------------------------------------------------------------------------------------ subspaces


def row_space_basis(rows_KD: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows [R, D] spanning the row space of `rows_KD` (R = its rank, float32).

    The projector onto the span is `basis.T @ basis`, which is what `inject.objective.output_projector`
    computes as pinv(rows) @ rows; the rank uses pinv's default tolerance for float32 rows.
    """
    rows = rows_KD.detach().to(torch.float64)
    _, singular_R, basis_RD = torch.linalg.svd(rows, full_matrices=False)
    tolerance = max(rows.shape) * torch.finfo(torch.float32).eps * singular_R.max()
    rank = int((singular_R > tolerance).sum())
    if rank == 0:
        raise CausalTestError(
            f"The subspace rows (shape {tuple(rows_KD.shape)}) are all zero; pass the map's or probe's "
            f"rows for the output variable."
        )
    return basis_RD[:rank].float()


def random_subspace(d_lm: int, k: int, seed: int) -> torch.Tensor:
    """Orthonormal rows [k, d_lm] of a random k-dim subspace: QR of a Gaussian drawn with `seed`."""
    if not 1 <= k <= d_lm:
        raise CausalTestError(f"A random subspace needs 1 <= k <= d_lm, got k={k}, d_lm={d_lm}.")
    generator = torch.Generator().manual_seed(seed)
    gaussian_DK = torch.randn(d_lm, k, generator=generator, dtype=torch.float64)
    q_DK, _ = torch.linalg.qr(gaussian_DK)
    return q_DK.T.float().contiguous()


# ------------------------------------------------------------------------------------------- edits


def noise_edit(
    hidden_BPD: torch.Tensor, basis_KD: torch.Tensor, norm: float, relative: bool, gaussian_BPK: torch.Tensor
) -> torch.Tensor:
    """h + n at every position, n on the sphere of the subspace with radius `norm` (times ||h|| if relative),
    in the direction of the Gaussian draw `gaussian_BPK` (uniform on the sphere; see `gaussian_draws`)."""
    gaussian_BPK = gaussian_BPK.to(hidden_BPD.device)
    direction_BPK = gaussian_BPK / gaussian_BPK.norm(dim=-1, keepdim=True)
    hidden = hidden_BPD.float()
    radius_BP1 = (
        hidden.norm(dim=-1, keepdim=True) * norm if relative else torch.full_like(hidden[..., :1], norm)
    )
    noise_BPD = radius_BP1 * (direction_BPK @ basis_KD.to(hidden.device))
    return (hidden + noise_BPD).to(hidden_BPD.dtype)


def gaussian_draws(data: TaskData, batches: Sequence[Sequence[int]], k: int, seed: int) -> list[torch.Tensor]:
    """Per example, the seeded Gaussian draws [length, K] its positions get: drawn on the CPU batch after batch
    in example order (each batch [B, its width, K]: the draw the tests are defined by), so that every
    batching of the examples, and every device, sees the same noise."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for rows in batches:
        lengths = [len(data.bridged[i]) for i in rows]
        gaussian_BPK = torch.randn((len(rows), max(lengths), k), generator=generator)
        draws += [gaussian_BPK[row, :length] for row, length in enumerate(lengths)]
    return draws


def batch_draws(draws: Sequence[torch.Tensor], rows: Sequence[int], width: int) -> torch.Tensor:
    """The draws [B, width, K] of examples `rows`, right-padded with ones (a pad position's noise is never
    seen by a real one under causal attention, but a zero draw would make it NaN)."""
    gaussian_BPK = torch.ones((len(rows), width, draws[0].shape[-1]))
    for row, i in enumerate(rows):
        gaussian_BPK[row, : len(draws[i])] = draws[i]
    return gaussian_BPK


def ablate_edit(hidden_BPD: torch.Tensor, basis_KD: torch.Tensor) -> torch.Tensor:
    """h - h P: the component inside the subspace removed at every position."""
    hidden = hidden_BPD.float()
    basis = basis_KD.to(hidden.device)
    return (hidden - (hidden @ basis.T) @ basis).to(hidden_BPD.dtype)


def interchange_edit(
    hidden_BPD: torch.Tensor, basis_KD: torch.Tensor, source_BPD: torch.Tensor, mask_BP: torch.Tensor
) -> torch.Tensor:
    """h - h P + h_src P where `mask_BP` is set, h unchanged elsewhere."""
    hidden = hidden_BPD.float()
    basis = basis_KD.to(hidden.device)
    swapped = hidden + ((source_BPD.float() - hidden) @ basis.T) @ basis
    return torch.where(mask_BP.unsqueeze(-1), swapped, hidden).to(hidden_BPD.dtype)


@contextmanager
def edited_block(block: nn.Module, edit: Edit | None) -> Iterator[None]:
    """While active, `block`'s output goes through `edit` (nothing happens for None)."""
    handle = edit_block_output(block, edit) if edit is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


# -------------------------------------------------------------------------------- noise and ablation

BatchEdit = Callable[[Sequence[int], int], Edit | None]
"""The edit for a batch of examples (their indices and the batch width); None runs the batch unedited."""


def every_batch(edit: Edit | None) -> BatchEdit:
    """The same edit on every batch."""
    return lambda rows, width: edit


def correct_rate(correct_N: torch.Tensor, total: int) -> float:
    """The fraction right among the first `total` examples."""
    return float(correct_N[:total].float().mean())


def edited_correct(
    model: Any, block: nn.Module, edit_for: BatchEdit, data: TaskData, batches: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Per example of `batches`, whether teacher forcing gets its whole answer right with `block`'s output
    edited; examples missing from `batches` stay False."""
    device = next(model.parameters()).device
    correct_N = torch.zeros(len(data), dtype=torch.bool)
    with inference(model):
        for rows in batches:
            batch = on_device(data.collate(list(rows)), device)
            logits_NV = edited_answer_logits(model, block, batch, edit_for(rows, batch["labels"].shape[1]))
            correct_N[list(rows)] = answers_hit(logits_NV, batch["labels"]).cpu()
    return correct_N


def example_batches(data: TaskData, count: int, batch_size: int, by_length: bool = True) -> list[list[int]]:
    """The first `count` examples in batches: of similar length (little padding), or in order."""
    total = min(count, len(data))
    if by_length:
        return length_sorted_batches([len(b) for b in data.bridged[:total]], batch_size)
    return [list(range(start, min(total, start + batch_size))) for start in range(0, total, batch_size)]


def edited_accuracy(
    model: Any, block: nn.Module, edit: Edit | None, data: TaskData, count: int, batch_size: int
) -> float:
    """Teacher-forced exact-match accuracy on the first `count` examples with `edit` on `block`'s output."""
    batches = example_batches(data, count, batch_size)
    return correct_rate(edited_correct(model, block, every_batch(edit), data, batches), min(count, len(data)))


def noise_curve(
    model: Any,
    block: nn.Module,
    basis_KD: torch.Tensor,
    data: TaskData,
    norms: Sequence[float],
    *,
    relative: bool,
    count: int,
    seed: int,
    batch_size: int,
    clean_N: torch.Tensor | None = None,
) -> list[float]:
    """Accuracy for each noise norm; every norm reuses the same seeded directions (common random numbers).

    Norm 0 adds exactly nothing, so its accuracy is the clean one (`clean_N`, per example, when given).
    """
    batches = example_batches(data, count, batch_size)
    draws = gaussian_draws(
        data, example_batches(data, count, batch_size, by_length=False), basis_KD.shape[0], seed
    )
    total = min(count, len(data))
    curve = []
    for norm in norms:
        if norm == 0 and clean_N is not None:
            correct_N = clean_N
        else:

            def edit_for(rows: Sequence[int], width: int, norm: float = norm) -> Edit:
                gaussian_BPK = batch_draws(draws, rows, width)
                return partial(
                    noise_edit, basis_KD=basis_KD, norm=norm, relative=relative, gaussian_BPK=gaussian_BPK
                )

            correct_N = edited_correct(model, block, edit_for, data, batches)
        curve.append(correct_rate(correct_N, total))
    return curve


# ------------------------------------------------------------------------------------- interchange


def interchange_pairs(data: TaskData, count: int, pairs: int, seed: int) -> list[tuple[int, int]]:
    """Seeded (base, source) index pairs among the first `count` examples whose answers differ."""
    answers = [tuple(b.input_ids[b.prompt_len :]) for b in data.bridged[:count]]
    if len(set(answers)) < 2:
        raise CausalTestError(
            f"Interchange needs examples with different answers, but the first {len(answers)} examples of "
            f"the split all answer the same; raise `count` or use another split."
        )
    rng = random.Random(seed)
    others: dict[tuple[int, ...], list[int]] = {}
    chosen = []
    for _ in range(pairs):
        base = rng.randrange(len(answers))
        if answers[base] not in others:
            others[answers[base]] = [i for i, a in enumerate(answers) if a != answers[base]]
        chosen.append((base, rng.choice(others[answers[base]])))
    return chosen


def spliced_batch(data: TaskData, pairs: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of each base's prompt followed by its source's answer tokens (labelled)."""
    rows = []
    for base, source in pairs:
        b, s = data.bridged[base], data.bridged[source]
        answer = s.input_ids[s.prompt_len :]
        rows.append((b.input_ids[: b.prompt_len] + answer, [IGNORE_INDEX] * b.prompt_len + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The LM inputs and labels of a batch, on `device`."""
    return {k: batch[k].to(device) for k in BATCH_KEYS}


@torch.no_grad()
def edited_answer_logits(
    model: Any, block: nn.Module, batch: dict[str, torch.Tensor], edit: Edit | None
) -> torch.Tensor:
    """Logits [N, V] at the batch's answer-predicting positions (`answer_positions` order) with `edit` on
    `block`'s output (no gradient)."""
    b_idx, pos, _ = answer_positions(batch["labels"])
    with edited_block(block, edit):
        logits_NV, _ = logits_at(model, batch["input_ids"], batch["attention_mask"], b_idx, pos)
    return logits_NV


@torch.no_grad()
def block_output(model: Any, block: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw output [B, P, D] of `block` on a batch (the forward pass stops right after it)."""
    index = list(decoder_blocks(model)).index(block)
    return first_hidden_states(model, batch["input_ids"], batch["attention_mask"], index + 1)[-1]


def aligned_source(
    source_BPD: torch.Tensor, source_labels_BP: torch.Tensor, target_labels_BP: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source states placed at the target's answer-predicting positions, matched by order within each row.

    Row b's j-th answer-predicting position of the target gets the source's j-th one, for j below
    the smaller of the two answer lengths; returns the placed states [B, P_target, D] and their mask.
    """
    source_b, source_p, _ = answer_positions(source_labels_BP)
    target_b, target_p, _ = answer_positions(target_labels_BP)
    placed_BPD = torch.zeros(
        (*target_labels_BP.shape, source_BPD.shape[-1]), dtype=source_BPD.dtype, device=source_BPD.device
    )
    mask_BP = torch.zeros(target_labels_BP.shape, dtype=torch.bool, device=source_BPD.device)
    for row in range(target_labels_BP.shape[0]):
        from_p, to_p = source_p[source_b == row], target_p[target_b == row]
        shared = min(len(from_p), len(to_p))
        placed_BPD[row, to_p[:shared]] = source_BPD[row, from_p[:shared]]
        mask_BP[row, to_p[:shared]] = True
    return placed_BPD, mask_BP


def interchanged_logits(
    model: Any,
    block: nn.Module,
    basis_KD: torch.Tensor | None,
    source_BPD: torch.Tensor,
    source_labels_BP: torch.Tensor,
    target: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Answer-position logits [N, V] of the target batch with the source's subspace component swapped in at
    the answer positions.

    `basis_KD` None runs the target without intervention.
    """
    if basis_KD is None:
        return edited_answer_logits(model, block, target, None)
    placed_BPD, mask_BP = aligned_source(source_BPD, source_labels_BP, target["labels"])
    edit = partial(interchange_edit, basis_KD=basis_KD, source_BPD=placed_BPD, mask_BP=mask_BP)
    return edited_answer_logits(model, block, target, edit)


def interchange_rates(
    model: Any,
    block: nn.Module,
    bases: dict[str, torch.Tensor | None],
    data: TaskData,
    pairs: Sequence[tuple[int, int]],
    batch_size: int,
    clean_N: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Per basis name, the rate of pairs where the model answers the source's answer ("source_followed")
    and where it still answers the base's own answer ("base_kept"), all under teacher forcing.

    "source_followed" runs base prompt + source answer; "base_kept" runs base prompt + base answer with
    the source's states at the first min(len) answer positions (what a greedy run that keeps the
    base's answer would receive).  Pairs run in batches of similar base length; a None basis on
    "base_kept" is the clean run of the base, read off `clean_N` (per example) when given.
    """
    device = next(model.parameters()).device
    hits: dict[str, dict[str, torch.Tensor]] = {
        name: {what: torch.zeros(len(pairs), dtype=torch.bool) for what in ("source_followed", "base_kept")}
        for name in bases
    }
    batches = length_sorted_batches([len(data.bridged[base]) for base, _ in pairs], batch_size)
    with inference(model):
        for rows in batches:
            chunk = [pairs[i] for i in rows]
            source = on_device(data.collate([s for _, s in chunk]), device)
            source_BPD = block_output(model, block, source)
            targets = {
                "source_followed": on_device(spliced_batch(data, chunk), device),
                "base_kept": on_device(data.collate([b for b, _ in chunk]), device),
            }
            for what, target in targets.items():
                for name, basis in bases.items():
                    if basis is None and what == "base_kept" and clean_N is not None:
                        hits[name][what][rows] = clean_N[[b for b, _ in chunk]]
                        continue
                    logits = interchanged_logits(model, block, basis, source_BPD, source["labels"], target)
                    hits[name][what][rows] = answers_hit(logits, target["labels"]).cpu()
    return {
        name: {what: float(rows.float().mean()) for what, rows in by_what.items()}
        for name, by_what in hits.items()
    }


# ------------------------------------------------------------------------------------------ runner


@dataclasses.dataclass
class CausalResult:
    """Everything the causal tests measured; keys "output" (the given subspace) and "random" (the control)."""

    block: int
    k: int
    d_lm: int
    seed: int
    count: int
    clean_accuracy: float
    noise_norms: list[float]
    noise: dict[str, list[float]]
    relative_norms: list[float]
    relative_noise: dict[str, list[float]]
    ablation: dict[str, float]
    pairs: int
    interchange: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def check_arguments(
    model: Any, rows_KD: torch.Tensor, block: int, norms: Sequence[float], pairs: int
) -> None:
    """Reject rows of the wrong width, a block outside the model, negative noise norms and no pairs."""
    d_lm, blocks = hidden_size(model), num_blocks(model)
    if rows_KD.ndim != 2 or rows_KD.shape[1] != d_lm:
        raise CausalTestError(
            f"Subspace rows must be [K, d_lm={d_lm}] (vectors in the LM's hidden space), got shape "
            f"{tuple(rows_KD.shape)}; pass amap.linear.weight[output_dims] or a probe's weight rows."
        )
    if not 0 <= block < blocks:
        raise CausalTestError(f"Block {block} is outside the model's blocks 0..{blocks - 1}.")
    if any(norm < 0 for norm in norms):
        raise CausalTestError(f"Noise norms must be >= 0, got {list(norms)}.")
    if pairs < 1:
        raise CausalTestError(f"Interchange needs at least one (base, source) pair, got pairs={pairs}.")


def causal_tests(
    model: Any,
    data: TaskData,
    rows_KD: torch.Tensor,
    block: int,
    *,
    count: int,
    noise_norms: Sequence[float] = NOISE_NORMS,
    relative_norms: Sequence[float] = RELATIVE_NORMS,
    pairs: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> CausalResult:
    """Noise, ablation and interchange at the output of `block`, for the rows' subspace and a random one.

    The random control has the same dimension K (the rank of `rows_KD`) and is drawn with `seed`;
    noise and interchange pairs use `seed` too, so the result is deterministic.  `progress` shows a bar
    over the measured parts.
    """
    check_arguments(model, rows_KD, block, [*noise_norms, *relative_norms], pairs)
    device = next(model.parameters()).device
    basis_KD = row_space_basis(rows_KD)
    k, d_lm = basis_KD.shape
    bases = {"output": basis_KD.to(device), "random": random_subspace(d_lm, k, seed).to(device)}
    edited = decoder_blocks(model)[block]
    batches = example_batches(data, count, batch_size)
    total = min(count, len(data))
    bar = tqdm(total=4 * len(bases) + 2, desc="[eval] causal", unit="part", disable=not progress)
    clean_N = edited_correct(model, edited, every_batch(None), data, batches)
    bar.update()
    common = {"count": count, "seed": seed, "batch_size": batch_size, "clean_N": clean_N}
    noise, relative, ablation = {}, {}, {}
    for name, basis in bases.items():
        noise[name] = noise_curve(model, edited, basis, data, noise_norms, relative=False, **common)
        relative[name] = noise_curve(model, edited, basis, data, relative_norms, relative=True, **common)
        bar.update(2)
    for name, basis in bases.items():
        ablate = every_batch(partial(ablate_edit, basis_KD=basis))
        ablation[name] = correct_rate(edited_correct(model, edited, ablate, data, batches), total)
        bar.update()
    chosen = interchange_pairs(data, count, pairs, seed)
    interchange = interchange_rates(model, edited, {**bases, "none": None}, data, chosen, batch_size, clean_N)
    bar.update(bar.total - bar.n)
    bar.close()
    return CausalResult(
        block=block,
        k=k,
        d_lm=d_lm,
        seed=seed,
        count=total,
        clean_accuracy=correct_rate(clean_N, total),
        noise_norms=[float(n) for n in noise_norms],
        noise=noise,
        relative_norms=[float(n) for n in relative_norms],
        relative_noise=relative,
        ablation=ablation,
        pairs=len(chosen),
        interchange=interchange,
    )
