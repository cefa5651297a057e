"""`tracr-inject eval`: every evaluation of one run (or untrained model), written as metrics, report and plots.

In: a run folder or a model name (+ task) and `EvalSettings`.  Out: `<run>/eval/metrics.json`
(accuracy per split with breakdowns, kept language ability, decoding per variable per level via
the learned map and via a post-hoc probe, the answer readout per split, causal tests, timings),
`report.md` and PNG plots.  With a baseline run (`--baseline`), also per teacher variable the run's map
decoding beside the baseline's post-hoc probe, both at the level the variable is written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tracr_injection.evaluate.accuracy import split_accuracy
from tracr_injection.evaluate.causal import causal_tests
from tracr_injection.evaluate.decoding import (
    DecodingResult,
    LinearDecoder,
    check_decoder,
    check_layer_map,
    example_table,
    split_rasp_agreement,
    written_level,
    written_value,
)
from tracr_injection.evaluate.language import heldout_windows, language_metrics, run_lm_eval
from tracr_injection.evaluate.ood import ood_views
from tracr_injection.evaluate.probe import fit_task_probe
from tracr_injection.evaluate.readout import readout_rates, symbol_tokens
from tracr_injection.evaluate.report import write_report
from tracr_injection.evaluate.split_pass import PassInputs, SplitPass, split_pass
from tracr_injection.evaluate.subject import (
    PRETRAINED,
    RunFolderError,
    Subject,
    TaskMismatchError,
    is_run_dir,
    load_subject,
)
from tracr_injection.hub import model_fingerprint, model_folder
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.kl_cache import KLCache, kl_cache_path
from tracr_injection.inject.lm import forward_precision, load_causal_lm
from tracr_injection.inject.run import EVALUATION_NAME, RunFolder
from tracr_injection.tasks import TeacherCannotRepresentError

UNTRAINED_EVAL_ROOT = Path("eval")  # where an untrained model's evaluation goes (a run's: its eval/)
PROBE_FILE = "probe.safetensors"
RASP_EXAMPLES = 24  # examples per split the teacher is checked against the RASP evaluator on


@dataclasses.dataclass
class EvalSettings:
    """How much of each evaluation to run (defaults: a full evaluation; budgets shrink them)."""

    max_examples: int = 1000
    batch_size: int = 64
    probe_examples: int = 1000
    decoding_examples: int = 256
    causal_examples: int = 200
    noise_norms: tuple[float, ...] = (0.0, 5.0, 10.0, 30.0)
    relative_norms: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    interchange_pairs: int = 200
    language_windows: int = 128
    lm_eval_tasks: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    precision: str = "fp32"  # the LMs' forward passes: fp32 or bf16 (autocast; see inject.lm.forward_precision)


def evaluate_target(
    target: str | Path,
    *,
    task: str | None = None,
    out: str | Path | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
    baseline: str | Path | None = None,
    base_model: str | None = None,
    teacher: str | None = None,
) -> Path:
    """Evaluate a run folder (or a model on `task`), write metrics.json, report.md and plots, return the folder.

    `base_model` points a run at the model it started from when its recorded folder is not here; `teacher`
    evaluates a model against one of the task's teachers other than its default.  With
    `baseline` (an evaluated baseline run of the same task and layer map), metrics.json and the report
    also hold `baseline_comparison`: the run's map decoding beside the baseline's probe, per variable.
    """
    baseline_metrics = read_baseline_metrics(baseline, target) if baseline is not None else None
    subject = load_subject(target, task, base_model, teacher)
    folder = Path(out) if out is not None else default_out(subject)
    metrics = evaluate_subject(subject, settings or EvalSettings(), folder, progress)
    if baseline_metrics is not None:
        metrics["baseline_comparison"] = baseline_comparison(metrics, baseline_metrics)
    return write_metrics(metrics, folder)


def read_baseline_metrics(baseline: str | Path, target: str | Path) -> dict[str, Any]:
    """The baseline's evaluation metrics (`BASELINE/eval/metrics.json`, or the `metrics.json` of a published
    result folder), checked against the run's manifest: an inject run, the same teacher and layer map."""
    if not is_run_dir(target) or RunFolder(target).read_manifest().method != "inject":
        raise RunFolderError(
            f"--baseline sets an inject run's map beside a baseline's probe; {target} is not an inject run."
        )
    manifest = RunFolder(target).read_manifest()
    path = RunFolder(baseline).find_evaluation()
    if path is None:
        raise RunFolderError(
            f"{baseline} has no evaluation ({RunFolder(baseline).evaluation_file}); evaluate it first: "
            f"`tracr-inject eval {baseline}`."
        )
    metrics = json.loads(path.read_text())
    theirs = metrics["subject"]
    if theirs["teacher_program_hash"] != manifest.teacher_program_hash:
        raise TaskMismatchError(
            f"Baseline {baseline} was evaluated on task {theirs['task']!r} with another teacher than the "
            f"run's ({manifest.task!r}); pass a baseline run of the same task."
        )
    if theirs["layer_map"] != manifest.layer_mapping or "probe" not in metrics.get("decoding", {}):
        raise RunFolderError(
            f"Baseline {baseline} was probed at hidden states {theirs['layer_map']}, the run aligns "
            f"{manifest.layer_mapping} (or has no probe decoding); pass a baseline trained like the run."
        )
    return metrics


