"""What one evaluation costs: `tracr-inject eval` of a run folder before and after a code change.

In: a trained run folder (e.g. a Dyck `cpu`-budget run), a git ref holding the code "before" (default:
the commit before the shared split pass) and the threads to use.  Out: `run_cost.json` with
`eval_seconds_before`, `eval_seconds_after`, `eval_parts_before/after` (wall seconds per stage, the
`timings` of metrics.json), the CPU seconds of each whole evaluation, and whether the two metrics.json
files agree (max absolute difference over every number but the timings).

Both evaluations run one after the other in fresh child processes on the same machine, with the cpu
budget's evaluation settings (`experiments.reproduce.eval_settings`), into fresh output folders (the
post-hoc probe is refitted each time; teacher targets come from the shared cache, warm for both once
the first evaluation ran).  The "before" code is `git archive <ref> src` unpacked into a temporary folder.
CPU seconds (the child's user + system time) move less than wall time on a machine shared with other work.

    python benchmarks/bench_eval.py RUN_DIR [--before-ref 7718aae] [--threads 1] [--out benchmarks/results]
    python benchmarks/bench_eval.py RUN_DIR --precision   # this code in fp32, then --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BEFORE_REF = "7718aae"  # the last commit before one shared pass per split (issue 20)

CHILD = """
import json, sys
from tracr_injection.evaluate.pipeline import evaluate_target
from tracr_injection.experiments.budgets import get_budget
from tracr_injection.experiments.reproduce import eval_settings
settings = eval_settings(get_budget(sys.argv[3]))
if len(sys.argv) > 4:
    settings.precision = sys.argv[4]
evaluate_target(sys.argv[1], out=sys.argv[2], settings=settings, progress=False)
"""


def unpack_source(ref: str, folder: Path) -> Path:
    """The `src` folder of git ref `ref`, unpacked under `folder`."""
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def timed_eval(
    src: Path, run_dir: Path, out: Path, budget: str, threads: int, precision: str | None = None
) -> dict[str, Any]:
    """Evaluate `run_dir` with the package in `src` in a child process (the LM's passes in `precision` when
    given): wall, CPU and per-stage seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    args = [sys.executable, "-c", CHILD, str(run_dir), str(out), budget, *([precision] if precision else [])]
    subprocess.run(args, env=env, check=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "parts": metrics["timings"], "metrics": metrics}


def numbers_difference(a: Any, b: Any) -> float:
    """Max absolute difference over the numbers of two JSON values of the same shape (inf if shapes differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return float("inf")
        return max((numbers_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max((numbers_difference(x, y) for x, y in zip(a, b)), default=0.0)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def measure(run_dir: Path, before_ref: str, budget: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """Evaluate `run_dir` with the code at `before_ref`, then with this checkout's; the run_cost record."""
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp_path = Path(tmp)
        before = timed_eval(
            unpack_source(before_ref, tmp_path / "before"), run_dir, tmp_path / "out-before", budget, threads
        )
        after = timed_eval(REPO / "src", run_dir, tmp_path / "out-after", budget, threads)
    compared = [{k: v for k, v in m["metrics"].items() if k != "timings"} for m in (before, after)]
    return {
        "run": str(run_dir),
        "budget": budget,
        "threads": threads,
        "before_ref": before_ref,
        "eval_seconds_before": before["wall_s"],
        "eval_seconds_after": after["wall_s"],
        "eval_cpu_seconds_before": before["cpu_s"],
        "eval_cpu_seconds_after": after["cpu_s"],
        "speedup_wall": round(before["wall_s"] / after["wall_s"], 2),
        "speedup_cpu": round(before["cpu_s"] / after["cpu_s"], 2),
        "eval_parts_before": before["parts"],
        "eval_parts_after": after["parts"],
        "metrics_max_abs_difference": numbers_difference(*compared),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def accuracy_changes(fp32: dict[str, Any], bf16: dict[str, Any]) -> dict[str, int]:
    """Per split, how many more examples the bf16 evaluation got right than the fp32 one."""
    return {s: bf16["accuracy"][s]["correct"] - r["correct"] for s, r in fp32["accuracy"].items()}


def measure_precision(run_dir: Path, budget: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """Evaluate `run_dir` with this checkout in fp32, then with the LM's passes in bf16; the record."""
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        runs = {p: timed_eval(REPO / "src", run_dir, Path(tmp) / p, budget, threads, p) for p in ("fp32", "bf16")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    return {
        "precision_run": str(run_dir),
        "precision_budget": budget,
        "eval_seconds_fp32": fp32["wall_s"],
        "eval_seconds_bf16": bf16["wall_s"],
        "eval_cpu_seconds_fp32": fp32["cpu_s"],
        "eval_cpu_seconds_bf16": bf16["cpu_s"],
        "bf16_speedup_cpu": round(fp32["cpu_s"] / bf16["cpu_s"], 2),
        "eval_parts_fp32": fp32["parts"],
        "eval_parts_bf16": bf16["parts"],
        "bf16_correct_minus_fp32": accuracy_changes(fp32["metrics"], bf16["metrics"]),
        "precision_load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a trained run folder (e.g. a Dyck cpu-budget run)")
    parser.add_argument("--before-ref", default=BEFORE_REF, help=f"git ref of the code before ({BEFORE_REF})")
    parser.add_argument("--budget", default="cpu", help="budget whose evaluation settings are used (cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each evaluation (1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder for run_cost.json")
    parser.add_argument("--precision", action="store_true", help="instead: this code in fp32, then in bf16")
    args = parser.parse_args()
    if args.precision:
        record = measure_precision(args.run_dir, args.budget, args.threads)
    else:
        record = measure(args.run_dir, args.before_ref, args.budget, args.threads)
    print(json.dumps(write_run_cost(record, args.out), indent=2))


def write_run_cost(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """Merge `record` into `out/run_cost.json` (other measurements of a run's cost are kept); returns it all."""
    path = out / "run_cost.json"
    merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **record}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


if __name__ == "__main__":
    main()
