"""Teacher targets, computed once: the frozen teacher's residual streams for bridged examples.

In: bridged examples of one split and the compiled teacher.  Out: a folder of safetensors
shards plus `targets.json`, loaded by `TeacherTargets` in the training loop, so the
injection step never runs the teacher.

Storage: tracr never overwrites a residual dim (each is written once, by the embedding or
one block), so the residual after block i is the final residual with the dims first written
after level i zeroed; only the final residual is stored (checked on every batch).  It is
one-hot codes, counts' 1/(k+1) attention outputs and a few scalars, so it is stored sparse:
per (example, position) row, the non-zero dims (int16) and their values (float16 when that
is exact to 1e-3 relative, else float32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tracr_injection.compile.convert import first_write_levels
from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.errors import ArtifactError, TracrInjectionError
from tracr_injection.paths import targets_dir
from tracr_injection.tasks.bridge import BridgedExample

MANIFEST_NAME = "targets.json"
FORMAT_VERSION = 1
ZERO_THRESHOLD = 1e-6  # smaller magnitudes (softmax leakage) are stored as exact zeros
FLOAT16_TOLERANCE = 1e-3  # relative error allowed for float16 storage
LEVEL_TOLERANCE = 1e-5  # residual after block i vs final residual masked to dims written by then


@dataclasses.dataclass
class TargetsManifest:
    """What a targets folder holds and how it was made."""

    task: str
    split: str
    tokenizer: str
    teacher_program_hash: str
    teacher_max_seq_len: int
    d_model: int
    num_levels: int
    dim_levels: list[int]
    num_examples: int
    shard_size: int
    value_dtype: str
    lengths: list[int]
    bridge_digest: str
    max_float16_error: float = 0.0
    max_dropped_value: float = 0.0
    max_level_error: float = 0.0
    answer_accuracy: float = 0.0  # the teacher's own, over the split (`teacher_answer_counts`)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    format_version: int = FORMAT_VERSION

    def shard_path(self, folder: Path, index: int) -> Path:
        """File of shard `index`."""
        return folder / f"shard-{index:05d}.safetensors"

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return -(-self.num_examples // self.shard_size)


def bridge_digest(bridged: Sequence[BridgedExample]) -> str:
    """Hash of the teacher inputs, so stored targets are never paired with other examples."""
    digest = hashlib.sha256()
    for b in bridged:
        digest.update("\x1f".join(b.teacher_symbols).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


def sparse_rows(
    final_BPD: torch.Tensor, mask_BP: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero entries of the real rows: (nnz per row [R], dims [nnz], values [nnz])."""
    rows_RD = final_BPD[mask_BP]
    keep_RD = rows_RD.abs() >= ZERO_THRESHOLD
    return keep_RD.sum(1), torch.nonzero(keep_RD)[:, 1].to(torch.int16), rows_RD[keep_RD]


def check_levels(residuals: list[torch.Tensor], dim_levels_D: torch.Tensor) -> float:
    """Largest gap between each level's residual and the final one masked to the dims written by then."""
    final = residuals[-1]
    return max(
        (res - final * (dim_levels_D <= level)).abs().max().item() for level, res in enumerate(residuals)
    )


def teacher_answer_counts(
    teacher: TeacherModel, final_BPD: torch.Tensor, batch: Sequence[BridgedExample]
) -> tuple[int, int]:
    """(correct, total) of the teacher's output variable against the bridge's expected outputs."""
    decoded = teacher.decode_variable(final_BPD, teacher.config.output_variable)
    checked = [
        decoded[row][pos] == want
        for row, b in enumerate(batch)
        for pos, want in enumerate(b.expected)
        if want is not None
    ]
    return sum(checked), len(checked)


