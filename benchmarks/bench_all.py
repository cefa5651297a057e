"""The project's headline performance numbers in one run, against its stated targets.

Measured, by importing the single-purpose benchmark scripts next to this file:

1. teacher compile (``bench_compile.measure``, each compile in a fresh subprocess): the task's
   program (for ``dyck``, Shuffle-Dyck with a trigger) compiled by plain tracr and by our
   ``fast_craft`` path at ``--compile-len`` (plain tracr is minutes at 40 and grows fast), plus
   ours at the task's real teacher length; wall time and the child's peak RSS for each;
2. training step (``bench_train``): median seconds per step of inject, baseline and naive inject
   (the teacher and a frozen original LM run every step) over ``--train-steps`` steps, their
   ratios, tokens per second (real task-batch tokens plus KL-window tokens per step, divided by
   the median step time) and peak memory (process peak RSS; ``torch.cuda.max_memory_allocated``
   on CUDA); then baseline and inject again with the forward pass under bf16 autocast (what
   ``--mixed-precision bf16`` trains with), written to ``run_cost.json`` as ``step_fp32_s`` and
   ``step_bf16_s`` (inject) beside the baseline's;
3. evaluation (``bench_generation.bench_task``): batched greedy generation against one
   ``model.generate`` call per prompt on the task's test prompts, in prompts per second;
4. with ``--eval-run RUN``, a whole ``tracr-inject eval`` of a trained run (``bench_eval.measure``):
   the code before the shared split pass against this checkout, one after the other, written to
   ``run_cost.json`` (``eval_seconds_before``, ``eval_seconds_after``, ``eval_parts_after``, ...).

Targets checked: inject step <= 1.10 x baseline, inject step <= 0.6 x naive, batched evaluation
>= 10 x one-by-one.  Prints the tables and writes ``all.json`` and ``all.md`` to ``--out``
(default ``benchmarks/results``).  The compile subprocesses run JAX on the CPU whatever
``--device`` says.

    python benchmarks/bench_all.py [--task dyck] [--model smollm2] [--device cuda|cpu] [--threads 2]
    python benchmarks/bench_all.py --quick --threads 1 --out /tmp/bench_quick   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_compile
import bench_eval
import bench_generation
import bench_train

from tracr_injection.compile.exactness import exactness_candidates
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig
from tracr_injection.inject.data import batch_positions
from tracr_injection.inject.lm import load_causal_lm
from tracr_injection.inject.objective import RunParts
from tracr_injection.inject.run import versions
from tracr_injection.programs.registry import get_program
from tracr_injection.tasks import get_task

KINDS = ("inject", "baseline", "naive")
BUSY_LOAD = 0.5  # a 1-minute load average above this before starting means other processes used the CPU


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section measures; None for teacher_len means the task's real teacher length."""

    compile_len: int
    teacher_len: int | None
    train_steps: int
    batch_size: int
    gen_prompts: int
    gen_batch_size: int


FULL = Sizes(
    compile_len=20, teacher_len=None, train_steps=12, batch_size=8, gen_prompts=200, gen_batch_size=64
)
QUICK = Sizes(compile_len=8, teacher_len=None, train_steps=2, batch_size=2, gen_prompts=8, gen_batch_size=4)


@dataclasses.dataclass(frozen=True)
class Target:
    """A stated performance target: `measured <= bound` (or `>=` when not `at_most`)."""

    name: str
    bound: float
    at_most: bool

    def check(self, measured: float) -> dict[str, Any]:
        """The target with its measured value and whether it is met."""
        met = measured <= self.bound if self.at_most else measured >= self.bound
        required = f"{'<=' if self.at_most else '>='} {self.bound:g}x"
        return {"target": self.name, "measured": measured, "required": required, "met": met}


TARGETS = {
    "inject_over_baseline": Target("inject step / baseline step", 1.10, at_most=True),
    "inject_over_naive": Target("inject step / naive step", 0.6, at_most=True),
    "batched_speedup": Target("batched eval / one-by-one eval (prompts/s)", 10.0, at_most=False),
}


