"""What an evaluation looks at: a finished run folder, or a plain model evaluated untrained.

In: a run folder written by `inject.trainer.train` (manifest.json, model/, map/ for inject runs)
or a model name/folder plus the task to evaluate it on.  Out: a `Subject` holding the LM, its
tokenizer, the alignment map (inject runs only), the layer mapping and the intervention block,
with clear errors for an unfinished run, a run of another task, or a missing model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tracr_injection.compile.errors import ArtifactError, TracrInjectionError
from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.hub.models import in_local_hf_cache, is_smollm2
from tracr_injection.inject.lm import layer_mapping, load_causal_lm, num_blocks
from tracr_injection.inject.losses import AlignmentMap
from tracr_injection.inject.trainer import MANIFEST_NAME

PRETRAINED = "pretrained"  # the method name of an untrained model


class RunFolderError(ArtifactError):
    """A run folder that cannot be evaluated (unfinished, incomplete or corrupt)."""


class TaskMismatchError(TracrInjectionError, ValueError):
    """The task asked for is not the one the run was trained on."""


@dataclasses.dataclass
class Subject:
    """An LM to evaluate on one task, with what the evaluation needs to read and edit its residual stream.

    `layer_map[i]` is the hidden-state index aligned with teacher level i; `block` is the block whose
    output the causal tests edit (the run's detach-and-roll block, or where it would be).
    `base_model` names the original model the run started from (the reference for kept ability).
    """

    name: str
    task: str
    method: str
    model: Any
    tokenizer: Any
    tokenizer_name: str
    base_model: str
    teacher: TeacherModel
    amap: AlignmentMap | None
    layer_map: list[int]
    block: int
    seed: int | None = None
    run_dir: Path | None = None
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def output_dims(self) -> list[int]:
        """Teacher residual dims of the program's output variable."""
        config = self.teacher.config
        return list(config.variable(config.output_variable).dims)

    def describe(self) -> dict[str, Any]:
        """The identity of what was evaluated, for metrics.json."""
        return {
            "name": self.name,
            "task": self.task,
            "method": self.method,
            "base_model": self.base_model,
            "seed": self.seed,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "layer_map": self.layer_map,
            "block": self.block,
            "teacher_program_hash": self.teacher.config.program_hash,
        }


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest; a clear error when the run is unfinished or the file is damaged."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        hint = (
            f"it holds checkpoints, so the run did not finish: finish it with "
            f"`tracr-inject train ... --out {run_dir} --resume`"
            if (run_dir / "checkpoints").is_dir()
            else "pass a folder written by `tracr-inject train`, or a model name with --task"
        )
        raise RunFolderError(f"{run_dir} has no {MANIFEST_NAME}; {hint}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from err


def is_run_dir(target: str | Path) -> bool:
    """Whether `target` looks like a training run folder (not a plain model folder)."""
    path = Path(target)
    return path.is_dir() and not (path / "config.json").is_file()


def load_subject(target: str | Path, task: str | None = None) -> Subject:
    """A run folder (task from its manifest) or a model name/folder (`task` required) ready to evaluate."""
    if is_run_dir(target):
        return load_run(Path(target), task)
    if task is None and not (Path(target).exists() or is_smollm2(target) or in_local_hf_cache(str(target))):
        raise RunFolderError(
            f"{target} does not exist: pass a run folder written by `tracr-inject train` (or a model with --task)."
        )
    if task is None:
        raise TaskMismatchError(
            f"{target!r} is a model, not a run folder: say which task to evaluate it on (--task dyck|count|sum|...)."
        )
    return load_pretrained(str(target), task)


def load_run(run_dir: Path, task: str | None = None) -> Subject:
    """A finished run: its trained LM, map (inject) and the layer mapping it was trained with."""
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.tasks import get_task

    manifest = read_manifest(run_dir)
    if task is not None and task != manifest["task"]:
        raise TaskMismatchError(
            f"Run {run_dir} was trained on task {manifest['task']!r}, not {task!r}; "
            f"evaluate it on {manifest['task']!r} (omit --task) or pick a run trained on {task!r}."
        )
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise RunFolderError(f"{run_dir} has a manifest but no model/ folder; the run folder is incomplete.")
    model = load_causal_lm(model_dir)
    amap = AlignmentMap.from_pretrained(run_dir / "map") if manifest["method"] == "inject" else None
    layer_map = list(manifest["layer_mapping"])
    block = manifest.get("roll_block")
    return Subject(
        name=run_dir.name,
        task=manifest["task"],
        method=manifest["method"],
        model=model,
        tokenizer=load_tokenizer(model_dir),
        tokenizer_name=str(manifest["model"]),
        base_model=str(manifest["model"]),
        teacher=get_task(manifest["task"]).teacher(),
        amap=amap,
        layer_map=layer_map,
        block=layer_map[-1] if block is None else int(block),
        seed=manifest.get("seed"),
        run_dir=run_dir,
        manifest=manifest,
    )


def load_pretrained(model_name: str, task: str, layer_strategy: str = "identity") -> Subject:
    """An untrained model, evaluated on `task` with the layer mapping an inject run would use."""
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.tasks import get_task

    teacher = get_task(task).teacher()  # an unknown task fails before the model loads
    model = load_causal_lm(model_name)
    layer_map = layer_mapping(teacher.config.num_levels, num_blocks(model), layer_strategy)
    return Subject(
        name=Path(model_name).name,
        task=task,
        method=PRETRAINED,
        model=model,
        tokenizer=load_tokenizer(model_name),
        tokenizer_name=model_name,
        base_model=model_name,
        teacher=teacher,
        amap=None,
        layer_map=layer_map,
        block=layer_map[-1],
    )
