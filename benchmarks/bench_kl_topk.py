"""Benchmark: how many top-k tokens the cached KL needs to match the exact KL on the real SmolLM2.

Samples natural-text windows from SmolLM2-135M-Instruct itself (`source="self"`), builds the top-k
cache for each k, and compares `topk_kl` with `exact_kl` for students made by perturbing the original:
a few AdamW steps (LR 1e-4) of plain LM training on a small task-like text batch (two sizes), and
Gaussian noise on every weight.  Reports, per k: relative error of the KL value, relative error of the
gradient norm and the gradient's cosine with the exact one (w.r.t. the student's logits and w.r.t. its
parameters), the top-k probability mass, cache size per 1000 windows and build time per window.
Writes benchmarks/results/kl_topk.json and prints a table.

    python benchmarks/bench_kl_topk.py [--windows 64] [--window-len 30] [--threads 1]

`--threads` defaults to 1: on a shared 2-core machine, 2 torch threads ran SmolLM2 8x (full forward)
to 40x (one-token decode steps) slower than 1 thread, from OpenMP threads waiting on each other.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from tracr_injection.hub import load_tokenizer, resolve_model
from tracr_injection.inject.kl_cache import KLCache, build_kl_cache
from tracr_injection.inject.natural_text import text_windows
from tracr_injection.inject.objective import exact_kl, topk_kl

KS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
ACCURACY_TARGET = 0.02
RESULTS = Path(__file__).parent / "results" / "kl_topk.json"


def load_original(name: str) -> torch.nn.Module:
    """The original model, fp32, offline, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()


