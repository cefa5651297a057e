"""The post-hoc ridge probe: the fair baseline decoder of the program's variables from an LM's hidden states.

In: a `Subject` (its LM, teacher, task and layer mapping) and examples of a split with the teacher's targets
(`fit_task_probe`: a seeded subset of the task's train split, disjoint from every evaluation split).
Out: a `LinearDecoder` of kind "probe", one ridge regression per aligned level from the LM's hidden state
to the teacher's whole residual, its strength chosen from `RIDGE_GRID` on a held-out part by squared
error; `evaluate.decoding` and the pipeline read variables off it as they do off an injected run's map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from tracr_injection.evaluate.decoding import check_layer_map
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (
    PROBE,
    AlignedBatch,
    DecodingError,
    LinearDecoder,
    aligned_batches,
    require_targets,
)

if TYPE_CHECKING:
    from tracr_injection.evaluate.subject import Subject

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative ridge strengths, see `ridge_solution`
VALIDATION_FRACTION = 0.2


@dataclasses.dataclass
class RidgeStats:
    """Sufficient statistics of a least-squares problem with a bias column, per level (float64).

    `gram_LEE` = X^T X and `cross_LET` = X^T Y with X = [hidden, 1]; `square_L` = sum of Y^2.
    """

    gram_LEE: torch.Tensor
    cross_LET: torch.Tensor
    square_L: torch.Tensor

    @classmethod
    def zeros(cls, num_levels: int, d_lm: int, d_teacher: int) -> RidgeStats:
        """Empty statistics."""
        e = d_lm + 1
        return cls(
            torch.zeros(num_levels, e, e, dtype=torch.float64),
            torch.zeros(num_levels, e, d_teacher, dtype=torch.float64),
            torch.zeros(num_levels, dtype=torch.float64),
        )

    def add(self, batch: AlignedBatch) -> None:
        """Accumulate one batch."""
        hidden_LNE = torch.cat([batch.hidden_LND, torch.ones_like(batch.hidden_LND[..., :1])], -1).double()
        targets_LNT = batch.targets_LNT.double()
        self.gram_LEE += hidden_LNE.transpose(1, 2) @ hidden_LNE
        self.cross_LET += hidden_LNE.transpose(1, 2) @ targets_LNT
        self.square_L += targets_LNT.square().sum((1, 2))


def accumulate(batches: Iterable[AlignedBatch]) -> RidgeStats | None:
    """RidgeStats of all `batches` (None if there are none)."""
    stats = None
    for batch in batches:
        if stats is None:
            levels, _, d_lm = batch.hidden_LND.shape
            stats = RidgeStats.zeros(levels, d_lm, batch.targets_LNT.shape[-1])
        stats.add(batch)
    return stats


def ridge_solution(gram_EE: torch.Tensor, cross_ET: torch.Tensor, strength: float) -> torch.Tensor:
    """argmin_W |X W - Y|^2 + lam |W without its bias row|^2 from X^T X and X^T Y (X's last column is 1).

    lam = strength * trace of X^T X over the features / d_lm (= strength * N * mean squared feature), so
    the grid is free of the hidden states' scale; closed form (X^T X + lam diag(1, .., 1, 0))^-1 X^T Y.
    """
    penalty_E = torch.full((gram_EE.shape[0],), strength * float(gram_EE.diagonal()[:-1].mean()))
    penalty_E[-1] = 0.0
    return torch.linalg.solve(gram_EE + torch.diag(penalty_E.to(gram_EE.dtype)), cross_ET)


def squared_error(
    weight_ET: torch.Tensor, gram_EE: torch.Tensor, cross_ET: torch.Tensor, square: torch.Tensor
) -> float:
    """|X W - Y|^2 from the statistics of (X, Y): sum Y^2 - 2 <W, X^T Y> + <W, X^T X W>."""
    return float(square - 2 * (weight_ET * cross_ET).sum() + (weight_ET * (gram_EE @ weight_ET)).sum())


def fit_ridge(
    fit: Iterable[AlignedBatch], validation: Iterable[AlignedBatch], grid: Sequence[float] = RIDGE_GRID
) -> LinearDecoder:
    """A ridge probe per level: the `grid` strength of least validation error, refitted on both parts."""
    fit_stats, val_stats = accumulate(fit), accumulate(validation)
    if fit_stats is None or val_stats is None:
        raise DecodingError("Fitting a probe needs examples in both its fit and its validation part.")
    weights, biases, chosen = [], [], []
    for level in range(fit_stats.gram_LEE.shape[0]):
        gram, cross = fit_stats.gram_LEE[level], fit_stats.cross_LET[level]
        errors = [
            squared_error(
                ridge_solution(gram, cross, s),
                val_stats.gram_LEE[level],
                val_stats.cross_LET[level],
                val_stats.square_L[level],
            )
            for s in grid
        ]
        best = grid[min(range(len(grid)), key=errors.__getitem__)]
        weight_ET = ridge_solution(gram + val_stats.gram_LEE[level], cross + val_stats.cross_LET[level], best)
        weights.append(weight_ET[:-1].T.float())
        biases.append(weight_ET[-1].float())
        chosen.append(best)
    return LinearDecoder(PROBE, torch.stack(weights), torch.stack(biases), chosen)


def fit_probe(
    subject: Subject,
    data: TaskData,
    *,
    batch_size: int = 16,
    validation_fraction: float = VALIDATION_FRACTION,
    grid: Sequence[float] = RIDGE_GRID,
) -> LinearDecoder:
    """Ridge probes (the subject's hidden state -> teacher residual, every dim, one per level) fit on `data`.

    The last `validation_fraction` of `data`'s examples choose the ridge strength from `grid` by squared
    error; the probe is then refitted on all of them.  Fit it on examples disjoint from the evaluated ones
    (`fit_task_probe` uses the train split, which no evaluation split overlaps).
    """
    check_layer_map(subject.layer_map, require_targets(data).manifest.num_levels)
    num_val = max(1, round(validation_fraction * len(data)))
    order = list(range(len(data)))
    fit_part, val_part = order[:-num_val], order[-num_val:]
    return fit_ridge(
        aligned_batches(subject.model, data, subject.layer_map, fit_part, batch_size),
        aligned_batches(subject.model, data, subject.layer_map, val_part, batch_size),
        grid,
    )


def fit_task_probe(
    subject: Subject, *, num_examples: int = 512, seed: int = 0, batch_size: int = 16
) -> LinearDecoder:
    """`fit_probe` on a seeded subset of the task's train split (disjoint from every evaluation split)."""
    data = subject.task_data(subject.task_spec.train_split.name, num_examples, seed, with_targets=True)
    return fit_probe(subject, data, batch_size=batch_size)
