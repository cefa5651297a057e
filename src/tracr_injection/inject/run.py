"""A training run's folder: the one place that knows its layout, its typed manifest, and a finished run's parts.

In: a folder (what `tracr-inject train --out` names) and, to save a finished run, the trained LM with its
tokenizer, the alignment map (inject runs), the teacher and a `Manifest`.  Out: `RunFolder`, which names every
file of the folder (`model/`, `map/`, `teacher/`, `manifest.json`, `metrics.jsonl` and the probe and accuracy
curves, `checkpoints/step-N/` with `trainer_state.json`, `eval/` with `metrics.json`, the reproduce record and
lock), finds its checkpoints and evaluation and publishes it without weights; `Manifest`, what a finished run
records, typed (manifests of older versions load: keys they lack are None); `Run`, a finished run's parts, with
`save_pretrained` and `from_pretrained` as in Hugging Face (and as `compile.teacher.TeacherModel`).  The files
and JSON keys are the ones earlier versions wrote, so old run folders, published results and resumes still work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracr_injection.compile.teacher import CONFIG_NAME, WEIGHTS_NAME, TeacherModel
from tracr_injection.errors import ArtifactError
from tracr_injection.hub import model_fingerprint, model_folder
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.lm import load_causal_lm

MANIFEST_NAME = "manifest.json"
MODEL_DIR = "model"
MAP_DIR = "map"
TEACHER_DIR = "teacher"
METRICS_NAME = "metrics.jsonl"
PROBE_PLOT = "probes.png"
ACCURACY_PLOT = "accuracy_curves.png"  # also the name of the curves over seeds (`experiments.ood`)
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.json"
EVAL_DIR = "eval"
EVALUATION_NAME = "metrics.json"  # in any evaluation folder: a run's eval/, a published run, `eval --out`
RECORD_NAME = "reproduce.json"
LOCK_NAME = ".reproduce.lock"
HF_CONFIG = "config.json"  # what a saved Hugging Face model folder always holds
ACCURACY_FIELDS = ("accuracy_before", "accuracy_after")  # written as f"{eval_split}_{field}"


class RunFolderError(ArtifactError):
    """A run folder that cannot be evaluated (unfinished, incomplete or corrupt)."""


@dataclasses.dataclass(frozen=True)
class BaseModelRecord:
    """The base model as typed, its absolute folder and its fingerprint: what `eval` needs to find the model a
    run started from from any directory, and to tell whether the one it found is the same."""

    name: str
    path: str | None = None
    fingerprint: str | None = None

    @classmethod
    def of(cls, name: str) -> BaseModelRecord:
        """The record of the model `name` resolves to on this machine."""
        folder = model_folder(name)
        return cls(str(name), str(folder), model_fingerprint(folder))


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """What a finished run records (`manifest.json`), in the order it is written.

    `eval_split` is not a key of its own: the accuracies before and after training on it are written as
    `{eval_split}_accuracy_before` and `{eval_split}_accuracy_after`.  Fields that older versions did not write
    are None (and left out when written back, except `roll_block`, which a baseline writes as null).
    """

    task: str
    method: str
    model: str  # the base model as typed (it also keys the cached teacher targets)
    base_model: BaseModelRecord | None = None
    teacher_program: str | None = None
    teacher_program_hash: str | None = None
    layer_mapping: list[int]
    roll_block: int | None = None
    config: TrainConfig | None = None
    seed: int | None = None
    versions: dict[str, str] | None = None
    num_processes: int | None = None
    distributed: str | None = None
    eval_split: str | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_examples: int | None = None
    alignment_variable_scales: dict[str, float] | None = None
    map_init_fit: float | None = None  # 1 - cos of the least-squares map on the rows it was fitted on

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready manifest, with the keys and key order `manifest.json` has always had."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "eval_split" or (value is None and field.name != "roll_block"):
                continue
            key = f"{self.eval_split}_{field.name}" if field.name in ACCURACY_FIELDS else field.name
            if isinstance(value, TrainConfig):
                value = value.to_dict()
            elif isinstance(value, BaseModelRecord):
                value = dataclasses.asdict(value)
            values[key] = value
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Manifest:
        """The manifest `to_dict` (or an older version) wrote; keys it does not know are ignored."""
        names = {field.name for field in dataclasses.fields(cls)} - {"eval_split", *ACCURACY_FIELDS}
        known = {key: value for key, value in values.items() if key in names}
        suffix = f"_{ACCURACY_FIELDS[0]}"
        split = next((key.removesuffix(suffix) for key in values if key.endswith(suffix)), None)
        if split is not None:
            known["eval_split"] = split
            known.update({field: values.get(f"{split}_{field}") for field in ACCURACY_FIELDS})
        if known.get("config") is not None:
            known["config"] = TrainConfig.from_record(known["config"])
        if known.get("base_model") is not None:
            known["base_model"] = BaseModelRecord(**known["base_model"])
        return cls(**known)

    @property
    def base_model_record(self) -> BaseModelRecord:
        """The recorded base model; for runs from before the record, the name as typed."""
        return self.base_model or BaseModelRecord(str(self.model))


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """Where each part of a run lives: the only code that knows the run folder's file and folder names.

    A published run (`experiments.reproduce.publish_run`, under results/) is a run folder without weights
    whose evaluation sits at its top instead of in `eval/`.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def manifest_file(self) -> Path:
        """`manifest.json`: written last, so its presence means the run finished."""
        return self.path / MANIFEST_NAME

    @property
    def model_dir(self) -> Path:
        """The trained LM and its tokenizer, a standard `save_pretrained` folder."""
        return self.path / MODEL_DIR

    @property
    def map_dir(self) -> Path:
        """The alignment map (inject runs)."""
        return self.path / MAP_DIR

    @property
    def teacher_dir(self) -> Path:
        """The teacher's copy, so the run is evaluated anywhere without the teacher cache."""
        return self.path / TEACHER_DIR

    @property
    def metrics_file(self) -> Path:
        """`metrics.jsonl`: one line per training step and the probe lines (`inject.probing`)."""
        return self.path / METRICS_NAME

    @property
    def probe_plot(self) -> Path:
        """The injection-strength probes over training."""
        return self.path / PROBE_PLOT

    @property
    def accuracy_plot(self) -> Path:
        """The task accuracy over training."""
        return self.path / ACCURACY_PLOT

    @property
    def checkpoints_dir(self) -> Path:
        """Where `checkpoints` live while the run trains."""
        return self.path / CHECKPOINTS_DIR

    @property
    def eval_dir(self) -> Path:
        """`tracr-inject eval`'s output for this run."""
        return self.path / EVAL_DIR

    @property
    def evaluation_file(self) -> Path:
        """The run's evaluation metrics in `eval/`."""
        return self.eval_dir / EVALUATION_NAME

    @property
    def record_file(self) -> Path:
        """`reproduce`'s record of the run (commands, state, wall times)."""
        return self.path / RECORD_NAME

    @property
    def lock_file(self) -> Path:
        """`reproduce`'s claim on the run (`host:pid`)."""
        return self.path / LOCK_NAME

    @property
    def small_files(self) -> tuple[Path, ...]:
        """What `publish` copies besides the evaluation: manifest, record, training metrics and curves."""
        return self.manifest_file, self.record_file, self.metrics_file, self.probe_plot, self.accuracy_plot

    @property
    def is_finished(self) -> bool:
        """Whether training finished (the manifest is written last)."""
        return self.manifest_file.is_file()

    def checkpoint_dir(self, step: int) -> Path:
        """The folder of the checkpoint after `step` updates."""
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"

    @staticmethod
    def state_file(checkpoint: Path) -> Path:
        """A checkpoint's trainer state (step and config), written last."""
        return checkpoint / STATE_NAME

    @staticmethod
    def checkpoint_step(checkpoint: Path) -> int:
        """The step a checkpoint folder was written after."""
        return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints (their state file is written last), oldest first."""
        root = self.checkpoints_dir
        found = root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []
        return sorted((d for d in found if self.state_file(d).is_file()), key=self.checkpoint_step)

    def last_checkpoint_step(self) -> int:
        """The step of the last finished checkpoint, 0 without one."""
        checkpoints = self.checkpoints()
        return self.checkpoint_step(checkpoints[-1]) if checkpoints else 0

    def remove_checkpoints(self) -> None:
        """Delete a finished run's checkpoints: only a resume reads them, `model/` and `map/` hold what it
        trained, and each one (weights + optimizer state) is about three times the model's size."""
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)

    def read_manifest(self) -> Manifest:
        """The run's manifest; a clear error when the run is unfinished or the file is damaged."""
        path = self.manifest_file
        if not path.is_file():
            hint = (
                f"it holds checkpoints, so the run did not finish: finish it with "
                f"`tracr-inject train ... --out {self.path} --resume`"
                if self.checkpoints_dir.is_dir()
                else "pass a folder written by `tracr-inject train`, or a model name with --task"
            )
            raise RunFolderError(f"{self.path} has no {MANIFEST_NAME}; {hint}.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from err
        try:
            return Manifest.from_dict(values)
        except TypeError as err:
            raise RunFolderError(
                f"{path} is not a run's manifest ({err}); the run folder is damaged."
            ) from err

    def write_manifest(self, manifest: Manifest) -> None:
        """Write `manifest.json` (indented JSON, as every version wrote it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_file.write_text(json.dumps(manifest.to_dict(), indent=2))

    def find_evaluation(self) -> Path | None:
        """The evaluation metrics: the run's `eval/metrics.json`, else a published run's `metrics.json`."""
        return next((p for p in (self.evaluation_file, self.path / EVALUATION_NAME) if p.is_file()), None)

    def publish(self, target: str | Path) -> RunFolder:
        """Copy the evaluated run, without weights, to `target`: its eval folder's files (no probe weights) at
        the top, and the manifest, reproduce record, training metrics and the probe and accuracy curves."""
        published = RunFolder(target)
        shutil.rmtree(published.path, ignore_errors=True)
        shutil.copytree(self.eval_dir, published.path, ignore=shutil.ignore_patterns("*.safetensors"))
        for source, copy in zip(self.small_files, published.small_files):
            if source.is_file():
                shutil.copy2(source, copy)
        return published


@dataclasses.dataclass
class Run:
    """A finished run's parts: what `save_pretrained` writes into a run folder and `from_pretrained` reads
    back (the map only for inject runs)."""

    manifest: Manifest
    model: Any
    tokenizer: Any
    teacher: TeacherModel
    amap: AlignmentMap | None = None

    def save_pretrained(self, directory: str | Path) -> RunFolder:
        """Write `model/` (LM and tokenizer), `map/`, `teacher/` and, last, `manifest.json` into `directory`."""
        folder = RunFolder(directory)
        self.model.save_pretrained(folder.model_dir)
        self.tokenizer.save_pretrained(folder.model_dir)
        if self.amap is not None:
            self.amap.save_pretrained(folder.map_dir)
        save_teacher(self.teacher, folder.teacher_dir)
        folder.write_manifest(self.manifest)
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Run:
        """Load a run written by `save_pretrained` (or an earlier version's `train`), with clear errors for an
        unfinished, incomplete or damaged folder."""
        from tracr_injection.hub import load_tokenizer

        folder = RunFolder(directory)
        manifest = folder.read_manifest()
        if not (folder.model_dir / HF_CONFIG).is_file():
            raise RunFolderError(
                f"{folder.path} has a manifest but no {MODEL_DIR}/ folder; the run folder is incomplete."
            )
        model = load_causal_lm(folder.model_dir)
        amap = AlignmentMap.from_pretrained(folder.map_dir) if manifest.method == "inject" else None
        tokenizer = load_tokenizer(folder.model_dir)
        return cls(manifest, model, tokenizer, read_teacher(folder, manifest), amap)


def save_teacher(teacher: TeacherModel, folder: Path) -> None:
    """Put the teacher artifact into the run folder: hard links to the cached files when the cache is on the
    same disk (no space used), else a copy; a teacher that is not in the cache is written afresh."""
    from tracr_injection.compile.compiler import artifact_dir

    source = artifact_dir(teacher.config.program_name, teacher.config.program_hash)
    if not all((source / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        teacher.save_pretrained(folder)
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            os.link(source / name, folder / name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(source / name, folder / name)


def read_teacher(folder: RunFolder, manifest: Manifest) -> TeacherModel:
    """The teacher the run was trained with: its copy in the run folder, else (runs from before the copy)
    the task's teacher from the cache, compiled when missing, with a warning if it is another program."""
    from tracr_injection.tasks import get_task

    if folder.teacher_dir.is_dir():
        return TeacherModel.from_pretrained(folder.teacher_dir)
    teacher = get_task(manifest.task).teacher(manifest.config.teacher if manifest.config else None)
    recorded = manifest.teacher_program_hash
    if recorded and teacher.config.program_hash != recorded:
        warnings.warn(
            f"Run {folder.path} was trained with teacher {recorded[:16]}, but the task's teacher is now "
            f"{teacher.config.program_hash[:16]}; its map decodes against the new one.",
            stacklevel=2,
        )
    return teacher


def versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    import accelerate
    import torch
    import transformers

    import tracr_injection

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "tracr_injection": tracr_injection.__version__,
    }