def baseline_comparison(metrics: dict[str, Any], baseline_metrics: dict[str, Any]) -> dict[str, Any]:
    """Per teacher variable and split, the run's map decoding beside the baseline's probe decoding, both at
    the level the variable is written, with the most common value's share, both balanced accuracies and, for
    the ordinal variables, both reads as a number; splits the teacher cannot represent are left out."""
    ours, theirs = metrics["decoding"]["map"], baseline_metrics["decoding"]["probe"]
    splits = [s for s in ours if not ours[s]["skipped"] and s in theirs and not theirs[s]["skipped"]]
    variables: dict[str, Any] = {}
    for name, positions in ours[splits[0]]["positions"].items() if splits else ():
        level = written_level(positions)
        variables[name] = {"level": level}
        for split in splits:
            variables[name][split] = {
                "map": ours[split]["accuracy"][name][level],
                "baseline_probe": theirs[split]["accuracy"][name][level],
                "majority": written_value(ours[split], "majority", name, level),
                "map_balanced": written_value(ours[split], "balanced", name, level),
                "baseline_probe_balanced": written_value(theirs[split], "balanced", name, level),
                "map_as_number": written_value(ours[split], "as_number", name, level),
                "baseline_probe_as_number": written_value(theirs[split], "as_number", name, level),
            }
    return {"baseline": baseline_metrics["subject"], "splits": splits, "variables": variables}


def write_metrics(metrics: dict[str, Any], folder: Path) -> Path:
    """Write metrics.json and report.md (with its plots) into `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION_NAME).write_text(json.dumps(metrics, indent=1))
    write_report(metrics, folder)
    return folder


REDONE_PARTS = ("readout", "decoding")  # the split-pass parts an evaluated run can be given again


def add_split_parts(
    run_dir: str | Path, parts: Sequence[str] = ("readout",), splits: Sequence[str] | None = None,
    progress: bool = True, base_model: str | None = None,
) -> Path:
    """Compute `parts` (readout, decoding) again for an evaluated run with its recorded settings and saved
    probe, on `splits` (default: all), and write them into its metrics: a run evaluated before a part (or a
    measure of it, such as decoding's `majority`) existed gets it without a whole evaluation.  The other
    splits' entries and the baseline comparison stay as they were evaluated."""
    unknown = [p for p in parts if p not in REDONE_PARTS]
    if unknown:
        raise RunFolderError(f"Cannot add {unknown}; choose from {', '.join(REDONE_PARTS)}.")
    subject = load_subject(run_dir, base_model=base_model)
    folder = default_out(subject)
    path = folder / EVALUATION_NAME
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no evaluation ({path}); run `tracr-inject eval {run_dir}` first.")
    metrics = json.loads(path.read_text())
    settings = EvalSettings(**metrics["settings"])
    decoders = subject_decoders(subject, settings, folder)
    name = "+".join(parts)
    with forward_precision(settings.precision, subject.model):
        redone = timed(
            metrics["timings"], name, lambda: split_evaluations(subject, decoders, settings, progress, splits),
            progress,
        )  # fmt: skip
    for part in parts:
        for kind, by_split in redone[part].items():
            metrics.setdefault(part, {}).setdefault(kind, {}).update(by_split)
    return write_metrics(metrics, folder)


def default_out(subject: Subject) -> Path:
    """`<run>/eval` for a run, `eval/<model>-<task>` for an untrained model (`-<teacher>` added for a teacher other
    than the task's default)."""
    if subject.run_dir is not None:
        return RunFolder(subject.run_dir).eval_dir
    program = subject.teacher.config.program_name
    suffix = "" if program == subject.task_spec.program else f"-{program}"
    return UNTRAINED_EVAL_ROOT / f"{subject.name}-{subject.task}{suffix}"


def timed(timings: dict[str, float], name: str, fn: Callable[[], Any], progress: bool) -> Any:
    """Run one evaluation part, recording its wall time (and saying what runs when `progress`)."""
    if progress:
        print(f"[eval] {name} ...", flush=True)
    began = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - began, 2)
    return result