def precompute_targets(
    teacher: TeacherModel,
    bridged: Sequence[BridgedExample],
    folder: str | Path,
    *,
    task: str,
    split: str,
    tokenizer: str,
    batch_size: int = 256,
    shard_size: int = 8192,
    progress: bool = True,
) -> TargetsManifest:
    """Run the teacher over `bridged` once and store its residuals; resumes from finished shards.

    The caller must only pass splits the teacher can represent (see `bridge.teacher_inputs`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dim_levels = first_write_levels(teacher)
    manifest = TargetsManifest(
        task=task,
        split=split,
        tokenizer=tokenizer,
        teacher_program_hash=teacher.config.program_hash,
        teacher_max_seq_len=teacher.config.max_seq_len,
        d_model=teacher.config.d_model,
        num_levels=teacher.config.num_levels,
        dim_levels=dim_levels,
        num_examples=len(bridged),
        shard_size=shard_size,
        value_dtype="float16",
        lengths=[len(b) for b in bridged],
        bridge_digest=bridge_digest(bridged),
    )
    start = time.perf_counter()
    levels_D = torch.tensor(dim_levels)
    stats: list[dict[str, float]] = []
    bar = tqdm(total=len(bridged), desc=f"teacher targets {task}/{split}", disable=not progress, unit="ex")
    for shard in range(manifest.num_shards):
        lo, hi = shard * shard_size, min(len(bridged), (shard + 1) * shard_size)
        path = manifest.shard_path(folder, shard)
        done = finished_shard_stats(path, manifest.lengths[lo:hi], manifest.bridge_digest)
        if done is None:
            done = compute_shard(
                teacher, bridged[lo:hi], levels_D, batch_size, path, bar, manifest.bridge_digest
            )
        else:
            bar.update(hi - lo)
        stats.append(done)
    bar.close()
    total = sum(s["total"] for s in stats)
    manifest.answer_accuracy = sum(s["correct"] for s in stats) / total if total else 1.0
    for key in ("max_float16_error", "max_dropped_value", "max_level_error"):
        setattr(manifest, key, max(s[key] for s in stats))
    manifest.value_dtype = "float32" if any(s["float32"] for s in stats) else "float16"
    manifest.seconds = time.perf_counter() - start
    manifest.bytes_on_disk = sum(
        manifest.shard_path(folder, i).stat().st_size for i in range(manifest.num_shards)
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(dataclasses.asdict(manifest)))
    return manifest


def compute_shard(
    teacher: TeacherModel,
    bridged: Sequence[BridgedExample],
    levels_D: torch.Tensor,
    batch_size: int,
    path: Path,
    bar: Any,
    digest: str,
) -> dict[str, float]:
    """Run the teacher over one shard's examples, check them, write the shard; returns its stats."""
    stats = {"correct": 0, "total": 0, "max_level_error": 0.0, "max_dropped_value": 0.0}
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for b0 in range(0, len(bridged), batch_size):
        batch = bridged[b0 : b0 + batch_size]
        output, mask = teacher.run([b.teacher_symbols for b in batch])
        residuals = [r[:, 1:] for r in output.residuals]  # drop the teacher's BOS
        final, real = residuals[-1], mask[:, 1:]
        stats["max_level_error"] = max(stats["max_level_error"], check_levels(residuals, levels_D))
        if stats["max_level_error"] > LEVEL_TOLERANCE:
            raise TracrInjectionError(
                f"The teacher overwrites residual dims (gap {stats['max_level_error']:.2e}); the "
                "final-residual storage cannot represent its levels."
            )
        correct, total = teacher_answer_counts(teacher, final, batch)
        stats["correct"] += correct
        stats["total"] += total
        small = final[real].abs()
        small = small[small < ZERO_THRESHOLD]
        stats["max_dropped_value"] = max(
            stats["max_dropped_value"], small.max().item() if small.numel() else 0.0
        )
        pieces.append(sparse_rows(final, real))
        bar.update(len(batch))
    nnz, dims, values = (torch.cat([p[i] for p in pieces]) for i in range(3))
    half = values.to(torch.float16)
    error = (
        ((half.float() - values).abs() / values.abs().clamp(min=1.0)).max().item() if values.numel() else 0.0
    )
    stats["max_float16_error"] = error
    stats["float32"] = float(error > FLOAT16_TOLERANCE)
    stored = values if stats["float32"] else half
    tmp = path.with_suffix(".tmp")
    metadata = {key: repr(value) for key, value in stats.items()} | {"bridge_digest": digest}
    save_file(
        {"row_nnz": nnz.to(torch.int32), "dims": dims, "values": stored.contiguous()}, str(tmp), metadata
    )
    tmp.replace(path)
    return stats