def compile_section(task_name: str, compare_len: int, teacher_len: int | None) -> dict[str, Any]:
    """Plain tracr vs fast_craft on the task's program at `compare_len`, and fast_craft at `teacher_len`."""
    task = get_task(task_name)
    spec = get_program(task.program)
    teacher_len = teacher_len or task.teacher_max_len
    build_fn = bench_compile.REGISTERED + task.program
    vocab = sorted(spec.vocab, key=repr)

    def measure(max_len: int, fast: bool) -> dict[str, Any]:
        print(f"compiling {task.program} N={max_len} {'ours' if fast else 'plain'} ...", flush=True)
        exactness = exactness_candidates(max_len)[0]
        return bench_compile.measure(build_fn, vocab, max_len, spec.causal, fast, mlp_exactness=exactness)

    plain, ours = measure(compare_len, False), measure(compare_len, True)
    ours_teacher = measure(teacher_len, True)
    measured = "error" not in plain and "error" not in ours
    return {
        "program": task.program,
        "runs": {"plain": plain, "ours": ours, "ours_teacher_len": ours_teacher},
        "speedup": plain["compile_s"] / ours["compile_s"] if measured else None,
        "identical_weights": plain["params_sha256"] == ours["params_sha256"] if measured else None,
    }


def tokens_per_step(config: TrainConfig, parts: RunParts, steps: int) -> float:
    """Mean real tokens per timed step (steps 1..`steps`; 0 is the warm-up): task batch plus KL windows."""
    task_tokens = [
        sum(len(parts.data.bridged[p]) for p in batch_positions(step, config.batch_size, len(parts.data)))
        for step in range(1, steps + 1)
    ]
    return statistics.mean(task_tokens) + config.kl_batch_size * parts.kl_cache.window_len