def evaluate_subject(
    subject: Subject, settings: EvalSettings, folder: Path, progress: bool = True
) -> dict[str, Any]:
    """Every evaluation of one subject, as the JSON-ready metrics dict."""
    torch.manual_seed(settings.seed)
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {
        "subject": subject.describe(),
        "settings": dataclasses.asdict(settings),
        "output_variable": subject.teacher.config.output_variable,
    }
    with forward_precision(settings.precision, subject.model):
        decoders = timed(timings, "probe", lambda: subject_decoders(subject, settings, folder), progress)
        per_split = timed(
            timings, "splits", lambda: split_evaluations(subject, decoders, settings, progress), progress
        )
    accuracy = per_split["accuracy"]
    metrics["accuracy"] = {split: result.to_dict() for split, result in accuracy.items()}
    if views := ood_views(subject.task, accuracy):
        metrics["ood"] = views
    metrics["language"] = timed(timings, "language", lambda: kept_language(subject, settings), progress)
    metrics["decoding"], metrics["readout"] = per_split["decoding"], per_split["readout"]
    main_decoder = decoders.get("map", decoders["probe"])
    with forward_precision(settings.precision, subject.model):
        metrics["example"] = example_rows(subject, main_decoder)
        metrics["causal"] = timed(
            timings, "causal", lambda: causal(subject, main_decoder, settings, progress), progress
        )
    metrics["timings"] = timings
    return metrics


def evaluated_splits(subject: Subject) -> list[str]:
    """Every split of the subject's task but train (LM-only ones included)."""
    return [spec.name for spec in subject.task_spec.splits if spec.kind != "train"]


