"""Benchmark: CPU seconds per inject step of SmolLM2 under the training step's kernel choices.

Four variants of the same step (Dyck, batch 8 + the KL batch, forward in fp32 or under bf16 autocast):
SDPA or eager attention, for-loop or fused AdamW.  Training uses eager + fused on CPU
(`inject.lm.use_training_attention`, `inject.trainer.make_optimizer`); the others are what it used before.
Process CPU seconds (not wall) per step, median over the timed steps after one warm-up, so that a machine
shared with other work moves the numbers less.  Writes benchmarks/results/step_kernels.json.

    python benchmarks/bench_step_kernels.py [--steps 4] [--threads 1] [--precision bf16 --precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_train import precision_context, setup

from tracr_injection.inject.data import batch_positions
from tracr_injection.inject.objective import InjectionObjective
from tracr_injection.inject.trainer import make_optimizer

VARIANTS = [("sdpa", False), ("sdpa", True), ("eager", False), ("eager", True)]


def step_cpu_seconds(config, parts, optimizer, precision: str, steps: int) -> float:
    """Median process CPU seconds of `steps` inject steps after one warm-up (the same batches every variant)."""
    objective = InjectionObjective(config, parts)
    seconds = []
    for step in range(steps + 1):
        began = time.process_time()
        batch = parts.data.collate(batch_positions(step, config.batch_size, len(parts.data)))
        kl_batch = parts.kl_cache.batch(batch_positions(step, config.kl_batch_size, len(parts.kl_cache)))
        with precision_context(precision, "cpu"):
            loss, _ = objective(batch, kl_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.process_time() - began)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "step_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, parts, _ = setup("dyck", "smollm2", args.steps, 8)
    model = parts.model
    result = {"task": "dyck", "model": "smollm2", "batch_size": 8, "threads": args.threads, "steps": args.steps,
              "load_average_before": os.getloadavg()[0], "cpu_s_per_step": {}}  # fmt: skip
    for precision in args.precision or ["bf16", "fp32"]:
        rows = result["cpu_s_per_step"].setdefault(precision, {})
        for attention, fused in VARIANTS:
            model.set_attn_implementation(attention)
            optimizer = make_optimizer(config, model, parts.amap, fused=fused)
            name = f"{attention}+{'fused' if fused else 'loop'}_adamw"
            rows[name] = round(step_cpu_seconds(config, parts, optimizer, precision, args.steps), 3)
            print(f"{precision} {name}: {rows[name]:.2f} CPU s/step", flush=True)
        rows["speedup_eager_fused_over_sdpa_loop"] = round(rows["sdpa+loop_adamw"] / rows["eager+fused_adamw"], 2)
    result["load_average_after"] = os.getloadavg()[0]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
