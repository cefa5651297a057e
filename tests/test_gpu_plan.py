"""benchmarks/gpu_plan.sh: the schedule follows from the measured counts by the documented latency model, the
dry run prints it without training, and the device path (`run --smoke`) trains, evaluates and packs the
results of concurrent runs on the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import save_tiny_llama

from tracr_injection.hub import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_plan.sh"
spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
gpu_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_plan)

pytestmark = pytest.mark.usefixtures("shared_cache")


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run gpu_plan.sh with this interpreter and the worktree's package."""
    environment = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=600, check=False
    )


def test_schedule_follows_the_latency_model_by_hand():
    measured = {
        "per_step": {"baseline": {"ops": 4000, "flops": 1e11}, "inject": {"ops": 6000, "flops": 2e11}}
    }
    schedule = gpu_plan.plan_schedule(measured)
    # inject: GPU 6000 x 4 us + 2e11 / 1e14 = 0.026 s; alone 0.06 + 0.005 + 0.026 = 0.091 s;
    # 4 runs: max(0.091, 4 x 0.026) = 0.104 <= 1.25 x 0.091, 6 runs: 0.156 is not -> 4 runs, 2 seeds;
    # training window 600 - 100 - 150 - 20 - 40 = 290 s -> 290 / (0.104 x 1.5) = 1858 -> 1800 steps
    assert schedule["estimated_step_s"] == {"gpu_busy_s": 0.026, "alone_s": 0.091, "shared_s": 0.104}
    assert (schedule["concurrent_runs"], schedule["seeds"], schedule["steps_per_run"]) == (4, 2, 1800)
    assert schedule["training_window_s"] == 290.0 and not schedule["full_budget_fits"]
    assert schedule["fraction_of_full"] == 0.09


def test_committed_estimate_is_the_schedule_of_its_measurements():
    estimate = json.loads(gpu_plan.ESTIMATE_PATH.read_text())
    assert estimate["schedule"] == gpu_plan.plan_schedule(estimate["measured"], estimate["assumptions"])
    assert (
        estimate["measured"]["per_step"]["inject"]["ops"]
        > estimate["measured"]["per_step"]["baseline"]["ops"]
    )


def test_dry_run_prints_the_schedule_and_trains_nothing(tmp_path):
    schedule = json.loads(gpu_plan.ESTIMATE_PATH.read_text())["schedule"]
    result = script("run", "--dry-run", "--payload", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"steps per run: {schedule['steps_per_run']} of 20000" in result.stdout
    assert f"{schedule['concurrent_runs']} runs at once: dyck-baseline-s0, dyck-inject-s0" in result.stdout
    assert "no payload in" in result.stdout and not (tmp_path / "out").exists()
    bad = script("run", "--dry-run", "--seeds", "0")
    assert bad.returncode != 0 and "--seeds must be at least 1" in bad.stderr


def test_payload_parts_rejoin_to_the_checked_file(tmp_path):
    (tmp_path / "payload").mkdir()
    data = os.urandom(3000)
    (tmp_path / "payload" / gpu_plan.PART1).write_bytes(data[:1000])
    (tmp_path / "payload" / gpu_plan.PAYLOAD_MANIFEST).write_text(json.dumps(
        {"part1_sha256": gpu_plan.sha256_file(tmp_path / "payload" / gpu_plan.PART1), "part1_bytes": 1000}
    ))  # fmt: skip
    gpu_plan.stage(tmp_path / "payload", tmp_path / "stage")
    assert (tmp_path / "stage" / gpu_plan.PART1).read_bytes() == data[:1000]
    assert gpu_plan.split_at(90 * 2**20, tree=8.0) == 52 * 2**20  # 64 - 4 margin - 8 tree
    with pytest.raises(SystemExit, match="does not fit two calls"):
        gpu_plan.split_at(120 * 2**20, tree=8.0)


def test_smoke_trains_evaluates_and_packs_concurrent_runs_on_the_cpu(tmp_path, isolated_cache):
    model = save_tiny_llama(tmp_path / "tiny", load_tokenizer("smollm2"), max_position_embeddings=256)
    out = tmp_path / "out"
    result = script("run", "--smoke", "--model", model, "--out", str(out), "--work", str(tmp_path / "work"),
                    env={"TRACR_INJECTION_CACHE": os.environ["TRACR_INJECTION_CACHE"]})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "gpu_plan_run.json", "summary.md"]
    summary = json.loads((out / "gpu_plan_run.json").read_text())
    assert [(r["run"], r["process"], r["steps_trained"], r["evaluated"]) for r in summary["runs"]] == [
        ("dyck-baseline-s0", "done", 2, True), ("dyck-inject-s0", "done", 2, True),
    ]  # fmt: skip
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu/comparison.md", "gpu/experiment.json", "gpu/runs/dyck-inject-s0/metrics.json"} <= names
    assert "gpu/logs/dyck-inject-s0.log" in names
