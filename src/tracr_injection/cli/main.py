"""`tracr-inject`: compile and inspect teachers, train, evaluate and compare runs from the command line.

In: command-line arguments naming programs, tasks, models and run folders.  Out: compiled teachers, run
folders, evaluations and comparisons on disk, tables and JSON (`answer-path`) on stdout.

Every error caused by the user's input (an error of this package, a bad value, an unknown program or
task name) is one `error: ...` line on stderr and exit status 1 (`UserErrorGroup`); anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.errors import InvalidArgumentError, TracrInjectionError
from tracr_injection.registry import UnknownNameError

# What is raised on purpose (a bad argument is an InvalidArgumentError); any other exception is a bug and keeps
# its traceback.
USER_ERRORS = (TracrInjectionError, UnknownNameError)


class UserErrorGroup(TyperGroup):
    """The command group: runs a command and turns a `USER_ERRORS` exception into one `error:` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            fail(str(err))


app = typer.Typer(
    help="Distil RASP programs, compiled by tracr, into pre-trained causal LMs.",
    no_args_is_help=True,
    cls=UserErrorGroup,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # soft wrap: the message stays one line however long


def fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with status 1."""
    errors.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def compile_registered(name: str, max_len: int | None, cache_dir: Path | None, force: bool) -> TeacherModel:
    """Compile (or load from cache) the registered program `name`."""
    from tracr_injection.compile.compiler import compile_spec
    from tracr_injection.programs.registry import get_program

    return compile_spec(get_program(name), max_len, cache_dir=cache_dir, use_cache=not force)


@app.command("compile")
def compile_command(
    name: str = typer.Argument(..., help="Registered program name (see `tracr-inject programs`)."),
    max_len: int | None = typer.Option(
        None, "--max-len", help="Maximum input length (default: the program's)."
    ),
    cache_dir: Path | None = typer.Option(
        None, help="Teacher cache folder (default: $TRACR_INJECTION_CACHE/teachers)."
    ),
    force: bool = typer.Option(False, help="Recompile even if a cached artifact exists."),
) -> None:
    """Compile a registered program with tracr, validate it against RASP and cache the artifact."""
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    with console.status(f"Compiling {name} ..."):
        teacher = compile_registered(name, max_len, cache_dir, force)
    config = teacher.config
    console.print(
        f"[bold]{config.program_name}[/]: {config.num_layers} blocks, residual width {config.d_model}, "
        f"validated on {config.validation.get('num_inputs')} inputs "
        f"({config.validation.get('mismatches')} mismatches), {time.perf_counter() - start:.1f} s"
    )
    from tracr_injection.compile.compiler import artifact_dir

    typer.echo(str(artifact_dir(config.program_name, config.program_hash, cache_dir)))


@app.command("inspect")
def inspect_command(
    target: str = typer.Argument(..., help="A registered program name or an artifact folder."),
    max_len: int | None = typer.Option(None, "--max-len", help="For a program name: maximum input length."),
    cache_dir: Path | None = typer.Option(
        None, help="Teacher cache folder (default: $TRACR_INJECTION_CACHE/teachers)."
    ),
) -> None:
    """Show a teacher's blocks, heads, width, parameters and every variable with its dims and values."""
    if Path(target).is_dir():
        teacher = TeacherModel.from_pretrained(target)
    elif "/" in target or Path(target).exists():
        fail(
            f"{target} is not a folder: pass a teacher artifact folder (`tracr-inject compile` prints one) "
            "or a registered program name (`tracr-inject programs`)."
        )
    else:
        teacher = compile_registered(target, max_len, cache_dir, force=False)
    console.print(summary_table(teacher))
    console.print(variables_table(teacher))


@app.command("programs")
def programs_command() -> None:
    """List the registered programs."""
    from tracr_injection.programs.registry import get_program, program_names

    table = Table("name", "causal", "max_seq_len", "vocab", "description", title="Registered programs")
    for name in program_names():
        spec = get_program(name)
        vocab = " ".join(sorted(map(str, spec.vocab)))
        table.add_row(name, str(spec.causal), str(spec.max_seq_len), vocab, spec.description)
    console.print(table)


@app.command("tasks")
def tasks_command(
    tokenizer: str = typer.Option("smollm2", help="Tokenizer whose token counts decide the teacher's reach."),
) -> None:
    """List the registered tasks and their splits, with whether the teacher can represent each."""
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.tasks import TokenBridge, get_task, task_names
    from tracr_injection.tasks.bridge import describe_split

    tok = load_tokenizer(tokenizer)
    table = Table("task", "split", "kind", "size", "max tokens", "teacher", "description", title="Tasks")
    for name in task_names():
        task = get_task(name)
        bridge = TokenBridge(tok, task)
        for split in task.split_names:
            info = describe_split(task, split, bridge)
            table.add_row(
                name,
                split,
                info["kind"],
                str(info["size"]),
                str(info["max_tokens"]),
                "yes" if info["teacher_blocker"] is None else f"no: {info['teacher_blocker']}",
                info["description"],
            )
    console.print(table)


@app.command("data")
def data_command(
    task_name: str = typer.Argument(..., metavar="TASK", help="Task name (see `tracr-inject tasks`)."),
    split: str = typer.Option("train", help="Split name."),
    show: int = typer.Option(3, help="Print this many examples token by token."),
    tokenizer: str = typer.Option("smollm2", help="Tokenizer: 'smollm2', 'gpt2' or a local folder."),
    export: Path | None = typer.Option(
        None, help="Write the split (text + bridged tokens) to this JSONL file."
    ),
    targets: Path | None = typer.Option(
        None, help="Precompute the teacher's residual targets for the split into this folder."
    ),
) -> None:
    """Show a task split: LM tokens and teacher symbols side by side; export it or precompute its targets."""
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.tasks import TokenBridge, get_task, teacher_inputs
    from tracr_injection.tasks.bridge import describe_split, export_bridged
    from tracr_injection.tasks.targets import precompute_targets

    task = get_task(task_name)
    bridge = TokenBridge(load_tokenizer(tokenizer), task)
    info = describe_split(task, split, bridge)
    examples = task.examples(split)
    console.print(split_summary(task_name, info))
    for index in range(min(show, len(examples))):
        console.print(alignment_table(bridge(examples[index]), f"{task_name}/{split} example {index}"))
    if export is not None:
        export_bridged(examples, bridge, export)
        console.print(f"wrote {len(examples)} examples to {export}")
    if targets is not None:
        bridged = bridge.bridge_all(examples)
        teacher_inputs(bridged, task, split, task.teacher_max_len)
        manifest = precompute_targets(
            task.teacher(), bridged, targets, task=task_name, split=split, tokenizer=tokenizer
        )
        console.print(
            f"teacher targets: {manifest.num_examples} examples, {manifest.bytes_on_disk / 2**20:.1f} MiB, "
            f"{manifest.seconds:.1f} s, teacher answers correct {100 * manifest.answer_accuracy:.2f}%"
        )


@app.command("train")
def train_command(
    task: str | None = typer.Option(None, help="Task name (default: dyck)."),
    teacher: str | None = typer.Option(
        None, help="Program that teaches the task (default: the task's own; dyck also: dyck_authors_trigger)."
    ),
    method: str | None = typer.Option(None, help="inject (alignment + detach-and-roll) or baseline."),
    model: str | None = typer.Option(
        None, help="'smollm2' (default, offline), a local folder or a cached hub id."
    ),
    steps: int | None = typer.Option(None, help="Training steps."),
    batch_size: int | None = typer.Option(None, help="Examples per step (per process)."),
    lr_lm: float | None = typer.Option(None, help="Learning rate of the LM."),
    lr_map: float | None = typer.Option(None, help="Learning rate of the alignment map."),
    alignment_weight: float | None = typer.Option(None, help="m: weight of the alignment term."),
    alignment_scale: list[str] | None = typer.Option(
        None, help="VAR=FACTOR: stretch a teacher variable's dims in the alignment cosine (repeatable)."
    ),
    kl_weight: float | None = typer.Option(None, help="Weight of the KL term on natural text."),
    kl_reduction: str | None = typer.Option(
        None, help="token_mean (default: KL averaged over tokens) or window_sum (the authors' sum per window)."
    ),
    warmup_steps: int | None = typer.Option(None, help="Linear learning-rate warm-up steps."),
    layer_strategy: str | None = typer.Option(
        None, help="Teacher level -> LM hidden state: identity (level i <-> hidden state i), strided or spaced."
    ),
    roll_block: int | None = typer.Option(
        None, help="Block whose output detach-and-roll edits (default: right after the aligned levels)."
    ),
    roll_align: str | None = typer.Option(
        None, help="answer (default: roll the other example in lined up at the answer) or position (paper's code)."
    ),
    subspace_forcing_steps: int | None = typer.Option(
        None, help="Inject: for the first N steps the rolled output subspace holds the teacher's output."
    ),
    probe_every: int | None = typer.Option(
        None, help="Log map decoding and per-term gradient norms every N steps (default 50; 0: off)."
    ),
    accuracy_every: int | None = typer.Option(
        None, help="Log task accuracy on 200 fixed examples of every evaluated split every N steps (0: off)."
    ),
    alignment_balance: str | None = typer.Option(
        None, help="none (default) or early_grad: scale the alignment so its early-block gradient is m x the task's."
    ),
    balance_every: int | None = typer.Option(None, help="early_grad: measure the gradient norms every N steps."),
    balance_cap: float | None = typer.Option(None, help="early_grad: the most the balance multiplies m by."),
    alignment_first_steps: int | None = typer.Option(
        None, help="Inject: the first N steps train the alignment (and KL) alone, no task loss and no roll."
    ),
    map_init: str | None = typer.Option(
        None, help="default (random) or lstsq: the map starts at the least-squares fit on the first examples."
    ),
    clip_per_term: bool | None = typer.Option(
        None, "--clip-per-term/--no-clip-per-term", help="Clip each loss term's gradient on its own, then sum."
    ),
    alignment_variable_weighting: str | None = typer.Option(
        None, help="residual (default: one cosine) or equal: every teacher variable the same mean norm in it."
    ),
    kl_source: str | None = typer.Option(
        None, help="Natural text for the KL term: self (sampled from the model), a local folder, or hf:NAME:SPLIT."
    ),
    mixed_precision: str | None = typer.Option(None, help="no, bf16 or fp16 (where the device supports it)."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay."),
    max_grad_norm: float | None = typer.Option(None, help="Gradient-norm clipping (0: off)."),
    kl_windows: int | None = typer.Option(None, help="Natural-text windows in the KL cache."),
    kl_window_len: int | None = typer.Option(None, help="Tokens per natural-text window."),
    kl_batch_size: int | None = typer.Option(None, help="Natural-text windows per step."),
    kl_top_k: int | None = typer.Option(None, help="Top-k of the original model's distribution kept for the KL."),
    train_split: str | None = typer.Option(None, help="Task split trained on."),
    eval_split: str | None = typer.Option(None, help="Task split scored before and after training."),
    seed: int | None = typer.Option(None, help="Seed for data order, map init and everything else."),
    keep_checkpoints: int | None = typer.Option(None, help="How many of the latest checkpoints to keep."),
    checkpoint_every: int | None = typer.Option(None, help="Save a checkpoint every N steps."),
    eval_examples: int | None = typer.Option(
        None, help="Examples of the eval split scored before and after training (manifest accuracy)."
    ),
    out: str | None = typer.Option(None, help="Run folder."),
    config: Path | None = typer.Option(None, help="YAML file with TrainConfig fields; flags override it."),
    resume: bool = typer.Option(False, help="Continue from the run folder's last checkpoint."),
) -> None:
    """Train an LM on a task with tracr-injection (or the plain fine-tuning baseline)."""
    flags = dict(locals())  # the options are named after the TrainConfig fields they set
    from tracr_injection.inject import TrainConfig, train

    overrides = {f.name: flags[f.name] for f in dataclasses.fields(TrainConfig) if f.name in flags}
    if alignment_scale:
        overrides["alignment_scales"] = parse_alignment_scales(alignment_scale)
    cfg = TrainConfig.load(config, **overrides)
    if out is None and config is None:
        cfg.out = f"runs/{cfg.task}-{cfg.method}-s{cfg.seed}"
    manifest = train(cfg, resume=resume)  # checks the task, model, kl_top_k and a resumed checkpoint first
    split = manifest.eval_split
    console.print(
        f"[bold]{cfg.method}[/] on {cfg.task}: {split} accuracy {100 * manifest.accuracy_before:.1f}% "
        f"before -> {100 * manifest.accuracy_after:.1f}% after ({manifest.eval_examples} examples)"
    )
    typer.echo(cfg.out)


def parse_alignment_scales(items: list[str]) -> dict[str, float]:
    """`["frac_open=10", ...]` -> `{"frac_open": 10.0, ...}`, or a ValueError naming the malformed item."""
    scales = {}
    for item in items:
        name, _, factor = item.partition("=")
        try:
            value = float(factor)  # "" (no "=") raises too
        except ValueError:
            value = None
        if value is None or not name.strip():
            raise InvalidArgumentError(f"--alignment-scale takes VAR=FACTOR (e.g. frac_open=10), got {item!r}.")
        scales[name.strip()] = value
    return scales


def split_summary(task_name: str, info: dict) -> Table:
    """One table of a split's facts."""
    table = Table("property", "value", title=f"{task_name}/{info['split']}")
    for key, value in info.items():
        table.add_row(
            key,
            "yes (teacher can represent it)" if key == "teacher_blocker" and value is None else str(value),
        )
    return table


def alignment_table(bridged, title: str) -> Table:
    """One row per LM token: the token, the teacher's input symbol, the expected output, the loss flag."""
    from tracr_injection.tasks import IGNORE_INDEX

    table = Table("pos", "LM token", "teacher symbol", "teacher output due", "task loss", title=title)
    for pos, (token, symbol) in enumerate(zip(bridged.tokens, bridged.teacher_symbols)):
        expected = bridged.expected[pos]
        table.add_row(
            str(pos),
            repr(token),
            symbol,
            "" if expected is None else expected,
            "answer" if bridged.labels[pos] != IGNORE_INDEX else "",
        )
    return table


def summary_table(teacher: TeacherModel) -> Table:
    """One table of the teacher's size and provenance."""
    config = teacher.config
    table = Table("property", "value", title=f"Teacher {config.program_name}")
    rows = {
        "blocks (attention + MLP)": config.num_layers,
        "heads per block": config.num_heads,
        "key size": config.key_size,
        "MLP hidden size": config.mlp_hidden_size,
        "residual width": config.d_model,
        "parameters": f"{sum(p.numel() for p in teacher.parameters()):,}",
        "max_seq_len": config.max_seq_len,
        "causal": config.causal,
        "output variable": config.output_variable,
        "mlp_exactness": config.mlp_exactness,
        "validation": f"{config.validation.get('num_inputs')} inputs, {config.validation.get('mismatches')} mismatches",
        "tracr version": config.tracr_version,
        "program hash": config.program_hash[:16],
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def variables_table(teacher: TeacherModel, max_values: int = 12) -> Table:
    """Every variable with its encoding, role, level, residual dims and values."""
    table = Table("variable", "encoding", "role", "level", "dims", "values", title="Variables")
    for var in teacher.config.variables:
        dims = f"{var.dims[0]}-{var.dims[-1]} ({len(var.dims)})" if len(var.dims) > 1 else str(var.dims[0])
        shown = ", ".join(map(repr, var.values[:max_values]))
        if len(var.values) > max_values:
            shown += f", ... ({len(var.values)} values)"
        table.add_row(var.name, var.encoding, var.role, str(var.level), dims, shown)
    return table


@app.command("eval")
def eval_command(
    target: str = typer.Argument(..., help="A run folder written by `train`, or a model name/folder."),
    task: str | None = typer.Option(None, help="Task (required for a model; must match a run's task)."),
    out: Path | None = typer.Option(None, help="Output folder (default: RUN_DIR/eval, or eval/<model>-<task>)."),
    max_examples: int | None = typer.Option(None, help="Examples per split (default: all, up to 1000)."),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (when installed and data is available)."
    ),
    add: list[str] | None = typer.Option(
        None, "--add", help="Only compute this part again for an evaluated run (readout, decoding; repeatable)."
    ),
    split: list[str] | None = typer.Option(None, "--split", help="With --add: only these splits (repeatable)."),
    baseline: Path | None = typer.Option(
        None, help="An evaluated baseline run: per variable, this run's map decoding beside its post-hoc probe."
    ),
    base_model: str | None = typer.Option(
        None, help="The model a run started from, when the folder its manifest records is not here."
    ),
    precision: str = typer.Option(
        "fp32", help="The LM's forward passes: fp32, or bf16 autocast (faster with AMX or on a GPU; numbers move "
        "by bf16 rounding). The teacher, decoders and probe fit stay fp32.",
    ),  # fmt: skip
    teacher: str | None = typer.Option(
        None, help="With a model: the task's teacher to decode against (default: the task's; a run keeps its own)."
    ),
) -> None:
    """Evaluate a run: accuracy in and out of distribution, kept language ability, decoding, readout, causal tests."""
    from tracr_injection.evaluate.pipeline import EvalSettings, add_split_parts, evaluate_target
    from tracr_injection.inject.lm import EVAL_PRECISIONS

    if precision not in EVAL_PRECISIONS:
        fail(f"--precision must be one of {', '.join(EVAL_PRECISIONS)}, got {precision!r}")
    if add and teacher is not None:
        fail("--teacher chooses the teacher of a model's evaluation; --add redoes a run's parts with the run's own (omit one)")
    if add:
        typer.echo(add_split_parts(target, add, split, base_model=base_model))
        return

    settings = EvalSettings(lm_eval_tasks=lm_eval.split(",") if lm_eval else [], precision=precision)
    if max_examples is not None:
        settings.max_examples = max_examples
    folder = evaluate_target(
        target, task=task, out=out, settings=settings, baseline=baseline, base_model=base_model, teacher=teacher
    )
    typer.echo((folder / "report.md").read_text())
    typer.echo(folder)


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Evaluated run folders (any tasks, methods and seeds)."),
    out: Path = typer.Option(Path("results/compare"), help="Folder for comparison.md/.csv/.png."),
) -> None:
    """One table over runs, grouped by task and method (mean ± std over seeds), as Markdown, CSV and a plot."""
    from tracr_injection.evaluate.compare import compare_runs

    folder = compare_runs(runs, out)
    typer.echo((folder / "comparison.md").read_text())
    typer.echo(folder)


@app.command("answer-path")
def answer_path_command(
    run: Path = typer.Argument(..., help="An inject run folder written by `train`."),
    examples: int = typer.Option(96, help="Examples measured: the first of the split's seed-0 draw."),
    batch_size: int = typer.Option(8, help="Examples per batch (the roll's donor is the previous row, as in training)."),
    split: str = typer.Option("train", help="Task split measured."),
    base_model: str | None = typer.Option(
        None, help="The model the run started from, when the folder its manifest records is not here."
    ),
) -> None:
    """Does the answer go through the output subspace? Answer CE under edits of the roll block's output, the
    map's output accuracy and the early-block gradient norms of an inject run, as JSON."""
    from tracr_injection.evaluate.answer_path import answer_path, check_sizes
    from tracr_injection.evaluate.subject import is_run_dir, load_subject

    if not is_run_dir(run):
        fail(f"{run} is not a run folder: pass an inject run folder written by `tracr-inject train`.")
    check_sizes(examples, batch_size)  # before the LM loads
    subject = load_subject(run, base_model=base_model)
    typer.echo(json.dumps(answer_path(subject, examples, batch_size, split), indent=2))


@app.command("reproduce")
def reproduce_command(
    task: str = typer.Option("all", help="dyck, count, sum or all (the paper's three), or any registered task."),
    seeds: int = typer.Option(3, help="Seeds per task and method."),
    budget: str = typer.Option("cpu", help="smoke (minutes), demo (~30 min), cpu (hours on 2 cores) or full (paper scale, GPU)."),
    runs_root: Path = typer.Option(Path("runs/reproduce"), help="Where run folders go."),
    results: Path = typer.Option(Path("results"), help="Where tables, plots and run evaluations go."),
    model: str = typer.Option("smollm2", help="The LM to train."),
    method: str = typer.Option("both", help="baseline, inject or both."),
    alignment_scale: list[str] | None = typer.Option(
        None, help="VAR=FACTOR for the inject runs, as in `train` (repeatable; use its own --runs-root/--results)."
    ),
    setting: str | None = typer.Option(
        None,
        help="The inject runs' setting: gate (the sweep's choice in results/injection/gate.json, with its teacher) "
        "or a sweep setting's name; default: no overrides.",
    ),
    status: bool = typer.Option(False, "--status", help="Only show what is done and what is left."),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="Train and evaluate everything anew in a new folder RUNS_ROOT/<budget>-<time>/ (runs and "
        "results); --results is left untouched and named as the reference to compare with.",
    ),
) -> None:
    """Train and evaluate baseline and inject runs (or one method) for each seed, then compare (re-run it to
    continue)."""
    from tracr_injection.experiments.budgets import TASKS, get_budget
    from tracr_injection.experiments.reproduce import (
        DONE_STATES,
        fresh_root,
        plan_runs,
        reproduce,
        run_state,
        status_rows,
    )
    from tracr_injection.experiments.settings import inject_setting
    from tracr_injection.inject.config import METHODS, alignment_scale_flags
    from tracr_injection.tasks import task_names

    tasks = list(TASKS) if task == "all" else [task]
    methods = list(METHODS) if method == "both" else [method]
    if not set(tasks) <= set(task_names()):
        fail(f"Unknown task {task!r}: use all or one of {', '.join(task_names())}")
    if not set(methods) <= set(METHODS):
        fail(f"--method must be baseline, inject or both, got {method!r}")
    reference = results / budget / "comparison.md"
    scales = parse_alignment_scales(alignment_scale or [])
    choice = inject_setting(setting) if setting is not None else None
    if choice is not None:
        console.print(f"inject setting {choice['name']} ({choice['source']}): {choice['overrides']}", highlight=False)
    if fresh and not status:
        runs_root = fresh_root(runs_root, get_budget(budget).name)
        results = runs_root / "results"
    plan = (tasks, seeds, get_budget(budget), runs_root, model, results, methods, scales, choice)
    if status:
        rows = status_rows(plan_runs(*plan))
        table = Table(*rows[0].keys(), title=f"reproduce --budget {budget}")
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row.values()))
        console.print(table)
        return
    command = f"tracr-inject reproduce --task {task} --seeds {seeds} --budget {budget} --model {model}"
    command += "" if method == "both" else f" --method {method}"
    command += "" if runs_root == Path("runs/reproduce") else f" --runs-root {runs_root}"
    command += "" if results == Path("results") else f" --results {results}"
    command += "".join(f" {flag}" for flag in alignment_scale_flags(scales))
    command += "" if setting is None else f" --setting {setting}"
    try:
        folder = reproduce(
            tasks, seeds, budget, runs_root=runs_root, results_root=results, model=model, methods=methods,
            alignment_scales=scales, setting=choice, command=command,
            on_run=lambda run, state: console.print(f"[bold]{run.name}[/]: {state}"),
        )  # fmt: skip
    except KeyboardInterrupt:
        typer.echo(f"Interrupted; continue where it stopped with:\n  {command}", err=True)
        raise typer.Exit(130) from None
    for run in plan_runs(*plan):
        if run_state(run) not in DONE_STATES:
            console.print(f"{run.name}: {run_state(run)} (another process is on it, or it stopped; run again)")
            continue
        manifest = run.published_folder.read_manifest()
        split = manifest.eval_split
        console.print(
            f"{run.name}: {split} accuracy {100 * manifest.accuracy_before:.1f}% before training -> "
            f"{100 * manifest.accuracy_after:.1f}% after ({manifest.eval_examples} examples)"
        )
    typer.echo((folder / "comparison.md").read_text())
    if fresh and reference.is_file():
        typer.echo(f"Compare with the committed reference: {reference}")
    typer.echo(folder)