def finished_shard_stats(path: Path, lengths: list[int], digest: str) -> dict[str, float] | None:
    """The stats of an existing, readable shard of this very split holding these rows (else None)."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            if metadata.pop("bridge_digest") != digest or f.get_slice("row_nnz").get_shape()[0] != sum(
                lengths
            ):
                return None
            return {key: float(value) for key, value in metadata.items()}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError):
        return None


class TeacherTargets:
    """Stored teacher residuals of one split, served as dense batches for training.

    `batch(indices)` returns the final residual [B, P, d_teacher] (zero at padding) and the
    real-position mask; `at_level(final, i)` gives the residual after block i.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(
                f"{folder} has no {MANIFEST_NAME}; run the targets precompute for this split."
            )
        try:
            self.manifest = TargetsManifest(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ArtifactError(f"Corrupt targets manifest {path}: {err}") from err
        if self.manifest.format_version != FORMAT_VERSION:
            raise ArtifactError(
                f"Targets in {folder} have format {self.manifest.format_version}; recompute them."
            )
        shards = [self._load_shard(folder, i) for i in range(self.manifest.num_shards)]
        self.row_nnz = torch.cat([s["row_nnz"] for s in shards]).long()
        self.dims = torch.cat([s["dims"] for s in shards]).long()
        self.values = torch.cat([s["values"] for s in shards]).float()
        lengths = torch.tensor(self.manifest.lengths)
        if self.row_nnz.numel() != int(lengths.sum()):
            raise ArtifactError(
                f"Targets in {folder} hold {self.row_nnz.numel()} rows, the manifest {int(lengths.sum())}."
            )
        self.lengths = lengths
        self.row_start = torch.cumsum(lengths, 0) - lengths
        nnz_start = torch.cumsum(self.row_nnz, 0) - self.row_nnz
        self.nnz_start = torch.cat([nnz_start, nnz_start.new_tensor([self.values.numel()])])
        self.dim_levels = torch.tensor(self.manifest.dim_levels)

    def _load_shard(self, folder: Path, index: int) -> dict[str, torch.Tensor]:
        path = self.manifest.shard_path(folder, index)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(
                f"Targets shard {path} is missing or corrupt ({err}); recompute the targets."
            ) from err

    def __len__(self) -> int:
        return self.manifest.num_examples

    def check_matches(self, bridged: Sequence[BridgedExample]) -> None:
        """Raise unless these targets were computed from exactly these bridged examples."""
        if bridge_digest(bridged) != self.manifest.bridge_digest:
            raise ArtifactError(
                f"Stored targets of {self.manifest.task}/{self.manifest.split} were computed for other "
                "teacher inputs (different data, tokenizer or bridge); recompute them."
            )

    def batch(self, indices: Sequence[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense final residuals [B, P, D] and mask [B, P] for examples `indices` (right-padded to `width`)."""
        index = torch.as_tensor(list(indices))
        lengths = self.lengths[index]
        width = int(lengths.max()) if width is None else width
        rows = concat_ranges(self.row_start[index], lengths)
        counts = self.row_nnz[rows]
        entries = concat_ranges(self.nnz_start[rows], counts)
        batch_of_row = torch.repeat_interleave(torch.arange(len(index)), lengths)
        pos_of_row = concat_ranges(torch.zeros_like(lengths), lengths)
        final = torch.zeros(len(index), width, self.manifest.d_model)
        final[
            torch.repeat_interleave(batch_of_row, counts),
            torch.repeat_interleave(pos_of_row, counts),
            self.dims[entries],
        ] = self.values[entries]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return final, mask

    def at_level(self, final_BPD: torch.Tensor, level: int) -> torch.Tensor:
        """The residual after block `level` (0: embeddings) from the final residual."""
        return final_BPD * (self.dim_levels.to(final_BPD.device) <= level)


def concat_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`cat([arange(s, s + c) for s, c in zip(starts, counts)])`, vectorised."""
    offsets = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(offsets, counts)
    return torch.repeat_interleave(starts, counts) + within


def targets_folder(
    task: str, split: str, tokenizer: str, teacher: TeacherModel, root: str | Path | None = None
) -> Path:
    """Where the targets of (task, split, tokenizer, teacher) live: `$TRACR_INJECTION_CACHE/targets/...`."""
    base = Path(root) if root is not None else targets_dir()
    safe_tokenizer = hashlib.sha256(tokenizer.encode()).hexdigest()[:8]
    name = f"{task}-{Path(tokenizer).name}-{safe_tokenizer}-{teacher.config.program_hash[:12]}"
    return base / name / split


def ensure_targets(
    teacher: TeacherModel,
    bridged: Sequence[BridgedExample],
    *,
    task: str,
    split: str,
    tokenizer: str,
    root: str | Path | None = None,
    **kwargs: Any,
) -> TeacherTargets:
    """The stored targets for these bridged examples, computing (or finishing) them first if needed."""
    folder = targets_folder(task, split, tokenizer, teacher, root)
    try:
        targets = TeacherTargets(folder)
        targets.check_matches(bridged)
        return targets
    except ArtifactError:
        precompute_targets(teacher, bridged, folder, task=task, split=split, tokenizer=tokenizer, **kwargs)
        return TeacherTargets(folder)