def task_batch(tokenizer, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small task-like text batch (list reversal), unlike the natural-text windows, to train on."""
    rng = random.Random(seed)
    texts = []
    for _ in range(size):
        digits = [str(rng.randint(0, 9)) for _ in range(8)]
        texts.append(f"Reverse the list {' '.join(digits)}: {' '.join(reversed(digits))}")
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def adamw_student(original: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float = 1e-4):
    """A copy of the original after `steps` AdamW steps of LM training on `batch`: a realistic drift."""
    student = copy.deepcopy(original).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        student(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return student.eval()


@torch.no_grad()
def noise_student(original: torch.nn.Module, scale: float, seed: int = 0):
    """A copy of the original with Gaussian noise of `scale` x each tensor's std added to every weight."""
    student = copy.deepcopy(original).eval()
    generator = torch.Generator().manual_seed(seed)
    for param in student.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.add_(noise * scale * param.float().std().clamp_min(1e-8))
    return student


def build_caches(original, windows_NT: torch.Tensor, ks, folder: Path) -> tuple[dict[int, KLCache], dict]:
    """Build (timed) and save one cache per k; the caches and per-k cost figures."""
    caches, costs = {}, {}
    for k in ks:
        start = time.perf_counter()
        caches[k] = build_kl_cache(original, windows_NT, top_k=k)
        seconds = time.perf_counter() - start
        size = caches[k].save(folder / f"k{k}.safetensors").stat().st_size
        costs[k] = {
            "build_ms_per_window": round(1000 * seconds / len(windows_NT), 1),
            "mb_per_1000_windows": round(size / len(windows_NT) * 1000 / 1e6, 3),
            "topk_mass": round(caches[k].topk_logp_NTK.exp().sum(-1).mean().item(), 4),
        }
        print(f"k={k}: {costs[k]}", flush=True)
    return caches, costs


def gradient_stats(approx: torch.Tensor, exact: torch.Tensor, chunk: int = 1 << 22) -> dict[str, float]:
    """Relative error of the gradient norm, relative error of the gradient vector, and cosine, summed in
    float64 chunk by chunk (float32 sums over 135M entries gave cosines above 1)."""
    dot = approx_sq = exact_sq = 0.0
    for a, e in zip(approx.split(chunk), exact.split(chunk)):
        a, e = a.double(), e.double()
        dot, approx_sq, exact_sq = dot + (a @ e).item(), approx_sq + (a @ a).item(), exact_sq + (e @ e).item()
    exact_norm, approx_norm = exact_sq**0.5, approx_sq**0.5
    diff_sq = max(approx_sq + exact_sq - 2 * dot, 0.0)
    return {
        "norm_rel_err": abs(approx_norm - exact_norm) / exact_norm,
        "vector_rel_err": diff_sq**0.5 / exact_norm,
        "cosine": dot / (approx_norm * exact_norm),
    }


def compare_student(student, original_logits_NTV: torch.Tensor, caches: dict[int, KLCache]) -> dict:
    """Exact KL and gradients, and per k the top-k KL's value and gradient errors, on all windows at once."""
    params = [p for p in student.parameters() if p.requires_grad]
    input_ids = next(iter(caches.values())).input_ids_NT
    live_NTV = student(input_ids=input_ids).logits  # its graph is kept for one parameter backward per loss
    logits_NTV = live_NTV.detach().requires_grad_()

    def grads_through(loss: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The loss, its gradient w.r.t. the logits, and (through the kept graph) w.r.t. the parameters."""
        (logit_grad,) = torch.autograd.grad(loss, logits_NTV)
        param_grads = torch.autograd.grad(live_NTV, params, grad_outputs=logit_grad, retain_graph=True)
        return loss.item(), logit_grad.flatten(), torch.cat([g.flatten() for g in param_grads])

    start = time.perf_counter()
    kl, logit_grad, param_grad = grads_through(exact_kl(original_logits_NTV, logits_NTV))
    row = {"exact_kl": kl, "exact_backward_s": round(time.perf_counter() - start, 1), "by_k": {}}
    for k, cache in caches.items():
        approx, approx_logit_grad, approx_param_grad = grads_through(
            topk_kl(logits_NTV, cache.batch(slice(None)))
        )
        row["by_k"][k] = {
            "topk_kl": approx,
            "kl_rel_err": abs(approx - kl) / kl,
            "logit_grad": gradient_stats(approx_logit_grad, logit_grad),
            "param_grad": gradient_stats(approx_param_grad, param_grad),
        }
        print(f"  k={k}: {json.dumps(row['by_k'][k])}", flush=True)
    return row


def recommend(students: dict[str, dict], ks) -> int | None:
    """The smallest k whose KL relative error is under the target for every student."""
    for k in ks:
        if all(s["by_k"][k]["kl_rel_err"] < ACCURACY_TARGET for s in students.values()):
            return k
    return None


def print_table(students: dict[str, dict], costs: dict) -> None:
    """One row per (student, k): KL error, gradient errors, cache cost."""
    table = Table(
        *["student", "exact KL", "k", "top-k KL", "KL rel err", "logit |g| err", "param |g| err"],
        *["param cos", "top-k mass", "MB/1000 win", "build ms/win"],
    )
    for name, s in students.items():
        for k, r in s["by_k"].items():
            table.add_row(
                name, f"{s['exact_kl']:.4f}", str(k), f"{r['topk_kl']:.4f}", f"{100 * r['kl_rel_err']:.2f}%",
                f"{100 * r['logit_grad']['norm_rel_err']:.2f}%", f"{100 * r['param_grad']['norm_rel_err']:.2f}%",
                f"{r['param_grad']['cosine']:.5f}", f"{costs[k]['topk_mass']:.4f}",
                f"{costs[k]['mb_per_1000_windows']:.2f}", f"{costs[k]['build_ms_per_window']:.1f}",
            )  # fmt: skip
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window-len", type=int, default=30)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--adamw-steps", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--noise", type=float, nargs="*", default=[0.03])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = load_tokenizer(args.model)
    original = load_original(args.model)
    start = time.perf_counter()
    windows_NT = text_windows("self", tokenizer, args.windows, args.window_len, seed=0, model=original)
    sample_s = time.perf_counter() - start
    print(f"sampled {args.windows} windows in {sample_s:.1f}s; first: {tokenizer.decode(windows_NT[0])!r}")
    with torch.no_grad():
        original_logits_NTV = original(input_ids=windows_NT).logits
    with tempfile.TemporaryDirectory(prefix="kl-cache-bench-") as folder:
        caches, costs = build_caches(original, windows_NT, args.ks, Path(folder))

    perturbations = {f"adamw_{n}_steps": ("adamw", n) for n in args.adamw_steps}
    perturbations |= {f"noise_{s:g}_std": ("noise", s) for s in args.noise}
    batch = task_batch(tokenizer)
    students = {}
    for name, (kind, size) in perturbations.items():
        print(name, flush=True)
        student = adamw_student(original, batch, size) if kind == "adamw" else noise_student(original, size)
        students[name] = compare_student(student, original_logits_NTV, caches)
        del student

    recommended = recommend(students, args.ks)
    results = {
        "meta": {
            "model": args.model,
            "windows": args.windows,
            "window_len": args.window_len,
            "source": "self (top-p 0.95, temperature 1, seed 0)",
            "torch_threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "student_training_text": "8 list-reversal strings, plain LM loss, AdamW lr 1e-4",
            "grad_metrics": "norm_rel_err = | |g_k| - |g| | / |g|; vector_rel_err = |g_k - g| / |g|",
        },
        "self_sampling_ms_per_window": round(1000 * sample_s / args.windows, 1),
        "cache_costs": costs,
        "students": students,
        "accuracy_target": ACCURACY_TARGET,
        "recommended_k": recommended,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print_table(students, costs)
    print(
        f"recommended k (smallest with KL relative error < {ACCURACY_TARGET:.0%} for every student): {recommended}"
    )


if __name__ == "__main__":
    main()
