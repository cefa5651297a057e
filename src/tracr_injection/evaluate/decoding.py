"""Decoding the program's variables from the LM's hidden states (the interpretable-subspace test).

In: an LM, a split's `TaskData` built with the teacher, the layer mapping (teacher level i <-> LM
`hidden_states[layer_map[i]]`) and a `LinearDecoder`: an injected run's `AlignmentMap` (one map shared
by every level) or a ridge probe fitted post hoc on held-out examples (one map per level, the fair
baseline).  Out: per split a `DecodingResult` (accuracy and position count of every teacher variable at
every aligned level, and the teacher's agreement with the RASP evaluator), and `example_table` rows of
decoded vs true values token by token for one example.

How a variable is read off a decoder's output (scale-invariant: argmax, or a numerical dim over the
mapped `one` dim, snapped) lives in `inject.linear_decoding`, which training's probes use too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel
from tracr_injection.compile.tracr_pipeline import stable_names
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (  # also imported from here by readout, tests, analysis
    PROBE,
    AlignedBatch,
    DecodingError,
    LinearDecoder,
    accuracy_table,
    aligned_batches,
    decode_counts,
    decode_mapped,
    reference_dims,
    reference_scale,
    require_targets,
)
from tracr_injection.tasks import TeacherCannotRepresentError, get_task

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative ridge strengths, see `ridge_solution`
VALIDATION_FRACTION = 0.2
RASP_TOLERANCE = 1e-6  # numbers from the RASP evaluator vs the teacher's exact decode


def check_layer_map(layer_map: Sequence[int], num_levels: int) -> None:
    """Raise unless the layer map has one LM hidden state per teacher level."""
    if len(layer_map) != num_levels:
        raise DecodingError(
            f"The layer map {list(layer_map)} has {len(layer_map)} entries but the teacher has "
            f"{num_levels} levels; pass the run's layer mapping (one LM hidden-state index per level)."
        )


def check_decoder(decoder: LinearDecoder, config: TeacherConfig) -> None:
    """Raise unless the decoder maps into this teacher's residual at each of its levels."""
    if tuple(decoder.weight_LTD.shape[:2]) != (config.num_levels, config.d_model):
        raise DecodingError(
            f"The {decoder.kind} decodes {decoder.weight_LTD.shape[0]} levels of width "
            f"{decoder.weight_LTD.shape[1]}, but teacher {config.program_name!r} has {config.num_levels} "
            f"levels of width {config.d_model}; pass the map or probe made for this teacher."
        )


# ---------------------------------------------------------------------------------------- RASP check


def program_variables(program: Any) -> dict[str, Any]:
    """Every SOp of a RASP program under the name the compiled teacher gives its variable (`stable_names`).

    A name shared by several SOps falls back to tracr's label, whose process-wide counter differs between
    this rebuild and the compiled artifact: such variables find no expression here.
    """
    from tracr.compiler import nodes, rasp_to_graph

    graph = rasp_to_graph.extract_rasp_graph(program).graph
    return {name: graph.nodes[label][nodes.EXPR] for label, name in stable_names(graph).items()}