@app.command("ood")
def ood_command(
    seeds: int = typer.Option(5, help="Seeds per method (paired: same seed, same data and evaluation sets)."),
    setting: str | None = typer.Option(
        None, help="A sweep setting for the inject runs (default: results/injection/gate.json's, else m1)."
    ),
    gate: Path = typer.Option(Path("results/injection/gate.json"), help="The sweep's choice, used when present."),
    budget: str = typer.Option("ood", help="ood (the cpu budget, accuracy on 1,000 per split) or smoke."),
    runs_root: Path = typer.Option(Path("runs/ood"), help="Where run folders go."),
    results: Path = typer.Option(Path("results/ood"), help="Where evaluations, comparison, summary.json go."),
    model: str = typer.Option("smollm2", help="The LM to train."),
    status: bool = typer.Option(False, "--status", help="Only show each planned run's state."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the setting and each train command."),
    publish_only: bool = typer.Option(
        False, "--publish-only", help="Only publish the evaluated runs (comparison, summary.json); train nothing."
    ),
) -> None:
    """Inject against baseline on Dyck out of distribution, paired over seeds, with bootstrap intervals and
    accuracy over training (start it in two shells to share the plan; re-run it to continue)."""
    from tracr_injection.experiments.ood import ood, ood_budget, plan_ood, verdict_line
    from tracr_injection.experiments.reproduce import status_rows
    from tracr_injection.experiments.settings import inject_setting

    if seeds < 1:
        fail(f"--seeds must be at least 1, got {seeds}")
    choice = inject_setting(setting, gate)
    if status or dry_run:
        line = f"inject setting {choice['name']} ({choice['source']}): {choice['overrides']}"
        console.print(line, highlight=False)
        runs = plan_ood(seeds, choice, ood_budget(budget), runs_root, results, model)
        for run, row in zip(runs, status_rows(runs)):
            console.print(f"{run.name}: {row['state']}, {row['steps']} steps", highlight=False)
            if dry_run:
                typer.echo(f"  {run.config.command()}")
        return
    command = f"tracr-inject ood --seeds {seeds} --budget {budget} --gate {gate} --model {model}"
    command += f" --setting {setting}" if setting else ""
    command += f" --runs-root {runs_root} --results {results}"
    folder = ood(
        seeds, setting, budget, gate=gate, runs_root=runs_root, results_root=results, model=model,
        command=command, on_run=lambda run, state: console.print(f"[bold]{run.name}[/]: {state}"),
        publish_only=publish_only,
    )  # fmt: skip
    if (folder / "comparison.md").is_file():
        typer.echo((folder / "comparison.md").read_text())
    if (folder / "summary.json").is_file():
        typer.echo(verdict_line(json.loads((folder / "summary.json").read_text())))
    typer.echo(folder)


@app.command("sweep")
def sweep_command(
    teacher: list[str] | None = typer.Option(None, help="Teacher(s) of Dyck (repeatable; default both)."),
    setting: list[str] | None = typer.Option(None, help="Setting(s) to run (repeatable; default all, in order)."),
    long: str = typer.Option("auto", help="The long run's setting: auto (the best finished one), a name, or none."),
    long_steps: int = typer.Option(1500, help="Steps of the long run."),
    budget: str = typer.Option("sweep", help="sweep (the levers' budget) or a reproduce budget (smoke: a check)."),
    runs_root: Path = typer.Option(Path("runs/injection"), help="Where run folders go."),
    results: Path = typer.Option(Path("results/injection"), help="Where evaluations, summary and gate.json go."),
    model: str = typer.Option("smollm2", help="The LM to train."),
    status: bool = typer.Option(False, "--status", help="Only show each planned run's state."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the plan: each run's overrides and command."),
) -> None:
    """The alignment levers on Dyck, seed 0, one resumable run per setting and teacher, then a long run and
    gate.json (start it in several shells to share the plan; re-run it to continue)."""
    from tracr_injection.experiments.injection_sweep import (
        TEACHERS,
        plan_rows,
        plan_sweep,
        sweep,
        sweep_budget,
    )
    from tracr_injection.experiments.settings import SETTINGS

    teachers, settings = teacher or list(TEACHERS), setting or list(SETTINGS)
    long_setting = None if long == "none" else long
    if long_setting not in (None, "auto", *SETTINGS):
        fail(f"--long must be auto, none or one of {', '.join(SETTINGS)}, got {long!r}")
    from tracr_injection.tasks import get_task

    for name in teachers:
        get_task("dyck").teacher_program(name)  # an unknown teacher fails before anything runs
    if status or dry_run:
        runs = plan_sweep(teachers, settings, sweep_budget(budget), runs_root, results, model)
        for row in plan_rows(runs):
            line = f"{row['teacher']}/{row['setting']}: {row['state']}, {row['steps']} steps {row['overrides']}"
            console.print(line, highlight=False)
            if dry_run:
                typer.echo(f"  {row['command']}")
        return
    command = f"tracr-inject sweep --budget {budget} --long {long} --long-steps {long_steps} --model {model}"
    command += "".join(f" --teacher {t}" for t in teacher or []) + "".join(f" --setting {s}" for s in setting or [])
    command += f" --runs-root {runs_root} --results {results}"
    folder = sweep(
        teachers, settings, budget, runs_root=runs_root, results_root=results, model=model,
        long_setting=long_setting, long_steps=long_steps, command=command,
        on_run=lambda run, state: console.print(f"[bold]{run.config.teacher}/{run.name}[/]: {state}"),
    )  # fmt: skip
    typer.echo((folder / "summary.md").read_text())
    typer.echo(folder)
