"""Benchmark: batched greedy decoding (left padding, KV cache) against the paper's one `generate` per prompt.

On the real SmolLM2-135M-Instruct (fp32), for test prompts of Dyck (200) and Count (100): wall time and
examples/s of (1) one `model.generate` call per prompt (the paper's evaluation code), (2) our cached loop
one prompt at a time (separates the batching gain from `generate`'s own overhead) and (3) our loop in
batches of 64; the speedup over (1) and whether every method gives identical answers (token ids).
Each method decodes as many tokens as the task's longest answer (EOS included), the number accuracy
needs; a third, decode-heavy case lets 64 Dyck prompts run on for up to 16 new tokens (as an untrained
model or a longer answer would).  Writes benchmarks/results/generation.json and prints a table.

    python benchmarks/bench_generation.py [--dyck 200] [--count 100] [--long 64] [--long-tokens 16]
        [--batch-size 64] [--threads 1]

The CPU is shared with other jobs, so times are upper bounds; the load average is recorded.  On a CPU
the prompt pass dominates a short answer and costs the same FLOPs batched or not, so batching gains only
the matrix-multiply efficiency and the per-token decode steps; on a GPU one prompt at a time is latency
bound and the gain is far larger.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from tracr_injection.evaluate.generation import generate_one_by_one, greedy_generate
from tracr_injection.hub import load_tokenizer
from tracr_injection.inject.data import run_subset
from tracr_injection.inject.lm import load_causal_lm
from tracr_injection.tasks import TokenBridge, get_task

RESULTS = Path(__file__).parent / "results" / "generation.json"
BASELINE = "one_by_one_generate"


def task_prompts(tokenizer: Any, task_name: str, count: int) -> tuple[list[list[int]], int]:
    """A seeded subset of `count` test prompts (token ids) and the longest answer's token count."""
    task = get_task(task_name)
    examples = task.examples("test")
    bridged = TokenBridge(tokenizer, task).bridge_all(
        [examples[i] for i in run_subset(len(examples), count, 0)]
    )
    return [b.input_ids[: b.prompt_len] for b in bridged], max(len(b) - b.prompt_len for b in bridged)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float]:
    """The function's result and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_task(
    model: Any, tokenizer: Any, task_name: str, count: int, batch_size: int, new_tokens: int | None
) -> dict[str, Any]:
    """Time the three methods on one task's prompts; compare their answers with the baseline's.

    `new_tokens` overrides the longest answer's length as the number of tokens to decode.
    """
    prompts, max_new = task_prompts(tokenizer, task_name, count)
    max_new = new_tokens or max_new
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    methods = {
        BASELINE: lambda: generate_one_by_one(model, prompts, max_new_tokens=max_new, **ids),
        "cached_loop_batch_1": lambda: greedy_generate(
            model, prompts, max_new_tokens=max_new, batch_size=1, **ids
        ),
        f"batched_{batch_size}": lambda: greedy_generate(
            model, prompts, max_new_tokens=max_new, batch_size=batch_size, **ids
        ),
    }
    greedy_generate(model, prompts[:2], max_new_tokens=max_new, **ids)  # warm-up
    outputs, rows = {}, {}
    for name, fn in methods.items():
        outputs[name], seconds = timed(fn)
        rows[name] = {"seconds": round(seconds, 2), "examples_per_s": round(len(prompts) / seconds, 2)}
        print(f"{task_name} ({len(prompts)} prompts, {max_new} new tokens) {name}: {rows[name]}", flush=True)
    for name, row in rows.items():
        row["speedup"] = round(rows[BASELINE]["seconds"] / row["seconds"], 2)
        row["identical_answers"] = outputs[name] == outputs[BASELINE]
    lengths = [len(p) for p in prompts]
    return {
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "prompt_tokens_max": max(lengths),
        "max_new_tokens": max_new,
        "sample_answers": [tokenizer.decode(o) for o in outputs[BASELINE][:3]],
        "methods": rows,
    }


def print_table(tasks: dict[str, dict[str, Any]]) -> None:
    """One row per (case, method)."""
    table = Table("case", "prompts", "new tokens", "method", "seconds", "examples/s", "speedup", "identical")
    for task_name, t in tasks.items():
        for name, r in t["methods"].items():
            table.add_row(
                task_name, str(t["prompts"]), str(t["max_new_tokens"]), name, f"{r['seconds']:.1f}",
                f"{r['examples_per_s']:.2f}", f"{r['speedup']:.2f}x", str(r["identical_answers"]),
            )  # fmt: skip
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dyck", type=int, default=200)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--long", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    load_before = os.getloadavg()
    cases = [
        ("dyck", "dyck", args.dyck, None),
        ("count", "count", args.count, None),
        (f"dyck_{args.long_tokens}_new_tokens", "dyck", args.long, args.long_tokens),
    ]
    tasks = {
        name: bench_task(model, tokenizer, task_name, count, args.batch_size, new_tokens)
        for name, task_name, count, new_tokens in cases
        if count > 0
    }
    results = {
        "meta": {
            "model": args.model,
            "dtype": str(next(model.parameters()).dtype),
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "note": "shared CPU: times are upper bounds",
        },
        "tasks": tasks,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print_table(tasks)


if __name__ == "__main__":
    main()
