"""What an evaluation looks at: a finished run folder, or a plain model evaluated untrained.

In: a run folder written by `inject.trainer.train` (read through `inject.run.Run`) or a model
name/folder plus the task to evaluate it on.  Out: a `Subject` holding the LM,
its tokenizer, the base model's folder, the teacher, the alignment map (inject runs only), the layer
mapping and the intervention block (and, from these, its `Task` and seeded subsets of the task's splits
bridged for its tokenizer), with clear errors for an unfinished run, a run of another task,
or a missing model.  A run folder is evaluated from any directory and on any machine: the base model
is found by the absolute folder recorded in the manifest (or as typed, or `base_model` when given) and
checked against its recorded fingerprint, and the teacher is the copy in the run folder.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.errors import TracrInjectionError
from tracr_injection.hub import ModelNotFoundError, model_fingerprint, model_folder
from tracr_injection.hub.models import in_local_hf_cache, is_smollm2
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.lm import layer_mapping, load_causal_lm, num_blocks
from tracr_injection.inject.run import BaseModelRecord, Manifest, Run, RunFolder, RunFolderError
from tracr_injection.tasks import Task

PRETRAINED = "pretrained"  # the method name of an untrained model


class TaskMismatchError(TracrInjectionError, ValueError):
    """The task asked for is not the one the run was trained on."""


@dataclasses.dataclass
class Subject:
    """An LM to evaluate on one task, with what the evaluation needs to read and edit its residual stream.

    `layer_map[i]` is the hidden-state index aligned with teacher level i; `block` is the block whose
    output the causal tests edit (the run's detach-and-roll block, or where it would be).
    `base_model` is the original model the run started from (the reference for kept ability): for a run,
    its folder on this machine; `tokenizer_name` is the model name the run was trained with (it keys the
    cached teacher targets).
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
    manifest: Manifest | None = None

    @property
    def output_dims(self) -> list[int]:
        """Teacher residual dims of the program's output variable."""
        config = self.teacher.config
        return list(config.variable(config.output_variable).dims)

    @property
    def task_spec(self) -> Task:
        """The registered `Task` called `task`."""
        from tracr_injection.tasks import get_task

        return get_task(self.task)

    def task_data(self, split: str, max_examples: int, seed: int, with_targets: bool = False) -> TaskData:
        """A seeded subset of `max_examples` examples of `split`, bridged for the subject's tokenizer, with
        the teacher's targets when `with_targets` (raises `TeacherCannotRepresentError` where it cannot)."""
        return TaskData(
            self.task,
            split,
            self.tokenizer,
            self.tokenizer_name,
            teacher=self.teacher if with_targets else None,
            max_examples=max_examples,
            seed=seed,
            progress=False,
        )

    def describe(self) -> dict[str, Any]:
        """The identity of what was evaluated, for metrics.json."""
        return {
            "name": self.name,
            "task": self.task,
            "method": self.method,
            "base_model": self.manifest.model if self.manifest else self.base_model,  # as typed, not the folder
            "seed": self.seed,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "layer_map": self.layer_map,
            "block": self.block,
            "teacher_program_hash": self.teacher.config.program_hash,
        }


def is_run_dir(target: str | Path) -> bool:
    """Whether `target` looks like a training run folder (not a plain model folder)."""
    path = Path(target)
    return path.is_dir() and not (path / "config.json").is_file()


def load_subject(
    target: str | Path, task: str | None = None, base_model: str | None = None, teacher: str | None = None
) -> Subject:
    """A run folder (task from its manifest) or a model name/folder (`task` required) ready to evaluate;
    `base_model` points a run at the model it started from when the recorded folder is not on this machine,
    `teacher` a model at one of the task's teachers (a run keeps the teacher it was trained with)."""
    if is_run_dir(target):
        if teacher is not None:
            raise TaskMismatchError(
                f"{target} is a run folder, evaluated with the teacher it was trained with: --teacher only applies "
                "to a model (omit it)."
            )
        return load_run(Path(target), task, base_model)
    if base_model is not None:
        raise TaskMismatchError(
            f"{target!r} is a model, not a run folder: --base-model only applies to run folders (omit it)."
        )
    if task is None and not (Path(target).exists() or is_smollm2(target) or in_local_hf_cache(str(target))):
        raise RunFolderError(
            f"{target} does not exist: pass a run folder written by `tracr-inject train` (or a model with --task)."
        )
    if task is None:
        raise TaskMismatchError(
            f"{target!r} is a model, not a run folder: say which task to evaluate it on (--task dyck|count|sum|...)."
        )
    return load_pretrained(str(target), task, teacher=teacher)


def run_base_model(run_dir: Path, manifest: Manifest, override: str | None = None) -> str:
    """The folder of the model the run started from (`override` when given), with a warning when it is not
    the model the run recorded (another fingerprint: kept-language metrics would compare against it)."""
    record = manifest.base_model_record
    folder = model_folder(override) if override is not None else recorded_base_model(run_dir, record)
    if record.fingerprint and (found := model_fingerprint(folder)) != record.fingerprint:
        warnings.warn(
            f"Base model {folder} is not the model run {run_dir} was trained from (fingerprint {found}, "
            f"recorded {record.fingerprint}); kept-language metrics compare the run against it.",
            stacklevel=2,
        )
    return str(folder)


def recorded_base_model(run_dir: Path, record: BaseModelRecord) -> Path:
    """The absolute folder recorded at training if it is on this machine, else the name as typed then
    (resolved from here: the bundled 'smollm2' on another machine, a cached hub id, a relative folder)."""
    if record.path and (Path(record.path) / "config.json").is_file():
        return Path(record.path)
    try:
        return model_folder(record.name)
    except ModelNotFoundError as err:
        where = f" (at {record.path})" if record.path else ""
        raise RunFolderError(
            f"Run {run_dir} started from model {record.name!r}{where}, which is not on this machine; "
            "pass --base-model FOLDER, the model it was trained from."
        ) from err


def load_run(run_dir: Path, task: str | None = None, base_model: str | None = None) -> Subject:
    """A finished run (`Run.from_pretrained`: its trained LM, map (inject), teacher and the layer mapping it was
    trained with) and its base model; the task and the base model are checked before the LM loads."""
    manifest = RunFolder(run_dir).read_manifest()
    if task is not None and task != manifest.task:
        raise TaskMismatchError(
            f"Run {run_dir} was trained on task {manifest.task!r}, not {task!r}; "
            f"evaluate it on {manifest.task!r} (omit --task) or pick a run trained on {task!r}."
        )
    base = run_base_model(run_dir, manifest, base_model)
    run = Run.from_pretrained(run_dir)
    layer_map = list(run.manifest.layer_mapping)
    block = run.manifest.roll_block
    return Subject(
        name=run_dir.name,
        task=run.manifest.task,
        method=run.manifest.method,
        model=run.model,
        tokenizer=run.tokenizer,
        tokenizer_name=str(run.manifest.model),
        base_model=base,
        teacher=run.teacher,
        amap=run.amap,
        layer_map=layer_map,
        block=layer_map[-1] if block is None else int(block),
        seed=run.manifest.seed,
        run_dir=run_dir,
        manifest=run.manifest,
    )


def load_pretrained(
    model_name: str, task: str, layer_strategy: str = "identity", teacher: str | None = None
) -> Subject:
    """An untrained model, evaluated on `task` against its `teacher` (default: the task's) with the layer
    mapping an inject run would use."""
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.tasks import get_task

    compiled = get_task(task).teacher(teacher)  # an unknown task or teacher fails before the model loads
    model = load_causal_lm(model_name)
    layer_map = layer_mapping(compiled.config.num_levels, num_blocks(model), layer_strategy)
    return Subject(
        name=Path(model_name).name,
        task=task,
        method=PRETRAINED,
        model=model,
        tokenizer=load_tokenizer(model_name),
        tokenizer_name=model_name,
        base_model=model_name,
        teacher=compiled,
        amap=None,
        layer_map=layer_map,
        block=layer_map[-1],
    )