def same_value(a: Any, b: Any) -> bool:
    """Equal, numbers (not booleans) within `RASP_TOLERANCE`."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, abs_tol=RASP_TOLERANCE) if numbers else a == b


def rasp_agreement(
    teacher: TeacherModel, symbols: Sequence[Sequence[str]], finals_PT: Sequence[torch.Tensor]
) -> dict[str, float | None]:
    """Per variable, the fraction of positions where the teacher's value (decoded from `finals_PT`, one final
    residual [P, d_teacher] per example, no BOS) equals the RASP evaluator's on the same symbols.

    The program is rebuilt from the registry; a variable with no matching sub-expression gets None.
    """
    from tracr.rasp import causal_eval, rasp

    from tracr_injection.programs.registry import get_program

    config = teacher.config
    program = get_program(config.program_name).build(config.max_seq_len)
    expressions = program_variables(program)
    evaluate = causal_eval.evaluate if config.causal else rasp.evaluate
    agreement: dict[str, float | None] = {}
    for var in config.variables:
        if var.name not in expressions:
            agreement[var.name] = None
            continue
        checks = [
            same_value(ours, theirs)
            for tokens, final_PT in zip(symbols, finals_PT)
            for ours, theirs in zip(
                teacher.decode_variable(final_PT, var.name), evaluate(expressions[var.name], list(tokens))
            )
        ]
        agreement[var.name] = sum(checks) / len(checks) if checks else None
    return agreement


def split_rasp_agreement(data: TaskData, teacher: TeacherModel, count: int) -> dict[str, float | None]:
    """`rasp_agreement` on the first `count` examples of `data`, against its stored teacher targets."""
    indices = list(range(min(count, len(data))))
    if not indices:
        return {}
    final_BPT, _ = require_targets(data).batch(indices)
    examples = [data.bridged[i] for i in indices]
    finals = [final_BPT[row, : len(b)] for row, b in enumerate(examples)]
    return rasp_agreement(teacher, [b.teacher_symbols for b in examples], finals)


# -------------------------------------------------------------------------------------- split results


@dataclasses.dataclass
class DecodingResult:
    """Decoding accuracy on one split: `accuracy[variable][level]` and `positions[variable][level]` (None at
    levels before the variable is written), the teacher-vs-RASP agreement per variable, or why it was skipped.
    """

    split: str
    decoder: str
    num_examples: int = 0
    accuracy: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    positions: dict[str, list[int | None]] = dataclasses.field(default_factory=dict)
    rasp_agreement: dict[str, float | None] = dataclasses.field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def decode_split(
    model: Any,
    data: TaskData,
    split: str,
    layer_map: Sequence[int],
    decoder: LinearDecoder,
    teacher: TeacherModel,
    *,
    batch_size: int = 16,
    rasp_examples: int = 24,
) -> DecodingResult:
    """Decoding accuracy per variable and level on every example of `data`, plus the RASP check on a few."""
    check_layer_map(layer_map, teacher.config.num_levels)
    check_decoder(decoder, teacher.config)
    batches = aligned_batches(model, data, layer_map, list(range(len(data))), batch_size)
    hits, totals = decode_counts(batches, decoder, teacher)
    return DecodingResult(
        split=split,
        decoder=decoder.kind,
        num_examples=len(data),
        accuracy=accuracy_table(hits, totals),
        positions=totals,
        rasp_agreement=split_rasp_agreement(data, teacher, rasp_examples),
    )


def evaluate_decoding(
    model: Any,
    tokenizer: Any,
    tokenizer_name: str,
    teacher: TeacherModel,
    task_name: str,
    layer_map: Sequence[int],
    decoder: LinearDecoder,
    *,
    splits: Sequence[str] | None = None,
    max_examples: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    rasp_examples: int = 24,
) -> list[DecodingResult]:
    """`decode_split` on a seeded subset of every evaluation split (default: all but train) of a task.

    A split the teacher cannot represent (a symbol outside its vocabulary, examples longer than its
    max_seq_len) is returned with `skipped` saying why.
    """
    task = get_task(task_name)
    names = splits if splits is not None else [s.name for s in task.splits if s.kind != "train"]
    results = []
    for split in names:
        try:
            data = TaskData(
                task_name,
                split,
                tokenizer,
                tokenizer_name,
                teacher=teacher,
                max_examples=max_examples,
                seed=seed,
                progress=False,
            )
        except TeacherCannotRepresentError as err:
            results.append(DecodingResult(split=split, decoder=decoder.kind, skipped=str(err)))
            continue
        results.append(
            decode_split(
                model,
                data,
                split,
                layer_map,
                decoder,
                teacher,
                batch_size=batch_size,
                rasp_examples=rasp_examples,
            )
        )
    return results


def example_table(
    model: Any,
    data: TaskData,
    layer_map: Sequence[int],
    decoder: LinearDecoder,
    teacher: TeacherModel,
    index: int = 0,
    levels: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Token-by-token rows of example `index`: position, LM token, teacher symbol, and per variable the level
    read, the decoded and the true value (default level: the last aligned one).
    """
    config = teacher.config
    check_layer_map(layer_map, config.num_levels)
    check_decoder(decoder, config)
    chosen = {v.name: (levels or {}).get(v.name, config.num_levels - 1) for v in config.variables}
    for var in config.variables:
        if not var.level <= chosen[var.name] < config.num_levels:
            raise DecodingError(
                f"Variable {var.name!r} is written at level {var.level}; choose a level in "
                f"{var.level}..{config.num_levels - 1}, not {chosen[var.name]}."
            )
    (batch,) = aligned_batches(model, data, layer_map, [index])
    reference = reference_dims(config)
    columns = {}
    for var in config.variables:
        level = chosen[var.name]
        mapped_NT = decoder(level, batch.hidden_LND[level])
        decoded = decode_mapped(mapped_NT, reference_scale(mapped_NT, reference), var)
        columns[var.name] = (level, decoded, teacher.decode_variable(batch.targets_LNT[level], var.name))
    example = data.bridged[index]
    return [
        {
            "position": p,
            "token": example.tokens[p],
            "symbol": example.teacher_symbols[p],
            "values": {
                name: {"level": level, "decoded": decoded[p], "true": truth[p]}
                for name, (level, decoded, truth) in columns.items()
            },
        }
        for p in range(len(example))
    ]


# -------------------------------------------------------------------------------------------- probe


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
    model: Any,
    data: TaskData,
    layer_map: Sequence[int],
    *,
    batch_size: int = 16,
    validation_fraction: float = VALIDATION_FRACTION,
    grid: Sequence[float] = RIDGE_GRID,
) -> LinearDecoder:
    """Ridge probes (hidden state -> teacher residual, every dim, one per level) fitted on `data`.

    The last `validation_fraction` of `data`'s examples choose the ridge strength from `grid` by squared
    error; the probe is then refitted on all of them.  Fit it on examples disjoint from the evaluated ones
    (`fit_task_probe` uses the train split, which no evaluation split overlaps).
    """
    check_layer_map(layer_map, require_targets(data).manifest.num_levels)
    num_val = max(1, round(validation_fraction * len(data)))
    order = list(range(len(data)))
    fit_part, val_part = order[:-num_val], order[-num_val:]
    return fit_ridge(
        aligned_batches(model, data, layer_map, fit_part, batch_size),
        aligned_batches(model, data, layer_map, val_part, batch_size),
        grid,
    )


def fit_task_probe(
    model: Any,
    tokenizer: Any,
    tokenizer_name: str,
    teacher: TeacherModel,
    task_name: str,
    layer_map: Sequence[int],
    *,
    num_examples: int = 512,
    seed: int = 0,
    batch_size: int = 16,
) -> LinearDecoder:
    """`fit_probe` on a seeded subset of the task's train split (disjoint from every evaluation split)."""
    train = get_task(task_name).train_split.name
    data = TaskData(
        task_name,
        train,
        tokenizer,
        tokenizer_name,
        teacher=teacher,
        max_examples=num_examples,
        seed=seed,
        progress=False,
    )
    return fit_probe(model, data, layer_map, batch_size=batch_size)
