"""What the analyses share.

In: a trained run folder, or a run's `Subject`, decoder and an `AlignedBatch`.  Out: the run's subject and
decoder (an inject run's map, else its evaluation's probe), a batch's last aligned level mapped into the
teacher's space with its reference scale and truth, and ten-wide count buckets.
"""

from __future__ import annotations

from typing import Any

import torch

from tracr_injection.evaluate.pipeline import PROBE_FILE, map_decoder
from tracr_injection.evaluate.subject import load_subject
from tracr_injection.inject.linear_decoding import AlignedBatch, LinearDecoder, reference_dims, reference_scale
from tracr_injection.inject.run import RunFolder


def bucket(count: int) -> str:
    """Ten-wide buckets of counts, 40 and more together."""
    return "40+" if count >= 40 else f"{count // 10 * 10}-{count // 10 * 10 + 9}"


def bucket_order(name: str) -> int:
    """Sort key of a `bucket` name."""
    return int(name.split("-")[0].rstrip("+"))


def load_run(run: str) -> tuple[Any, LinearDecoder]:
    """A trained run (one thread) and its decoder: an inject run's map, else the evaluation's probe."""
    torch.set_num_threads(1)
    subject = load_subject(run)
    if subject.amap is not None:
        return subject, map_decoder(subject)
    return subject, LinearDecoder.load(RunFolder(run).eval_dir / PROBE_FILE)


def last_level_mapped(subject: Any, decoder: LinearDecoder, batch: AlignedBatch) -> tuple[torch.Tensor, ...]:
    """At the last aligned level: the hidden states mapped into the teacher's space [N, T], their
    reference scale [N] (see `reference_scale`) and the teacher's true residual [N, T]."""
    level = subject.teacher.config.num_levels - 1
    mapped_NT = decoder(level, batch.hidden_LND[level])
    return (
        mapped_NT,
        reference_scale(mapped_NT, reference_dims(subject.teacher.config)),
        batch.targets_LNT[level],
    )
