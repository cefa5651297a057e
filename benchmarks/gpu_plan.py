"""GPU plan: train and evaluate as many Dyck inject/baseline seeds of the `full` budget as fit one short GPU loan.

In: the offline SmolLM2 GGUF, the cached Dyck teacher, and `benchmarks/results/gpu_plan_estimate.json` (per-step
FLOPs and operator counts measured here on the CPU, plus the latency model that sizes the schedule).
Out: on the device, a tarball of `results/gpu/` (comparison, per-run reports, experiment.json, logs) and a
summary under $OUT, for the lead to commit.  Subcommands (run them through `benchmarks/gpu_plan.sh`):

  measure             (CPU, ~1 min) count one full-budget Dyck step's FLOPs and operators with the real
                      SmolLM2 and write the estimate JSON with the schedule it implies
  prepare             (CPU) build the payload in .gpu_payload/: part1 = the GGUF's first bytes, part2 = the
                      rest of it, the teacher artifact (gzip) and the wheels the device lacks
  stage               (device, call 1) copy part 1 to the machine's /tmp, where the next call finds it
  run                 (device, call 2) unpack, train the runs concurrently, evaluate them, pack the results
  run --dry-run       print the schedule and the payload sizes only (any machine, no training)
  run --smoke         the same device path on the CPU with a given tiny model and the smoke budget's sizes

GPU_PLAN.md beside this file explains the sizing and the two-call payload.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ESTIMATE_PATH = ROOT / "benchmarks" / "results" / "gpu_plan_estimate.json"
PAYLOAD_DIR = ROOT / ".gpu_payload"
STAGE_DIR = Path(os.environ.get("GPU_PLAN_STAGE", "/tmp/tracr-gpu"))
PART1, PART2, PAYLOAD_MANIFEST = "part1.bin", "part2.tar", "payload.json"
WHEELS = ("tracr-pypi", "dm-haiku", "jmp", "gguf")  # missing on the device (KINDS.md); all pure Python
CALL_LIMIT_MIB = 64.0  # the working tree that travels with one device call
TREE_MARGIN_MIB = 4.0  # room for the tree to grow between `prepare` and the calls
TASK = "dyck"
FULL_STEPS = 20_000

# The latency model (assumptions, not measurements; GPU_PLAN.md says why each is conservative).
ASSUMPTIONS = {
    "dispatch_us_per_op": 10.0,  # eager PyTorch + autograd, CPU time to issue one operator on CUDA
    "gpu_us_per_kernel": 4.0,  # a tiny kernel's time on the GPU, launch gap included
    "achieved_tflops": 100.0,  # bf16 matrix rate at these tiny shapes (the H200 reaches ~790 on large ones)
    "step_overhead_ms": 5.0,  # collate, host-to-device copies, metrics and logging per step
    "safety": 1.5,  # the planned steps are the estimate's / 1.5
    "call_limit_s": 600.0,  # one device command
    "setup_s": 100.0,  # unpack, wheels, GGUF -> fp32, per-run caches (targets, KL windows)
    "eval_s": 150.0,  # one run's full-budget evaluation, runs in parallel
    "pack_s": 20.0,
    "margin_s": 40.0,
    "cores": 16,
    "max_concurrent_runs": 12,
    "free_sharing": 1.25,  # add runs while a step is at most this much slower than with 2 runs
}


# --------------------------------------------------------------------------------------------------
# Sizing: measured counts -> schedule
# --------------------------------------------------------------------------------------------------


def step_seconds(counts: dict[str, float], runs: int, a: dict[str, float]) -> dict[str, float]:
    """Per-step time of one run when `runs` runs share the GPU: each process issues its operators one by one
    (its CPU time, followed by the GPU's for its own step, as the per-step metrics synchronise) while the
    GPU serves all processes' kernels in turn (time-slicing, no MPS), whichever is slower."""
    gpu = counts["ops"] * a["gpu_us_per_kernel"] * 1e-6 + counts["flops"] / (a["achieved_tflops"] * 1e12)
    alone = counts["ops"] * a["dispatch_us_per_op"] * 1e-6 + a["step_overhead_ms"] * 1e-3 + gpu
    return {"gpu_busy_s": gpu, "alone_s": alone, "shared_s": max(alone, runs * gpu)}


def plan_schedule(measured: dict[str, Any], a: dict[str, float] = ASSUMPTIONS) -> dict[str, Any]:
    """How many runs share the GPU and how many of the full budget's steps each trains in one call."""
    counts = max(measured["per_step"].values(), key=lambda c: c["ops"])  # the inject step, the costlier
    train_s = a["call_limit_s"] - a["setup_s"] - a["eval_s"] - a["pack_s"] - a["margin_s"]
    base = step_seconds(counts, 2, a)["shared_s"]
    runs = 2
    for candidate in range(2, int(min(a["cores"] - 2, a["max_concurrent_runs"])) + 1, 2):
        if step_seconds(counts, candidate, a)["shared_s"] <= a["free_sharing"] * base:
            runs = candidate
    timing = step_seconds(counts, runs, a)
    fit = int(train_s / (timing["shared_s"] * a["safety"]))
    steps = min(FULL_STEPS, max(100, fit // 100 * 100))
    return {
        "task": TASK,
        "seeds": runs // 2,
        "concurrent_runs": runs,
        "steps_per_run": steps,
        "full_budget_steps": FULL_STEPS,
        "fraction_of_full": round(steps / FULL_STEPS, 4),
        "training_window_s": round(train_s, 1),
        "estimated_step_s": {k: round(v, 4) for k, v in timing.items()},
        "estimated_train_s": round(steps * timing["shared_s"], 1),
        "full_budget_fits": fit >= FULL_STEPS,
        "full_budget_estimated_s": round(FULL_STEPS * timing["shared_s"], 1),
    }


def load_estimate(path: Path = ESTIMATE_PATH) -> dict[str, Any]:
    """The estimate JSON written by `measure`, or a clear error saying how to make it."""
    if not path.is_file():
        raise SystemExit(
            f"error: no estimate at {path}; run `benchmarks/gpu_plan.sh measure` on a CPU first."
        )
    return json.loads(path.read_text())


def measure(threads: int) -> dict[str, Any]:
    """Count FLOPs and dispatched operators of one full-budget Dyck step (inject and baseline) with the real
    SmolLM2 on this CPU: the second step of each, under bf16 autocast as on CUDA, AdamW with `foreach` (CUDA's
    default).  Operators are what eager PyTorch launches one kernel for on a GPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from tracr_injection.experiments.budgets import FULL
    from tracr_injection.hub import load_tokenizer
    from tracr_injection.inject import TrainConfig
    from tracr_injection.inject.data import batch_positions
    from tracr_injection.inject.lm import load_causal_lm
    from tracr_injection.inject.objective import InjectionObjective
    from tracr_injection.inject.trainer import build_parts, make_optimizer

    class OpCounter(TorchDispatchMode):
        """Counts every operator that reaches a kernel."""

        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(threads)
    fields = FULL.train_fields(TASK, cuda=False) | {"steps": 2}  # KL cache: the full budget's, built once
    per_step, tokens = {}, {}
    tokenizer, model = load_tokenizer("smollm2"), load_causal_lm("smollm2")
    with tempfile.TemporaryDirectory() as out:
        for method in ("baseline", "inject"):
            config = TrainConfig(task=TASK, method=method, out=out, **fields)
            print(f"measure: building the {method} run's parts", flush=True)
            parts = build_parts(config, tokenizer, model, progress=False)
            print(f"measure: counting two {method} steps", flush=True)
            objective = InjectionObjective(config, parts)
            optimizer = make_optimizer(config, model, parts.amap)
            for group in optimizer.param_groups:
                group["foreach"] = True
            for step in range(2):
                batch = parts.data.collate(batch_positions(step, config.batch_size, len(parts.data)))
                kl_batch = parts.kl_cache.batch(
                    batch_positions(step, config.kl_batch_size, len(parts.kl_cache))
                )
                counter, flops = OpCounter(), FlopCounterMode(display=False)
                with flops, counter, torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = objective(batch, kl_batch)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            per_step[method] = {"ops": counter.ops, "flops": flops.get_total_flops()}
            tokens[method] = {
                "task": int(batch["input_ids"].numel()),
                "kl": int(kl_batch["input_ids"].numel()),
            }
    return {
        "what": "one full-budget Dyck training step (batch 2 + 4 KL windows of 30 tokens), second step, bf16 "
        "autocast, counted on the CPU with the real SmolLM2",
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "per_step": per_step,
        "flops_check_6ND": {
            m: 6 * sum(p.numel() for p in model.parameters()) * (t["task"] + t["kl"])
            for m, t in tokens.items()
        },
    }


# --------------------------------------------------------------------------------------------------
# The payload: two parts that each fit one call
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(folder: Path) -> str:
    """SHA-256 over a model folder's tensors (names and bytes, in name order): equal iff the weights are."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):
            digest.update(key.encode())
            digest.update(f.get_tensor(key).contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype():
    """torch.uint8 (imported late: the dry run needs no torch)."""
    import torch

    return torch.uint8


def tree_mib(root: Path = ROOT) -> float:
    """MiB of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    return (
        sum(
            (root / name.decode()).stat().st_size
            for name in listed
            if name and (root / name.decode()).is_file()
        )
        / 2**20
    )


def split_at(gguf_bytes: int, tree: float) -> int:
    """Bytes of the GGUF that go in part 1: as much as one call carries beside the tree, at most half of it
    plus what part 2 must hold besides (so both parts fit)."""
    room = int((CALL_LIMIT_MIB - TREE_MARGIN_MIB - tree) * 2**20)
    if 2 * room < gguf_bytes:
        raise SystemExit(
            f"error: the GGUF ({gguf_bytes / 2**20:.1f} MiB) does not fit two calls beside a {tree:.1f} MiB tree; "
            "make the tree smaller (results/ travels with every call)."
        )
    return min(room, gguf_bytes)


def download_wheels(folder: Path) -> list[Path]:
    """The pinned wheels of the packages the device lacks, for its Python 3.12 (from the package registry)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
        check=True,
    )  # fmt: skip
    return sorted(folder.glob("*.whl"))


def prepare(payload: Path) -> dict[str, Any]:
    """Write part1.bin (the GGUF's head), part2.tar (its tail, the teacher artifact gzipped, wheels) and
    payload.json (sizes and checksums) into `payload`."""
    from tracr_injection.hub.models import smollm2_dir, smollm2_gguf
    from tracr_injection.tasks import get_task

    gguf = smollm2_gguf()
    from tracr_injection.compile.compiler import artifact_dir

    teacher = get_task(TASK).teacher()
    teacher_dir = artifact_dir(teacher.config.program_name, teacher.config.program_hash)
    tree = tree_mib()
    size = gguf.stat().st_size
    cut = split_at(size, tree)
    payload.mkdir(parents=True, exist_ok=True)
    with gguf.open("rb") as src, (payload / PART1).open("wb") as dst:
        dst.write(src.read(cut))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with gguf.open("rb") as src:
            src.seek(cut)
            (tmp / "gguf.tail").write_bytes(src.read())
        wheels = download_wheels(tmp / "wheels")
        with tarfile.open(payload / PART2, "w") as tar:
            tar.add(tmp / "gguf.tail", "gguf.tail")
            for wheel in wheels:
                tar.add(wheel, f"wheels/{wheel.name}")
            for file in sorted(teacher_dir.iterdir()):
                tar.addfile(*_gzipped_member(file, f"teacher/{teacher_dir.name}/{file.name}.gz", tmp))
    manifest = {
        "gguf_name": gguf.name,
        "gguf_sha256": sha256_file(gguf),
        "gguf_bytes": size,
        "part1_bytes": cut,
        "part1_sha256": sha256_file(payload / PART1),
        "part2_bytes": (payload / PART2).stat().st_size,
        "teacher": teacher_dir.name,
        "wheels": [w.name for w in wheels],
        "tree_mib": round(tree, 2),
        "weights_digest": weights_digest(smollm2_dir())
        if (smollm2_dir() / "model.safetensors").is_file()
        else None,
    }
    (payload / PAYLOAD_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _gzipped_member(file: Path, name: str, tmp: Path) -> tuple[tarfile.TarInfo, Any]:
    """A tar member holding `file` gzipped (the Dyck teacher's 106 MB of mostly zeros become ~0.6 MB)."""
    packed = tmp / (file.name + ".gz")
    with file.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    info = tarfile.TarInfo(name)
    info.size = packed.stat().st_size
    return info, packed.open("rb")


def payload_sizes(payload: Path) -> dict[str, Any]:
    """The prepared parts' sizes in MiB and what each call would carry with the tree, or why there are none."""
    manifest_path = payload / PAYLOAD_MANIFEST
    if not manifest_path.is_file():
        return {"prepared": False, "note": f"no payload in {payload}: run `benchmarks/gpu_plan.sh prepare`"}
    manifest = json.loads(manifest_path.read_text())
    tree = tree_mib()
    parts = {
        name: (payload / name).stat().st_size / 2**20 for name in (PART1, PART2) if (payload / name).is_file()
    }
    return {
        "prepared": True,
        "tree_mib": round(tree, 2),
        "parts_mib": {k: round(v, 2) for k, v in parts.items()},
        "call_mib": {k: round(v + tree, 2) for k, v in parts.items()},
        "fits": all(v + tree <= CALL_LIMIT_MIB for v in parts.values()),
        "gguf_sha256": manifest["gguf_sha256"],
    }


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def stage(payload: Path, stage_dir: Path = STAGE_DIR) -> None:
    """Call 1: copy part 1 (checked) to the machine's /tmp, where call 2 finds it while the machine is warm."""
    manifest = json.loads((payload / PAYLOAD_MANIFEST).read_text())
    if sha256_file(payload / PART1) != manifest["part1_sha256"]:
        raise SystemExit("error: part1.bin does not match payload.json; run `gpu_plan.sh prepare` again.")
    stage_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(payload / PART1, stage_dir / PART1)
    print(
        f"staged {PART1} ({manifest['part1_bytes'] / 2**20:.1f} MiB) in {stage_dir}; make call 2 within 30 s"
    )


def unpack(payload: Path, stage_dir: Path, work: Path) -> dict[str, Any]:
    """Join the GGUF (checksum-checked), unpack the teacher into the cache, de-quantise SmolLM2 once."""
    manifest = json.loads((payload / PAYLOAD_MANIFEST).read_text())
    if not (stage_dir / PART1).is_file():
        raise SystemExit(
            f"error: {stage_dir / PART1} is missing: the machine went back after call 1 (it stays warm 30 s); "
            "run `gpu_plan.sh stage` and then `gpu_plan.sh run` again, back to back."
        )
    gguf = work / manifest["gguf_name"]
    with tarfile.open(payload / PART2) as tar:
        tar.extractall(work / "part2", filter="data")
    with gguf.open("wb") as dst:
        for piece in (stage_dir / PART1, work / "part2" / "gguf.tail"):
            with piece.open("rb") as src:
                shutil.copyfileobj(src, dst)
    if sha256_file(gguf) != manifest["gguf_sha256"]:
        raise SystemExit(
            "error: the joined GGUF's checksum is wrong: part 1 and part 2 come from different prepares."
        )
    teachers = Path(os.environ["TRACR_INJECTION_CACHE"]) / "teachers"
    for packed in (work / "part2" / "teacher").rglob("*.gz"):
        target = teachers / packed.relative_to(work / "part2" / "teacher").with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(packed, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    from tracr_injection.hub.models import convert_smollm2, smollm2_dir

    began = time.perf_counter()
    convert_smollm2(smollm2_dir(), gguf)
    digest = weights_digest(smollm2_dir())
    return {
        "convert_s": round(time.perf_counter() - began, 1),
        "weights_digest": digest,
        "weights_match_cpu_conversion": digest == manifest.get("weights_digest"),
    }


def plan_runs_for(plan: dict[str, Any], work: Path) -> tuple[Any, list[Any]]:
    """The budget (the full one cut to the planned steps, or the smoke one) and its planned runs."""
    from tracr_injection.experiments.budgets import FULL, SMOKE
    from tracr_injection.experiments.reproduce import plan_runs

    base = SMOKE if plan["smoke"] else FULL
    steps = plan["steps_per_run"]
    budget = dataclasses.replace(
        base,
        name="gpu",
        description=f"the {base.name} budget's first {steps} of {plan['full_budget_steps']} steps, "
        f"{plan['concurrent_runs']} runs sharing one GPU ({plan['device']})",
        steps={"default": steps},
        checkpoint_every=steps,  # no checkpoints: nothing resumes inside one call
    )
    return budget, plan_runs([TASK], plan["seeds"], budget, work / "runs", plan["model"], work / "results")


def run_one(plan_path: Path, index: int) -> None:
    """A child process: train and evaluate run `index` of the plan (`reproduce.execute_run`)."""
    from tracr_injection.experiments.reproduce import eval_settings, execute_run

    plan = json.loads(plan_path.read_text())
    budget, runs = plan_runs_for(plan, Path(plan["work"]))
    execute_run(runs[index], eval_settings(budget), progress=False)


def launch(plan: dict[str, Any], plan_path: Path, work: Path, deadline: float) -> list[dict[str, Any]]:
    """Start every run as its own process (own cache folder, the teacher shared), wait until `deadline`,
    stop what is still running; returns each run's exit state and wall time."""
    _, runs = plan_runs_for(plan, work)
    threads = max(1, int(plan["cores"]) // max(1, len(runs)))
    procs = []
    for index, run in enumerate(runs):
        cache = work / f"cache-{run.name}"
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "teachers").exists():
            (cache / "teachers").symlink_to(Path(os.environ["TRACR_INJECTION_CACHE"]) / "teachers")
        env = os.environ | {
            "TRACR_INJECTION_CACHE": str(cache), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        log = (work / "logs").joinpath(f"{run.name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "_one", str(plan_path), str(index)]
        procs.append(
            (
                run,
                subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                time.time(),
            )
        )
    states = []
    for run, proc, began in procs:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
            state = "done" if code == 0 else f"failed (exit {code}, see logs/{run.name}.log)"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            state = "stopped at the deadline"
        states.append({"run": run.name, "process": state, "wall_s": round(time.time() - began, 1)})
    return states


def run_summary(run: Any, process: dict[str, Any]) -> dict[str, Any]:
    """A run's steps trained, measured seconds per step and the accuracy its manifest recorded."""
    from statistics import median

    from tracr_injection.inject.probing import is_probe_line

    folder = run.folder
    lines = folder.metrics_file.read_text().splitlines() if folder.metrics_file.is_file() else []
    records = [json.loads(line) for line in lines if line]
    seconds = [record["seconds"] for record in records if not is_probe_line(record)]
    manifest = folder.read_manifest() if folder.is_finished else None
    return {
        **process,
        "steps_trained": len(seconds),
        "steps_planned": run.config.steps,
        "median_step_s": round(median(seconds[1:] or seconds), 4) if seconds else None,
        "train_s": round(sum(seconds), 1),
        "test_accuracy_after": manifest.accuracy_after if manifest else None,
        "evaluated": folder.evaluation_file.is_file(),
    }


def device_name() -> str:
    """The CUDA device's name, or "cpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The schedule this invocation follows: the estimate's (flags override seeds and steps), or the smoke one."""
    if args.smoke:
        schedule = {"seeds": 1, "concurrent_runs": 2, "steps_per_run": 2, "full_budget_steps": FULL_STEPS}
    else:
        schedule = load_estimate()["schedule"]
    seeds = args.seeds or schedule["seeds"]
    return {
        **schedule,
        "seeds": seeds,
        "concurrent_runs": 2 * seeds,
        "steps_per_run": args.steps or schedule["steps_per_run"],
        "smoke": args.smoke,
        "model": args.model,
        "cores": os.cpu_count() or 1,
        "time_limit_s": args.time_limit,
    }


def print_schedule(plan: dict[str, Any], sizes: dict[str, Any]) -> None:
    """The plan in a few lines: runs, steps, concurrency, time budget, payload."""
    runs = [f"{TASK}-{m}-s{s}" for s in range(plan["seeds"]) for m in ("baseline", "inject")]
    print(
        f"GPU plan ({'smoke' if plan['smoke'] else 'full budget'}): {len(runs)} runs at once: {', '.join(runs)}"
    )
    cut = " (the rest does not fit one call)" if plan["steps_per_run"] < plan["full_budget_steps"] else ""
    print(f"  steps per run: {plan['steps_per_run']} of {plan['full_budget_steps']}{cut}")
    for key in ("estimated_step_s", "estimated_train_s", "training_window_s", "full_budget_estimated_s"):
        if key in plan:
            print(f"  {key}: {plan[key]}")
    print(f"  time limit of the call: {plan['time_limit_s']} s")
    print(f"  payload: {json.dumps(sizes)}")


def run(args: argparse.Namespace) -> None:
    """Call 2 (or the smoke on the CPU): unpack, train and evaluate concurrently, publish, pack into $OUT."""
    began = time.time()
    plan = build_plan(args)
    sizes = payload_sizes(args.payload)
    print_schedule(plan, sizes)
    if args.dry_run:
        return
    if not args.smoke and device_name() == "cpu":
        raise SystemExit(
            "error: no CUDA device here: `run` is for the GPU; use --dry-run or --smoke on a CPU."
        )
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRACR_INJECTION_CACHE", str(work / "cache"))  # the teacher every run shares
    os.environ.setdefault("TRACR_INJECTION_MODELS", str(work / "models"))
    unpacked = {} if args.smoke else unpack(args.payload, args.stage, work)
    from tracr_injection.experiments.reproduce import publish_results
    from tracr_injection.tasks import get_task

    get_task(TASK).teacher()  # the cached artifact (compiled here in the smoke); every run shares it
    plan |= {"work": str(work), "device": device_name(), "unpack": unpacked}
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    reserve = ASSUMPTIONS["pack_s"] + ASSUMPTIONS["margin_s"] / 2 if not args.smoke else 0.0
    states = launch(plan, plan_path, work, began + args.time_limit - reserve)
    budget, runs = plan_runs_for(plan, work)
    command = f"benchmarks/gpu_plan.sh run --seeds {plan['seeds']} --steps {plan['steps_per_run']}"
    results = publish_results(runs, budget, work / "results", command)
    summary = {
        "plan": plan,
        "runs": [run_summary(r, s) for r, s in zip(runs, states)],
        "wall_s": round(time.time() - began, 1),
    }
    (results / "gpu_plan_run.json").write_text(json.dumps(summary, indent=2))
    shutil.copytree(work / "logs", results / "logs", dirs_exist_ok=True)
    pack(results, Path(args.out), summary)


def pack(results: Path, out: Path, summary: dict[str, Any]) -> None:
    """$OUT gets three files: the results tarball (results/gpu/ as the lead commits it), the run summary and
    a short Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "gpu-results.tar.gz", "w:gz") as tar:
        tar.add(results, "gpu")
    (out / "gpu_plan_run.json").write_text(json.dumps(summary, indent=2))
    rows = [
        "| run | process | steps trained | median s/step | test acc after | evaluated |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {r['run']} | {r['process']} | {r['steps_trained']}/{r['steps_planned']} | {r['median_step_s']} | "
        f"{r['test_accuracy_after']} | {r['evaluated']} |"
        for r in summary["runs"]
    ]
    (out / "summary.md").write_text(f"# GPU plan on {summary['plan']['device']}\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The subcommands and their options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="count one step's FLOPs and operators on the CPU; write the estimate")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--estimate", type=Path, default=ESTIMATE_PATH)
    p = sub.add_parser("prepare", help="build the two-part payload")
    p.add_argument("--payload", type=Path, default=PAYLOAD_DIR)
    s = sub.add_parser("stage", help="device call 1: put part 1 in the machine's /tmp")
    s.add_argument("--payload", type=Path, default=PAYLOAD_DIR)
    s.add_argument("--stage", type=Path, default=STAGE_DIR)
    r = sub.add_parser("run", help="device call 2: unpack, train, evaluate, pack the results into --out")
    r.add_argument("--payload", type=Path, default=PAYLOAD_DIR)
    r.add_argument("--stage", type=Path, default=STAGE_DIR)
    r.add_argument("--out", default=os.environ.get("OUT", "gpu-plan-out"))
    r.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    r.add_argument("--seeds", type=int, default=None, help="override the estimate's seeds")
    r.add_argument("--steps", type=int, default=None, help="override the estimate's steps per run")
    r.add_argument("--model", default="smollm2")
    r.add_argument(
        "--time-limit", type=float, default=ASSUMPTIONS["call_limit_s"] - 15, help="seconds for all of it"
    )
    r.add_argument(
        "--dry-run", action="store_true", help="print the schedule and payload sizes, train nothing"
    )
    r.add_argument("--smoke", action="store_true", help="CPU, smoke-budget sizes, 2 steps, the given --model")
    o = sub.add_parser("_one")
    o.add_argument("plan", type=Path)
    o.add_argument("index", type=int)
    args = parser.parse_args(argv)
    for name in ("seeds", "steps"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "measure":
        measured = measure(args.threads)
        estimate = {"measured": measured, "assumptions": ASSUMPTIONS, "schedule": plan_schedule(measured)}
        args.estimate.parent.mkdir(parents=True, exist_ok=True)
        args.estimate.write_text(json.dumps(estimate, indent=2) + "\n")
        print(json.dumps(estimate["schedule"], indent=2))
    elif args.command == "prepare":
        print(json.dumps(prepare(args.payload), indent=2))
    elif args.command == "stage":
        stage(args.payload, args.stage)
    elif args.command == "run":
        run(args)
    else:
        run_one(args.plan, args.index)


if __name__ == "__main__":
    main()