def train_section(task: str, model: str, steps: int, batch_size: int, device: str) -> dict[str, Any]:
    """Median step times of inject, baseline and naive, their ratios, tokens/s and peak memory."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    config, parts, original = bench_train.setup(task, model, steps, batch_size, device)
    medians = bench_train.median_step_times(config, parts, original, steps, device)
    bf16 = bench_train.median_step_times(config, parts, original, steps, device, "bf16", ("baseline", "inject"))
    tokens = tokens_per_step(config, parts, steps)
    return {
        "steps": steps,
        "batch_size": batch_size,
        "kl_batch_size": config.kl_batch_size,
        "kl_window_len": parts.kl_cache.window_len,
        "kl_top_k": config.kl_top_k,
        "tokens_per_step": tokens,
        "median_step_s": medians,
        "median_step_s_bf16": bf16,
        "bf16_speedup": {kind: medians[kind] / bf16[kind] for kind in bf16},
        "tokens_per_s": {kind: tokens / medians[kind] for kind in KINDS},
        "inject_over_baseline": medians["inject"] / medians["baseline"],
        "inject_over_naive": medians["inject"] / medians["naive"],
        "peak_rss_mb": bench_train.peak_rss_mb(),
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
    }


def generation_section(
    task: str, model_name: str, prompts: int, batch_size: int, device: str
) -> dict[str, Any]:
    """Batched greedy generation vs one `generate` call per prompt on `prompts` test prompts."""
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name).to(device)
    case = bench_generation.bench_task(model, tokenizer, task, prompts, batch_size, None)
    rows = case["methods"]
    return {
        **case,
        "batch_size": batch_size,
        "batched_speedup": rows[f"batched_{batch_size}"]["speedup"],
        "one_by_one_prompts_per_s": rows[bench_generation.BASELINE]["examples_per_s"],
        "batched_prompts_per_s": rows[f"batched_{batch_size}"]["examples_per_s"],
    }


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo (or platform's guess)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str, load_before: float) -> dict[str, Any]:
    """Device, threads, load, date and versions the numbers were measured with."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(load_before, 2),
        "cpu_shared_with_other_processes": load_before > BUSY_LOAD,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions(),
        "tracr": importlib.metadata.version("tracr-pypi"),
    }


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """`value` formatted, or a dash when it was not measured."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


TableSpec = tuple[str, list[str], list[list[str]]]  # title, column headers, rows of cells


def compile_table(section: dict[str, Any]) -> TableSpec:
    """One row per compile: mode, N, seconds, peak RSS, RSS added, d_model, speed-up over plain."""
    weights = {True: "identical", False: "DIFFER", None: "-"}[section["identical_weights"]]
    labels = {"plain": "plain tracr", "ours": "ours (fast_craft)", "ours_teacher_len": "ours (fast_craft)"}
    rows = []
    for key, run in section["runs"].items():
        if "error" in run:
            error = run["error"].strip().splitlines() or ["?"]
            rows.append([labels[key], str(run["max_seq_len"]), "ERROR: " + error[-1], "", "", "", ""])
            continue
        rows.append(
            [
                labels[key],
                str(run["max_seq_len"]),
                f"{run['compile_s']:.2f}",
                f"{run['peak_rss_mb']:.0f}",
                f"{run['peak_rss_mb'] - run['baseline_rss_mb']:.0f}",
                str(run["d_model"]),
                fmt(section["speedup"] if key == "ours" else None, ".1f", "x"),
            ]
        )
    return (
        f"Teacher compile: {section['program']} (plain vs ours weights: {weights})",
        ["mode", "max_seq_len", "compile (s)", "peak RSS (MiB)", "added RSS (MiB)", "d_model", "speed-up"],
        rows,
    )


def train_tables(train: dict[str, Any], device: str) -> list[TableSpec]:
    """Step time, ratio to baseline and tokens/s per kind; then the peak memory."""
    medians = train["median_step_s"]
    title = (
        f"Training step ({device}, batch {train['batch_size']} + KL {train['kl_batch_size']}"
        f"x{train['kl_window_len']}, median of {train['steps']} steps, {train['tokens_per_step']:.0f} tokens/step)"
    )
    rows = [
        [
            kind,
            f"{medians[kind]:.3f}",
            f"{medians[kind] / medians['baseline']:.2f}x",
            f"{train['tokens_per_s'][kind]:.1f}",
        ]
        for kind in KINDS
    ]
    bf16 = train["median_step_s_bf16"]
    rows += [
        [f"{kind} (bf16)", f"{bf16[kind]:.3f}", f"{bf16[kind] / medians['baseline']:.2f}x",
         f"{train['tokens_per_step'] / bf16[kind]:.1f}"]
        for kind in bf16
    ]  # fmt: skip
    memory = [["process peak RSS", f"{train['peak_rss_mb']:.0f}"]]
    if train["cuda_max_allocated_mb"] is not None:
        memory.append(["torch.cuda.max_memory_allocated", f"{train['cuda_max_allocated_mb']:.0f}"])
    return [
        (title, ["kind", "median step (s)", "x baseline", "tokens/s"], rows),
        ("Training peak memory", ["measure", "MiB"], memory),
    ]


def generation_table(gen: dict[str, Any]) -> TableSpec:
    """Time, prompts/s and speed-up over one `generate` per prompt, per method."""
    rows = [
        [
            name,
            f"{r['seconds']:.2f}",
            f"{r['examples_per_s']:.2f}",
            f"{r['speedup']:.2f}x",
            str(r["identical_answers"]),
        ]
        for name, r in gen["methods"].items()
    ]
    return (
        f"Evaluation: {gen['prompts']} test prompts, {gen['max_new_tokens']} new tokens",
        ["method", "time (s)", "prompts/s", "speed-up", "identical answers"],
        rows,
    )


def targets_table(targets: list[dict[str, Any]]) -> TableSpec:
    """Each stated target with its measured value and whether it is met."""
    rows = [
        [t["target"], f"{t['measured']:.2f}x", t["required"], "met" if t["met"] else "NOT met"]
        for t in targets
    ]
    return ("Targets", ["target", "measured", "required", "status"], rows)


def tables(results: dict[str, Any]) -> list[TableSpec]:
    """The whole report as tables, rendered both to the terminal and to markdown."""
    env = results["environment"]
    return [
        compile_table(results["compile"]),
        *train_tables(results["train"], env["device"]),
        generation_table(results["generation"]),
        targets_table(results["targets"]),
        ("Environment", ["setting", "value"], [[key, str(value)] for key, value in env.items()]),
    ]


def print_tables(report: list[TableSpec]) -> None:
    """Render the tables with rich."""
    console = Console(width=140)
    for title, headers, rows in report:
        table = Table(*headers, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(report: list[TableSpec]) -> str:
    """The tables as one markdown document."""
    lines = ["# Headline benchmarks (benchmarks/bench_all.py)", ""]
    for title, headers, rows in report:
        lines += [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    """The --quick or full sizes, with any size flag given overriding them."""
    base = QUICK if args.quick else FULL
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(base, **given)


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="dyck")
    parser.add_argument("--model", default="smollm2", help="LM name or path (default: the offline SmolLM2)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder for all.json, all.md")
    parser.add_argument(
        "--eval-run",
        type=Path,
        default=None,
        help="a trained run folder: also time its evaluation, before vs after",
    )
    sizes = parser.add_argument_group("sizes (default: full run, or --quick's)")
    sizes.add_argument("--compile-len", type=int, help=f"max_seq_len of plain vs ours ({FULL.compile_len})")
    sizes.add_argument(
        "--teacher-len", type=int, help="max_seq_len of ours alone (the task's teacher length)"
    )
    sizes.add_argument("--train-steps", type=int, help=f"timed steps per kind ({FULL.train_steps})")
    sizes.add_argument("--batch-size", type=int, help=f"training batch size ({FULL.batch_size})")
    sizes.add_argument("--gen-prompts", type=int, help=f"test prompts generated ({FULL.gen_prompts})")
    sizes.add_argument(
        "--gen-batch-size", type=int, help=f"batched generation's batch ({FULL.gen_batch_size})"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = resolve_sizes(args)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: dict[str, Any] = {"sizes": dataclasses.asdict(sizes), "model": args.model, "task": args.task}
    results["compile"] = compile_section(args.task, sizes.compile_len, sizes.teacher_len)
    results["train"] = train_section(args.task, args.model, sizes.train_steps, sizes.batch_size, args.device)
    results["generation"] = generation_section(
        args.task, args.model, sizes.gen_prompts, sizes.gen_batch_size, args.device
    )
    measured = {
        "inject_over_baseline": results["train"]["inject_over_baseline"],
        "inject_over_naive": results["train"]["inject_over_naive"],
        "batched_speedup": results["generation"]["batched_speedup"],
    }
    results["targets"] = [target.check(measured[key]) for key, target in TARGETS.items()]
    results["environment"] = {
        "mode": "quick: tiny sizes, a smoke test, not a measurement" if args.quick else "full",
        **environment(args.device, load_before),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "total_s": round(time.perf_counter() - started, 1),
    }
    report = tables(results)
    print_tables(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "all.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "all.md").write_text(markdown(report))
    print(f"wrote {args.out / 'all.json'} and {args.out / 'all.md'}")
    step_cost = {
        "step_fp32_s": results["train"]["median_step_s"]["inject"],
        "step_bf16_s": results["train"]["median_step_s_bf16"]["inject"],
        "step_baseline_fp32_s": results["train"]["median_step_s"]["baseline"],
        "step_baseline_bf16_s": results["train"]["median_step_s_bf16"]["baseline"],
        "step_note": f"median inject/baseline step, bf16 autocast forward vs fp32, {args.task}, {args.model}, "
        f"batch {sizes.batch_size}, {torch.get_num_threads()} threads, {results['environment']['mode']}",
    }
    bench_eval.write_run_cost(step_cost, args.out)
    if args.eval_run is not None:
        cost = bench_eval.measure(args.eval_run, bench_eval.BEFORE_REF, threads=args.threads or 1)
        bench_eval.write_run_cost(cost, args.out)
        print(
            f"evaluation {cost['speedup_wall']}x faster (wall), {cost['speedup_cpu']}x (CPU); wrote {args.out / 'run_cost.json'}"
        )


if __name__ == "__main__":
    main()
