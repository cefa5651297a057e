"""Answer readout: does the LM say what its output subspace holds, on every split?

In: an LM, a split's `TaskData` (no teacher targets needed: the bridge's `expected` outputs are the
truth, so LM-only splits work too), the hidden-state index of the last aligned level, linear decoders
(an injected run's map, a post-hoc probe) and the teacher's config.  Out: per decoder a
`ReadoutResult`: at every position where an answer symbol is due, how often the output variable
decoded there is right, how often the LM's next-token argmax is right, how often the two agree, and,
where the subspace is wrong, whether the LM follows the subspace or the truth.

Why: decoding over all positions and in-distribution causal tests do not say why an out-of-distribution
answer is wrong.  If the LM follows the subspace where the subspace is wrong, the error is made by the
injected computation up to block L; if the subspace is right and the LM still errs, the later layers
are not reading the answer from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from tracr_injection.compile.teacher import TeacherConfig
from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate.decoding import LinearDecoder, decode_mapped, reference_dims, reference_scale
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import inference, logits_at


class ReadoutError(TracrInjectionError, ValueError):
    """The split's answers cannot be matched to LM tokens one to one."""


@dataclasses.dataclass
class ReadoutResult:
    """Answer-position rates of one decoder on one split (None where nothing was compared)."""

    split: str
    decoder: str
    positions: int
    subspace_accuracy: float | None
    lm_accuracy: float | None
    lm_agrees_with_subspace: float | None
    subspace_wrong: int
    lm_follows_subspace_when_wrong: float | None
    lm_right_when_subspace_wrong: float | None
    lm_wrong_when_subspace_right: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


def symbol_tokens(*splits: TaskData) -> dict[str, int]:
    """Answer symbol -> the LM token id that carries it, read off the labels of these splits (pass the
    in-distribution split too: an OOD split may have one answer only, e.g. Dyck's almost_balanced)."""
    mapping: dict[str, int] = {}
    for example in (e for data in splits for e in data.bridged):
        for p, symbol in enumerate(example.expected):
            if symbol is None:
                continue
            token = example.labels[p + 1]
            if mapping.setdefault(symbol, token) != token:
                raise ReadoutError(
                    f"Answer symbol {symbol!r} is carried by two LM tokens ({mapping[symbol]} and {token}); "
                    "the readout needs one token per symbol."
                )
    return mapping


def rate(hits: int, total: int) -> float | None:
    """hits / total, None when nothing was compared."""
    return hits / total if total else None


@dataclasses.dataclass
class ReadoutStates:
    """At every answer-symbol position: the hidden state [N, d_lm], the LM's next-token argmax [N] and the
    expected symbol."""

    hidden_ND: torch.Tensor
    predicted_N: torch.Tensor
    expected: list[str]


def logits_and_hidden_states(
    model: Any, batch: Mapping[str, torch.Tensor], rows_N: torch.Tensor, cols_N: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """`logits_at` the positions (rows_N[i], cols_N[i]) of a collated batch (moved to the model's device),
    with the model's output holding every hidden state."""
    device = next(model.parameters()).device
    return logits_at(
        model,
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        rows_N,
        cols_N,
        output_hidden_states=True,
    )


def readout_states(model: Any, data: TaskData, hidden_index: int, batch_size: int = 16) -> ReadoutStates:
    """The `ReadoutStates` of every example of `data` (the evaluation reads them off `split_pass` instead)."""
    hidden, predicted, expected = [], [], []
    with inference(model):
        for start in range(0, len(data), batch_size):
            positions = list(range(start, min(start + batch_size, len(data))))
            batch = data.collate(positions)
            rows, cols = zip(
                *[
                    (i, p)
                    for i, k in enumerate(positions)
                    for p, s in enumerate(data.bridged[k].expected)
                    if s
                ]
            )
            rows_N, cols_N = torch.tensor(rows), torch.tensor(cols)
            logits_NV, output = logits_and_hidden_states(model, batch, rows_N, cols_N)
            hidden.append(output.hidden_states[hidden_index][rows_N, cols_N].float().cpu())
            predicted.append(logits_NV.argmax(-1).cpu())
            expected += [data.bridged[positions[i]].expected[p] for i, p in zip(rows, cols)]
    return ReadoutStates(torch.cat(hidden), torch.cat(predicted), expected)


def answer_readout(
    model: Any,
    data: TaskData,
    split: str,
    hidden_index: int,
    decoders: Mapping[str, LinearDecoder],
    config: TeacherConfig,
    tokens: Mapping[str, int],
) -> dict[str, ReadoutResult]:
    """Per decoder, the readout rates of the output variable decoded at the last aligned level.

    `tokens` maps every answer symbol to its LM token (`symbol_tokens` of all evaluated splits)."""
    return readout_rates(readout_states(model, data, hidden_index), split, decoders, config, tokens)


def readout_rates(
    states: ReadoutStates,
    split: str,
    decoders: Mapping[str, LinearDecoder],
    config: TeacherConfig,
    tokens: Mapping[str, int],
) -> dict[str, ReadoutResult]:
    """Per decoder, the readout rates of `states` (hidden states of the last aligned level)."""
    hidden_ND, predicted_N, expected = states.hidden_ND, states.predicted_N, states.expected
    var = config.variable(config.output_variable)
    level = config.num_levels - 1
    lm_right = [int(p) == tokens[e] for p, e in zip(predicted_N.tolist(), expected)]
    results = {}
    for kind, decoder in decoders.items():
        mapped_NT = decoder(level, hidden_ND)
        decoded = decode_mapped(mapped_NT, reference_scale(mapped_NT, reference_dims(config)), var)
        sub_right = [str(d) == e for d, e in zip(decoded, expected)]
        agrees = [tokens.get(str(d)) == int(p) for d, p in zip(decoded, predicted_N.tolist())]
        wrong = [i for i, ok in enumerate(sub_right) if not ok]
        right = [i for i, ok in enumerate(sub_right) if ok]
        results[kind] = ReadoutResult(
            split=split,
            decoder=kind,
            positions=len(expected),
            subspace_accuracy=rate(sum(sub_right), len(expected)),
            lm_accuracy=rate(sum(lm_right), len(expected)),
            lm_agrees_with_subspace=rate(sum(agrees), len(expected)),
            subspace_wrong=len(wrong),
            lm_follows_subspace_when_wrong=rate(sum(agrees[i] for i in wrong), len(wrong)),
            lm_right_when_subspace_wrong=rate(sum(lm_right[i] for i in wrong), len(wrong)),
            lm_wrong_when_subspace_right=rate(sum(not lm_right[i] for i in right), len(right)),
        )
    return results