def split_evaluations(
    subject: Subject, decoders: dict[str, LinearDecoder], settings: EvalSettings, progress: bool = True,
    splits: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy (a `SplitAccuracy` per split, predictions kept for the OOD views), decoding and the answer
    readout (per decoder, as dicts) of every evaluated split (or of `splits`), read off one teacher-forced LM
    pass per split (`split_pass`); keyed "accuracy", "decoding" and "readout"."""
    check_layer_map(subject.layer_map, subject.teacher.config.num_levels)
    for decoder in decoders.values():
        check_decoder(decoder, subject.teacher.config)
    names = evaluated_splits(subject) if splits is None else list(splits)
    count = max(settings.max_examples, settings.decoding_examples)
    data = {name: subject.task_data(name, count, settings.seed) for name in names}
    tokens = symbol_tokens(*data.values())  # one table: an OOD split may hold one answer only
    results: dict[str, dict[str, Any]] = {
        "accuracy": {},
        "decoding": {kind: {} for kind in decoders},
        "readout": {kind: {} for kind in decoders},
    }
    bar = tqdm(total=sum(map(len, data.values())), desc="[eval] splits", unit="ex", disable=not progress)
    for name in names:
        bar.set_postfix_str(name)
        targets = decoding_targets(subject, name, settings)
        inputs = PassInputs(
            data[name],
            subject.layer_map,
            decoders,
            subject.teacher,
            targets.targets if isinstance(targets, TaskData) else None,
            settings.decoding_examples,
        )
        result = split_pass(subject.model, inputs, progress=bar.update)
        forced_correct = result.correct_N[: settings.max_examples].tolist()
        results["accuracy"][name] = split_accuracy(
            subject.model, subject.tokenizer, subject.task_spec, name, max_examples=settings.max_examples,
            batch_size=settings.batch_size, seed=settings.seed, forced_correct=forced_correct,
        )  # fmt: skip
        for kind, decoding_result in decoding_results(subject, name, targets, result, decoders).items():
            results["decoding"][kind][name] = decoding_result.to_dict()
        for kind, readout_result in readout_rates(
            result.readout, name, decoders, subject.teacher.config, tokens
        ).items():
            results["readout"][kind][name] = readout_result.to_dict()
    bar.close()
    return results


def decoding_targets(subject: Subject, split: str, settings: EvalSettings) -> TaskData | str:
    """The first `decoding_examples` examples of `split` with their teacher targets, or why the teacher
    cannot represent the split."""
    try:
        return subject.task_data(split, settings.decoding_examples, settings.seed, with_targets=True)
    except TeacherCannotRepresentError as err:
        return str(err)


def decoding_results(
    subject: Subject,
    split: str,
    targets: TaskData | str,
    result: SplitPass,
    decoders: dict[str, LinearDecoder],
) -> dict[str, DecodingResult]:
    """Per decoder the `DecodingResult` of one split from the pass's counts, plus the teacher's RASP check."""
    if isinstance(targets, str):
        return {kind: DecodingResult(split=split, decoder=kind, skipped=targets) for kind in decoders}
    agreement = split_rasp_agreement(targets, subject.teacher, RASP_EXAMPLES)
    return {
        kind: DecodingResult.from_counts(split, kind, len(targets), counts, subject.teacher.config, agreement)
        for kind, counts in (result.decoding or {}).items()
    }


def training_config(subject: Subject) -> TrainConfig:
    """The run's training config (an untrained model: the defaults, on its own model name)."""
    if subject.manifest is not None and subject.manifest.config is not None:
        return subject.manifest.config
    return TrainConfig(task=subject.task, model=subject.base_model)


def kept_language(subject: Subject, settings: EvalSettings) -> dict[str, Any]:
    """Perplexity, KL(original || trained) and top-1 agreement on held-out text from training's KL source."""
    config = training_config(subject)
    original = subject.model if subject.method == PRETRAINED else load_causal_lm(subject.base_model)
    cache = kl_cache_path(config)
    training_NT = KLCache.load(cache).input_ids_NT if cache.is_file() else None
    windows_NT = heldout_windows(
        config.kl_source,
        subject.tokenizer,
        settings.language_windows,
        config.kl_window_len,
        train_seed=config.seed,
        train_windows=config.kl_windows,
        model=original,
        training_NT=training_NT,
        model_key=model_fingerprint(model_folder(subject.base_model)),
    )
    with forward_precision(settings.precision, original, subject.model):  # the windows are sampled in fp32
        result = language_metrics(original, subject.model, windows_NT).to_dict()
    result["text_source"] = config.kl_source
    if settings.lm_eval_tasks:
        model_dir = RunFolder(subject.run_dir).model_dir if subject.run_dir else subject.base_model
        result["lm_eval"] = run_lm_eval(model_dir, settings.lm_eval_tasks).to_dict()
    return result


def task_probe(subject: Subject, settings: EvalSettings, folder: Path) -> LinearDecoder:
    """The post-hoc ridge probe (fitted once on training-split examples, then loaded from the eval folder)."""
    path = folder / PROBE_FILE
    if path.is_file():
        return LinearDecoder.load(path)
    probe = fit_task_probe(subject, num_examples=settings.probe_examples, seed=settings.seed)
    probe.save(path)
    return probe


def subject_decoders(subject: Subject, settings: EvalSettings, folder: Path) -> dict[str, LinearDecoder]:
    """The post-hoc probe, and the learned map of an injected run."""
    probe = task_probe(subject, settings, folder)
    return {"probe": probe} if subject.amap is None else {"map": map_decoder(subject), "probe": probe}


def map_decoder(subject: Subject) -> LinearDecoder:
    """An injected run's learned map, used at every aligned level."""
    return LinearDecoder.from_map(subject.amap, subject.teacher.config.num_levels)


def in_distribution_data(subject: Subject, count: int, teacher: bool = False) -> TaskData:
    """A seeded subset of the in-distribution test split, bridged for the subject's tokenizer."""
    split = next(s.name for s in subject.task_spec.splits if s.kind == "test")
    return subject.task_data(split, count, seed=1, with_targets=teacher)


def example_rows(subject: Subject, decoder: LinearDecoder) -> dict[str, Any]:
    """Token-by-token decoded vs true values of the first test example."""
    data = in_distribution_data(subject, 1, teacher=True)
    return {
        "decoder": decoder.kind,
        "prompt": data.bridged[0].tokens,
        "rows": example_table(subject, data, decoder),
    }


def causal(
    subject: Subject, decoder: LinearDecoder, settings: EvalSettings, progress: bool = False
) -> dict[str, Any]:
    """Noise, ablation and interchange in the output-variable subspace read by `decoder`, vs a random subspace."""
    data = in_distribution_data(subject, settings.causal_examples)
    result = causal_tests(
        subject.model,
        data,
        decoder.rows(subject.output_dims),
        subject.block,
        count=settings.causal_examples,
        noise_norms=settings.noise_norms,
        relative_norms=settings.relative_norms,
        pairs=settings.interchange_pairs,
        seed=settings.seed,
        progress=progress,
    )
    return {"subspace": decoder.kind, **result.to_dict()}
