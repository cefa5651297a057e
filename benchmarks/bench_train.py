"""Benchmark: median training-step time of inject vs baseline vs a naive inject step, in one process.

The naive step does what an implementation without precomputation does every step: runs the
compiled teacher on the batch for the alignment targets and a frozen copy of the original
model on the natural text for an exact KL, besides the student.  Ours reads stored targets
and a top-k KL cache.  Targets: inject <= 1.10 x baseline and inject <= 0.6 x naive.
With `--bf16`, baseline and inject are timed again with the forward under bf16 autocast (as the CPU
budgets train).  Writes benchmarks/results/train_step.json (or `--results`).

    python benchmarks/bench_train.py [--task dyck] [--model smollm2] [--steps 6] [--batch-size 8] [--bf16]

The reproduce workers' setting, two 1-thread processes side by side (`results/tuning/bf16/README.md`):

    for w in 1 2; do python benchmarks/bench_train.py --threads 1 --steps 8 --bf16 \
        --results /tmp/worker$w.json & done; wait
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tracr_injection.hub import load_tokenizer
from tracr_injection.inject import TrainConfig
from tracr_injection.inject.data import batch_positions
from tracr_injection.inject.lm import load_causal_lm, use_training_attention
from tracr_injection.inject.objective import InjectionObjective, RunParts, exact_kl
from tracr_injection.inject.trainer import build_parts, make_optimizer


def teacher_targets_now(
    teacher, parts, positions: list[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the teacher on the batch (what the naive step does instead of reading stored targets)."""
    rows = [parts.data.bridged[p].teacher_symbols for p in positions]
    output, mask = teacher.run(rows)
    final = torch.zeros(len(rows), width, teacher.config.d_model, device=teacher.device)
    final[:, : output.residuals[-1].shape[1] - 1] = output.residuals[-1][:, 1:]
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=teacher.device)
    real[:, : mask.shape[1] - 1] = mask[:, 1:]
    return final, real


def precision_context(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The forward pass's autocast, as training's `Accelerator(mixed_precision=...)` sets it: bf16 or none."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed_steps(
    kind: str, objective, optimizer, parts, config, steps: int, teacher=None, original=None, device="cpu",
    precision: str = "fp32",
) -> list[float]:
    """Seconds per full step (forward under `precision`, backward, AdamW) of one kind, batches on `device`."""
    times = []
    for step in range(steps):
        began = time.perf_counter()
        positions = batch_positions(step, config.batch_size, len(parts.data))
        batch = {k: v.to(device) for k, v in parts.data.collate(positions).items()}
        kl_batch = parts.kl_cache.batch(
            batch_positions(step, config.kl_batch_size, len(parts.kl_cache)), device=device
        )
        if kind == "naive":
            batch["teacher_final"], batch["teacher_mask"] = teacher_targets_now(
                teacher, parts, positions, batch["input_ids"].shape[1]
            )
            loss, _ = objective(batch, kl_batch)
            with torch.no_grad():
                original_logits = original(input_ids=kl_batch["input_ids"]).logits
            loss = loss + exact_kl(original_logits, objective.lm(input_ids=kl_batch["input_ids"]).logits)
        else:
            with precision_context(precision, device):
                loss, _ = objective(batch, kl_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return times


def setup(
    task: str, model_name: str, steps: int, batch_size: int, device: str = "cpu"
) -> tuple[TrainConfig, RunParts, torch.nn.Module]:
    """The config for `steps` timed steps (plus a warm-up), the run parts on `device` and a frozen original LM."""
    config = TrainConfig(
        task=task,
        model=model_name,
        out=tempfile.mkdtemp(),
        steps=steps + 1,
        batch_size=batch_size,
    )
    tokenizer, model = load_tokenizer(model_name), load_causal_lm(model_name).to(device)
    use_training_attention(model, torch.device(device))  # as training does
    original = copy.deepcopy(model).eval().requires_grad_(False)
    parts = build_parts(config, tokenizer, model)
    parts.amap.to(device)
    parts.teacher.to(device)
    return config, parts, original


def median_step_times(
    config: TrainConfig, parts: RunParts, original: torch.nn.Module, steps: int, device: str = "cpu",
    precision: str = "fp32", kinds: tuple[str, ...] = ("baseline", "inject", "naive"),
) -> dict[str, float]:
    """Median seconds per step of each kind (baseline, inject, naive) over `steps` steps after one warm-up,
    the forward pass in `precision` (fp32, or bf16 autocast as `--mixed-precision bf16` trains)."""
    medians = {}
    for kind in kinds:
        kind_config = dataclasses.replace(config, method="baseline" if kind == "baseline" else "inject")
        objective = InjectionObjective(
            kind_config if kind != "naive" else dataclasses.replace(kind_config, kl_weight=0.0), parts
        )
        optimizer = make_optimizer(kind_config, parts.model, parts.amap)
        times = timed_steps(
            kind, objective, optimizer, parts, kind_config, steps + 1, parts.teacher, original, device, precision
        )[1:]
        medians[kind] = statistics.median(times)
        print(f"{kind} ({precision}): median {medians[kind]:.2f} s/step over {len(times)} steps", flush=True)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="dyck")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=6, help="Timed steps per kind (after one warm-up step).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    parser.add_argument("--bf16", action="store_true", help="Also time baseline and inject under bf16 autocast.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, parts, original = setup(args.task, args.model, args.steps, args.batch_size)
    medians = median_step_times(config, parts, original, args.steps)
    tokens = args.batch_size * max(len(b) for b in parts.data.bridged[: args.batch_size])
    result = {
        "task": args.task,
        "model": args.model,
        "batch_size": args.batch_size,
        "kl_batch_size": config.kl_batch_size,
        "kl_top_k": config.kl_top_k,
        "threads": args.threads,
        "median_step_s": medians,
        "inject_over_baseline": medians["inject"] / medians["baseline"],
        "inject_over_naive": medians["inject"] / medians["naive"],
        "task_tokens_per_s_inject": tokens / medians["inject"],
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.bf16:
        bf16 = median_step_times(config, parts, original, args.steps, "cpu", "bf16", ("baseline", "inject"))
        result["median_step_s_bf16"] = bf16
        result["bf16_speedup"] = {kind: medians[kind] / bf16[kind] for kind in bf16}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def peak_rss_mb() -> float:
    """Peak resident memory of this process."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
