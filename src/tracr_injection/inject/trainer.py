"""The injection training loop (and the baseline: the same loop with alignment and detach-and-roll off).

In: a `TrainConfig`.  Out: a run folder (`inject.run`, which names its files) with the trained LM
(`model/`, a standard `save_pretrained` folder), the alignment map (`map/`), the teacher (`teacher/`:
its variable layout and weights, so the folder is evaluated anywhere without the teacher cache),
`manifest.json` (`inject.run.Manifest`: task, teacher hash, the base model's absolute folder and
fingerprint, layer mapping, method, config, versions, accuracy before/after), `metrics.jsonl` (one
line per step, appended as training goes, and the probe lines of `inject.probing`, drawn in
`probes.png`) and `checkpoints/step-N/` (model, map, optimizer, scheduler, RNG states via
Accelerate; the data position is the step number).  Hugging Face Accelerate runs the loop, so
`accelerate launch` spreads it over processes, GPUs or nodes.  Each step's loss is
`inject.objective.InjectionObjective`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import is_tensorboard_available, set_seed
from tqdm.auto import tqdm

from tracr_injection.errors import ArtifactError, TracrInjectionError
from tracr_injection.inject.alignment_map import AlignmentMap
from tracr_injection.inject.answers import exact_match_accuracy
from tracr_injection.inject.config import ConfigError, TrainConfig
from tracr_injection.inject.data import TaskData, batch_positions
from tracr_injection.inject.kl_cache import load_or_build_kl_cache
from tracr_injection.inject.levers import (
    clip_terms_into_grads,
    equal_variable_scales,
    lstsq_map_init,
    target_rows,
)
from tracr_injection.inject.lm import (
    hidden_size,
    layer_mapping,
    load_causal_lm,
    num_blocks,
    use_training_attention,
    vocab_size,
)
from tracr_injection.inject.objective import InjectionObjective, RunParts, run_dim_scales
from tracr_injection.inject.probing import AccuracyProber, Prober, block_groups
from tracr_injection.inject.run import BaseModelRecord, Manifest, Run, RunFolder, versions

FUSED_ADAMW_DEVICES = {"cpu", "cuda"}  # where torch's AdamW has a fused kernel


class CheckpointError(ArtifactError):
    """A checkpoint that is corrupt or belongs to another configuration."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read back (a write cut short, a damaged disk)."""


def build_parts(config: TrainConfig, tokenizer: Any, model: Any, progress: bool = True) -> RunParts:
    """Load the teacher (inject), bridge the data, build the map and the natural-text KL cache."""
    from tracr_injection.tasks import get_task

    task = get_task(config.task)
    teacher = task.teacher(config.teacher)
    levels = teacher.config.num_levels
    layer_map = layer_mapping(levels, num_blocks(model), config.layer_strategy)
    roll_block = (
        checked_roll_block(config.roll_block, layer_map, num_blocks(model)) if config.injecting else None
    )
    data = TaskData(
        config.task,
        config.train_split,
        tokenizer,
        config.model,
        teacher=teacher if config.injecting else None,
        max_examples=config.steps * config.batch_size,
        seed=config.seed,
        progress=progress,
    )
    amap = AlignmentMap(hidden_size(model), teacher.config.d_model) if config.injecting else None
    variable_scales = {}
    if config.injecting and config.alignment_variable_weighting == "equal":
        variable_scales = equal_variable_scales(teacher.config, target_rows(data))
    cache = load_or_build_kl_cache(config, model, tokenizer)
    output_dims = teacher.config.variable(teacher.config.output_variable).dims
    return RunParts(
        model=model,
        tokenizer=tokenizer,
        amap=amap,
        data=data,
        kl_cache=cache,
        layer_map=layer_map,
        roll_block=roll_block,
        output_dims=list(output_dims),
        dim_levels=data.targets.dim_levels if data.targets is not None else None,
        dim_scales=run_dim_scales(teacher.config, config.alignment_scales, variable_scales),
        teacher=teacher,
        variable_scales=variable_scales,
    )


def checked_roll_block(roll_block: int | None, layer_map: list[int], blocks: int) -> int:
    """The block detach-and-roll edits (default: the one whose input is the last aligned level).

    It must not come before the last aligned level (that level would read the other example's state)
    and must exist; at the LM's last block nothing but the head reads the subspace (warned: on Sum the
    head then reads the other example's state and the task loss rose from 4 to 11 nats).
    """
    block = layer_map[-1] if roll_block is None else roll_block
    if not layer_map[-1] <= block < blocks:
        raise TracrInjectionError(
            f"roll_block {block} is outside {layer_map[-1]}..{blocks - 1}: it must be a block of the LM "
            f"({blocks} blocks) at or after the last aligned hidden state ({layer_map[-1]})."
        )
    if block == blocks - 1:
        warnings.warn(
            f"Detach-and-roll at the LM's last block ({block}) leaves no block to read the output subspace; "
            "use --roll-block or a layer strategy that leaves blocks after the last aligned level.",
            stacklevel=2,
        )
    return block


