"""Run a tiny injection training in two CPU processes (gloo) with Accelerate's CPU launcher.

Started by tests/test_inject.py in a fresh interpreter: forking a process whose OpenMP
threads are already running (as pytest's is after other tests) can deadlock the children.
Usage: python tests/two_process_run.py OUT MODEL_DIR
"""

import sys

from accelerate import debug_launcher

from tracr_injection.inject import TrainConfig
from tracr_injection.inject.trainer import train


def run(out: str, model: str) -> None:
    """Three injection steps of `model` on the reverse task."""
    config = TrainConfig(
        task="reverse",
        model=model,
        out=out,
        steps=3,
        batch_size=4,
        lr_lm=1e-3,
        lr_map=1e-2,
        warmup_steps=2,
        kl_windows=16,
        kl_window_len=8,
        kl_batch_size=2,
        kl_top_k=16,
        checkpoint_every=1000,
        eval_examples=16,
    )
    train(config, progress=False)


if __name__ == "__main__":
    debug_launcher(run, args=(sys.argv[1], sys.argv[2]), num_processes=2)
