"""Decoding the program's variables from the LM's hidden states (the interpretable-subspace test).

In: a `Subject` (the LM, its tokenizer, the teacher, the task and the layer mapping: teacher level i <->
LM `hidden_states[layer_map[i]]`), a split's `TaskData` built with the teacher, and a `LinearDecoder`: an
injected run's `AlignmentMap` (one map shared by every level) or a ridge probe fitted post hoc on
held-out examples (one map per level, the fair baseline; `evaluate.probe` fits it).  Out: per split a
`DecodingResult` (accuracy and position count of every teacher variable at every aligned level, and
the teacher's agreement with the RASP evaluator), and `example_table` rows of decoded vs true values
token by token for one example.

How a variable is read off a decoder's output (scale-invariant: argmax, or a numerical dim over the
mapped `one` dim, snapped) lives in `inject.linear_decoding`, which training's probes use too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tracr_injection.compile.teacher import TeacherConfig, TeacherModel
from tracr_injection.compile.tracr_pipeline import stable_names
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.linear_decoding import (  # also imported from here by readout, tests, analysis
    Counts,
    DecodingError,
    LinearDecoder,
    accuracy_table,
    aligned_batches,
    balanced_table,
    decode_counts,
    decode_mapped,
    majority_table,
    position_table,
    reference_dims,
    reference_scale,
    require_targets,
    value_table,
)
from tracr_injection.tasks import TeacherCannotRepresentError

if TYPE_CHECKING:
    from tracr_injection.evaluate.subject import Subject

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
    """Decoding on one split, per `[variable][level]` (None at levels before the variable is written): the
    accuracy, the positions compared, the most common true value's share (`majority`, what a decoder that
    knows nothing else scores), the balanced accuracy (mean over true values of the share decoded right) and,
    for the ordinal variables (counts, differences), the accuracy of reading their block as a number
    (`as_number`: the decoder may hold a count linearly as a magnitude that no argmax reads);
    `by_value`: per variable at its written level, [decoded right, positions] per true value;
    the teacher-vs-RASP agreement per variable, or why it was skipped.
    """

    split: str
    decoder: str
    num_examples: int = 0
    accuracy: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    positions: dict[str, list[int | None]] = dataclasses.field(default_factory=dict)
    majority: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    balanced: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    as_number: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    by_value: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    rasp_agreement: dict[str, float | None] = dataclasses.field(default_factory=dict)
    skipped: str | None = None

    @classmethod
    def from_counts(
        cls, split: str, decoder: str, num_examples: int, counts: Counts, config: TeacherConfig,
        rasp_agreement: dict[str, float | None],
    ) -> DecodingResult:
        """The result of `decode_counts`'s counts on `num_examples` examples of `split`."""
        hits, totals, number_hits = counts
        return cls(
            split=split, decoder=decoder, num_examples=num_examples, accuracy=accuracy_table(hits, totals),
            positions=position_table(totals), majority=majority_table(totals),
            balanced=balanced_table(hits, totals),
            as_number=accuracy_table(number_hits, totals),
            by_value=value_table(hits, totals, config),
            rasp_agreement=rasp_agreement,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def written_level(positions: list[int | None]) -> int:
    """The level a variable is written at: the first whose decoding compared positions (None before it)."""
    return next(i for i, count in enumerate(positions) if count is not None)


def written_value(result: dict[str, Any], table: str, name: str, level: int) -> float | None:
    """One split result's `table` entry of a variable at a level (None where an older evaluation lacks it)."""
    return result.get(table, {}).get(name, [None] * (level + 1))[level]


def decode_split(
    subject: Subject,
    data: TaskData,
    split: str,
    decoder: LinearDecoder,
    *,
    batch_size: int = 16,
    rasp_examples: int = 24,
) -> DecodingResult:
    """Decoding accuracy per variable and level on every example of `data`, plus the RASP check on a few."""
    teacher = subject.teacher
    check_layer_map(subject.layer_map, teacher.config.num_levels)
    check_decoder(decoder, teacher.config)
    batches = aligned_batches(subject.model, data, subject.layer_map, list(range(len(data))), batch_size)
    counts = decode_counts(batches, decoder, teacher)
    agreement = split_rasp_agreement(data, teacher, rasp_examples)
    return DecodingResult.from_counts(split, decoder.kind, len(data), counts, teacher.config, agreement)


def evaluate_decoding(
    subject: Subject,
    decoder: LinearDecoder,
    *,
    splits: Sequence[str] | None = None,
    max_examples: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    rasp_examples: int = 24,
) -> list[DecodingResult]:
    """`decode_split` on a seeded subset of every evaluation split (default: all but train) of the task.

    A split the teacher cannot represent (a symbol outside its vocabulary, examples longer than its
    max_seq_len) is returned with `skipped` saying why.
    """
    names = splits if splits is not None else [s.name for s in subject.task_spec.splits if s.kind != "train"]
    results = []
    for split in names:
        try:
            data = subject.task_data(split, max_examples, seed, with_targets=True)
        except TeacherCannotRepresentError as err:
            results.append(DecodingResult(split=split, decoder=decoder.kind, skipped=str(err)))
            continue
        results.append(
            decode_split(subject, data, split, decoder, batch_size=batch_size, rasp_examples=rasp_examples)
        )
    return results


def example_table(
    subject: Subject,
    data: TaskData,
    decoder: LinearDecoder,
    index: int = 0,
    levels: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Token-by-token rows of example `index`: position, LM token, teacher symbol, and per variable the level
    read, the decoded and the true value (default level: the last aligned one).
    """
    teacher, config = subject.teacher, subject.teacher.config
    check_layer_map(subject.layer_map, config.num_levels)
    check_decoder(decoder, config)
    chosen = {v.name: (levels or {}).get(v.name, config.num_levels - 1) for v in config.variables}
    for var in config.variables:
        if not var.level <= chosen[var.name] < config.num_levels:
            raise DecodingError(
                f"Variable {var.name!r} is written at level {var.level}; choose a level in "
                f"{var.level}..{config.num_levels - 1}, not {chosen[var.name]}."
            )
    (batch,) = aligned_batches(subject.model, data, subject.layer_map, [index])
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