def make_optimizer(
    config: TrainConfig, model: Any, amap: AlignmentMap | None, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW with one learning rate for the LM and another for the map; its fused kernel (the same update in
    one pass over each tensor: a SmolLM2 step 1.2x (bf16) and 1.1x (fp32) faster on CPU,
    `benchmarks/results/step_kernels.json`) where every parameter's device has one, unless `fused` says."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr_lm}]
    if amap is not None:
        groups.append({"params": list(amap.parameters()), "lr": config.lr_map})
    if fused is None:
        fused = {p.device.type for group in groups for p in group["params"]} <= FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, lm_restart: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the configured learning rates, then constant.

    With `lm_restart` N > 0 (`alignment_first_steps`) the LM's group (the first) warms up again from step N,
    when the task loss and the roll start: its Adam moments then hold only the alignment's and KL's
    gradients, and the task gradient arriving at the full rate would take unscaled steps. The map keeps
    its one warm-up.
    """
    width = max(1, warmup_steps)

    def lm(step: int) -> float:
        return min(1.0, (step + 1 - (lm_restart if step >= lm_restart > 0 else 0)) / width)

    def other(step: int) -> float:
        return min(1.0, (step + 1) / width)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lm] + [other] * (len(optimizer.param_groups) - 1))


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int) -> None:
    """Accelerate state (model, map, optimizer, scheduler, RNG) + our step, written atomically."""
    folder = RunFolder(config.out)
    final = folder.checkpoint_dir(step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        RunFolder.state_file(tmp).write_text(json.dumps({"step": step, "config": config.resume_key()}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in folder.checkpoints()[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_state(config: TrainConfig, folder: Path) -> dict[str, Any]:
    """The checkpoint's trainer state (step and config); a CheckpointError when it is unreadable or was
    written by a run with another configuration."""
    try:
        state = json.loads(RunFolder.state_file(folder).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"Checkpoint {folder} is unreadable ({err}).") from err
    recorded, expected = TrainConfig.from_record(state.get("config", {})).resume_key(), config.resume_key()
    if recorded != expected:
        diff = {k for k, v in expected.items() if recorded[k] != v}
        raise CheckpointError(
            f"Checkpoint {folder} was written by a run with a different configuration ({sorted(diff)}); "
            "use another --out or the same settings."
        )
    return state


def load_checkpoint(accelerator: Accelerator, config: TrainConfig, folder: Path) -> int:
    """Restore a checkpoint and return its step; clear errors for a mismatched or corrupt one."""
    state = checkpoint_state(config, folder)
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # safetensors/torch raise many types for a damaged file
        why = f"{type(err).__name__}: {err}"
        raise CorruptCheckpointError(f"Checkpoint {folder} is corrupt ({why}).") from err
    return int(state["step"])


def load_last_good_checkpoint(accelerator: Accelerator, config: TrainConfig, folder: RunFolder) -> int:
    """Restore the newest checkpoint that loads and return its step: a corrupt one is skipped with a warning
    naming it (every checkpoint is a full state, so the previous one is as good a start, just earlier)."""
    found = folder.checkpoints()
    for index in range(len(found) - 1, -1, -1):
        try:
            return load_checkpoint(accelerator, config, found[index])
        except CorruptCheckpointError as err:
            if index == 0:
                raise CorruptCheckpointError(
                    f"{err} No earlier checkpoint loads; delete {folder.checkpoints_dir} to start the run over."
                ) from err
            warnings.warn(f"{err} Resuming from {found[index - 1].name} instead.", stacklevel=2)
    raise AssertionError("unreachable: called without checkpoints")


def resume_command(config: TrainConfig) -> str:
    """What to run to continue this run where its last checkpoint left it (relative paths: from here)."""
    return f"cd {shlex.quote(os.getcwd())} && {config.command()} --resume"


@contextlib.contextmanager
def resume_hint_on_failure(config: TrainConfig, show: bool) -> Iterator[None]:
    """If training stops on an interruption or a crash, print the command that resumes it (then re-raise).
    Not for our own errors (a non-finite loss): resuming would meet them again."""
    try:
        yield
    except BaseException as err:
        if show and not isinstance(err, TracrInjectionError):
            last = RunFolder(config.out).checkpoints()
            start = f"its last checkpoint, {last[-1].name}" if last else "step 0 (no checkpoint yet)"
            stopped = f"Training stopped ({type(err).__name__}); resume it from {start} with:"
            print(f"\n{stopped}\n  {resume_command(config)}", file=sys.stderr, flush=True)
        raise


def check_before_loading(config: TrainConfig, resume: bool) -> None:
    """Reject, before the LM loads or targets are computed, what would fail (or overwrite a run) later:
    an --out holding checkpoints without --resume or a finished run, an unknown task or split, a model
    not on this machine, a KL top-k wider than the vocabulary, or a checkpoint of another configuration."""
    from tracr_injection.tasks import get_task

    folder = RunFolder(config.out)
    if not resume and folder.checkpoints():
        raise TracrInjectionError(
            f"{folder.path} already holds checkpoints; pass --resume to continue or choose another --out."
        )
    if folder.is_finished and not folder.checkpoints():
        raise TracrInjectionError(
            f"{folder.path} already holds a finished run ({folder.manifest_file.name}); choose another --out or "
            "delete the folder."
        )
    task = get_task(config.task)
    task.teacher_program(config.teacher)  # a teacher the task cannot use
    for split in (config.train_split, config.eval_split):
        task.split_spec(split)
    vocab = vocab_size(config.model)
    if config.kl_top_k > vocab:
        raise ConfigError(
            f"kl_top_k {config.kl_top_k} is more than the vocabulary of {config.model!r} ({vocab} tokens); "
            f"pass --kl-top-k {vocab} or less."
        )
    if resume and folder.checkpoints():
        with contextlib.suppress(CorruptCheckpointError):  # a corrupt last one falls back when loading
            checkpoint_state(config, folder.checkpoints()[-1])


def run_accelerator(config: TrainConfig, out: Path) -> Accelerator:
    """The run's Accelerator.  Accelerate keeps one mixed precision per process; a single process that trains
    runs of different precisions one after the other (a sweep, the tests) starts each from a fresh state."""
    recorded = AcceleratorState._shared_state.get("_mixed_precision")
    if recorded not in (None, config.mixed_precision) and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # Accelerate's own reset; the process group (PartialState) is kept
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=str(out),
    )


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Manifest:
    """Run (or resume) one training run; returns the manifest."""
    check_before_loading(config, resume)
    folder = RunFolder(config.out)
    out = folder.path
    accelerator = run_accelerator(config, out)
    set_seed(config.seed)
    from tracr_injection.hub import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model)
    use_training_attention(model, accelerator.device)
    model.train()
    with accelerator.main_process_first():  # caches (teacher, targets, KL) are written once
        parts = build_parts(config, tokenizer, model, progress=progress and accelerator.is_main_process)
    eval_data = TaskData(
        config.task, config.eval_split, tokenizer, config.model, max_examples=config.eval_examples, seed=1
    )
    accuracy_before = exact_match_accuracy(model.to(accelerator.device), eval_data, config.eval_examples)
    if config.clip_per_term and accelerator.num_processes > 1:
        raise TracrInjectionError(
            "clip_per_term takes each term's gradient with autograd.grad, which DistributedDataParallel does not "
            "synchronise; run it in one process or drop --clip-per-term."
        )
    map_fit = None
    if config.injecting and config.map_init == "lstsq" and not (resume and folder.checkpoints()):
        map_fit = lstsq_map_init(parts.amap, model.to(accelerator.device), parts.data, parts.layer_map, parts.dim_levels)
    objective = InjectionObjective(config, parts)
    optimizer = make_optimizer(config, model, parts.amap)
    lm_restart = config.alignment_first_steps if config.injecting else 0
    scheduler = warmup_schedule(optimizer, config.warmup_steps, lm_restart)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    early_params = block_groups(model, parts.roll_block)["early"] if config.injecting else []
    trainable = [p for p in objective.parameters() if p.requires_grad]
    start = 0
    if resume and folder.checkpoints():
        start = load_last_good_checkpoint(accelerator, config, folder)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = folder.metrics_file
    if accelerator.is_main_process:
        truncate_metrics(metrics_file, start)
    accelerator.init_trackers("tensorboard", config=tracker_config(config))
    prober = make_prober(config, accelerator, accelerator.unwrap_model(objective), parts, tokenizer)
    if prober is not None and start == 0:
        prober.record(0)
    scorer = make_accuracy_prober(config, accelerator, accelerator.unwrap_model(objective).lm, tokenizer)
    if scorer is not None and start == 0:
        scorer.record(0)
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"{config.method} {config.task}",
        disable=not (progress and accelerator.is_main_process),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    with resume_hint_on_failure(config, show=accelerator.is_main_process), bar:  # the bar closes first
        for step in range(start, config.steps):
            began = time.perf_counter()
            batch = parts.data.collate(batch_positions(step, config.batch_size, len(parts.data), rank, world))
            kl_rows = batch_positions(step, config.kl_batch_size, len(parts.kl_cache), rank, world)
            kl_batch = parts.kl_cache.batch(kl_rows)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            kl_batch = {k: v.to(accelerator.device) for k, v in kl_batch.items()}
            with accelerator.autocast():
                forced = step < config.subspace_forcing_steps
                aligning = config.injecting and step < config.alignment_first_steps
                terms, metrics = objective(
                    batch, kl_batch, force_subspace=forced, alignment_only=aligning, separate=True
                )
            if accelerator.unwrap_model(objective).balance_due(step):
                mean = partial(process_mean, accelerator)
                accelerator.unwrap_model(objective).rebalance(terms, metrics, early_params, mean)
            loss = sum(terms.values())
            metrics["loss"] = loss.item()
            if config.clip_per_term:
                norms = clip_terms_into_grads(terms, trainable, config.clip_norm)
                metrics.update({f"grad_norm/{name}": norm for name, norm in norms.items()})
                metrics["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, math.inf))  # after clipping
            else:
                accelerator.backward(loss)
                metrics["grad_norm"] = float(accelerator.clip_grad_norm_(objective.parameters(), config.clip_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            metrics.update(step=step + 1, lr_lm=scheduler.get_last_lr()[0], seconds=seconds)
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                accelerator.log(metrics, step=step + 1)
                shown = ("task_ce", "alignment", "kl")
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in shown if k in metrics})
                bar.update(1)
            if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm")):
                raise TracrInjectionError(
                    f"Non-finite loss at step {step + 1}: {metrics}; lower the learning rates."
                )
            if prober is not None and prober.due(step + 1):
                prober.record(step + 1)
            if scorer is not None and scorer.due(step + 1):
                scorer.record(step + 1)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save_checkpoint(accelerator, config, step + 1)
    accelerator.end_training()
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(objective).lm
    accuracy_after = exact_match_accuracy(trained, eval_data, config.eval_examples)
    manifest = Manifest(
        task=config.task,
        method=config.method,
        model=config.model,
        base_model=BaseModelRecord.of(config.model),
        teacher_program=parts.teacher.config.program_name,
        teacher_program_hash=parts.teacher.config.program_hash,
        layer_mapping=parts.layer_map,
        roll_block=parts.roll_block if config.injecting else None,
        config=config,
        seed=config.seed,
        versions=versions(),
        num_processes=accelerator.num_processes,
        distributed=str(accelerator.distributed_type),
        eval_split=config.eval_split,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        eval_examples=min(config.eval_examples, len(eval_data)),
        alignment_variable_scales=parts.variable_scales or None,
        map_init_fit=map_fit,
    )
    if accelerator.is_main_process:
        amap = accelerator.unwrap_model(objective).amap if parts.amap is not None else None
        Run(manifest, trained, tokenizer, parts.teacher, amap).save_pretrained(out)
    accelerator.wait_for_everyone()
    return manifest


def process_mean(accelerator: Accelerator, value: float) -> float:
    """`value` averaged over the training processes (the balance's ratio: every process uses the same factor)."""
    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean"))


def make_prober(
    config: TrainConfig, accelerator: Accelerator, objective: InjectionObjective, parts: RunParts, tokenizer: Any
) -> Prober | None:
    """The injection-strength probes of this run (`inject.probing`), on the main process, unless turned off."""
    if not config.probe_every or not accelerator.is_main_process:
        return None
    return Prober(
        config, objective, parts.teacher, tokenizer, parts.kl_cache, Path(config.out),
        log=lambda values, step: accelerator.log(values, step=step), autocast=accelerator.autocast,
    )  # fmt: skip


def make_accuracy_prober(
    config: TrainConfig, accelerator: Accelerator, lm: Any, tokenizer: Any
) -> AccuracyProber | None:
    """The accuracy-over-training probe of this run (`inject.probing.AccuracyProber`), on the main process,
    when `accuracy_every` asks for it."""
    if not config.accuracy_every or not accelerator.is_main_process:
        return None
    return AccuracyProber(
        config, lm, tokenizer, Path(config.out), log=lambda values, step: accelerator.log(values, step=step)
    )


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The config as TensorBoard hyper-parameters (which take numbers, strings and booleans only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (a resumed run rewrites the steps it repeats)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
