"""Benchmark: time and disk of precomputing teacher targets for the paper's tasks at full data size.

For each task and each split the teacher can represent (train at its full size included):
time to generate the examples, bridge them (SmolLM2 tokens by default), run the teacher and
store its residuals; disk used, against what dense float16 residuals at every level would
take.  Writes benchmarks/results/targets.json and prints a table.

    python benchmarks/bench_targets.py [--tasks dyck count sum] [--tokenizer smollm2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tracr_injection.hub import load_tokenizer
from tracr_injection.tasks import TokenBridge, get_task, teacher_blocker
from tracr_injection.tasks.targets import precompute_targets


def bench_split(task_name: str, split: str, tokenizer: str, teacher, out: Path) -> dict | None:
    """Generate, bridge and precompute one split; None if the teacher cannot represent it."""
    task = get_task(task_name)
    start = time.perf_counter()
    examples = task.examples(split)
    generated = time.perf_counter()
    bridged = TokenBridge(load_tokenizer(tokenizer), task).bridge_all(examples)
    bridged_at = time.perf_counter()
    if teacher_blocker(bridged, task, split, teacher.config.max_seq_len):
        return None
    manifest = precompute_targets(
        teacher, bridged, out / task_name / split, task=task_name, split=split, tokenizer=tokenizer
    )
    tokens = sum(manifest.lengths)
    dense_fp16 = tokens * manifest.d_model * manifest.num_levels * 2
    return {
        "task": task_name,
        "split": split,
        "examples": len(examples),
        "tokens": tokens,
        "generate_s": round(generated - start, 2),
        "bridge_s": round(bridged_at - generated, 2),
        "teacher_s": round(manifest.seconds, 1),
        "examples_per_s": round(len(examples) / manifest.seconds, 1),
        "disk_mb": round(manifest.bytes_on_disk / 1e6, 2),
        "dense_fp16_all_levels_mb": round(dense_fp16 / 1e6, 1),
        "compression": round(dense_fp16 / manifest.bytes_on_disk, 1),
        "value_dtype": manifest.value_dtype,
        "max_float16_error": manifest.max_float16_error,
        "teacher_answer_accuracy": manifest.answer_accuracy,
        "d_teacher": manifest.d_model,
        "levels": manifest.num_levels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["dyck", "count", "sum"])
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="Where to store targets (default: a temp folder)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the stored targets.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "targets.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="targets-bench-"))
    rows = []
    try:
        for name in args.tasks:
            teacher = get_task(name).teacher()
            for split in get_task(name).split_names:
                row = bench_split(name, split, args.tokenizer, teacher, out)
                if row:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.results.is_file():  # keep rows of tasks not re-run
        previous = json.loads(args.results.read_text()).get("rows", [])
        rows = [r for r in previous if r["task"] not in args.tasks] + rows
    args.results.write_text(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
                "tokenizer": args.tokenizer,
                "rows": rows,
            },
            indent=2,
        )
    )
    table = Table(
        *["task", "split", "examples", "teacher s", "ex/s", "disk MB", "dense fp16 MB", "x smaller", "acc"]
    )
    for r in rows:
        table.add_row(
            r["task"], r["split"], str(r["examples"]), str(r["teacher_s"]), str(r["examples_per_s"]),
            str(r["disk_mb"]), str(r["dense_fp16_all_levels_mb"]), str(r["compression"]),
            f"{100 * r['teacher_answer_accuracy']:.1f}%",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
