"""Run a tiny injection training in two CPU processes (gloo) with Accelerate's CPU launcher.

Started by tests/test_inject.py in a fresh interpreter: forking a process whose OpenMP
threads are already running (as pytest's is after other tests) can deadlock the children.
Usage: python tests/two_process_run.py OUT MODEL_DIR
"""

import sys

from accelerate import debug_launcher
from test_inject import tiny_config  # this script's folder is on sys.path

from tracr_injection.inject.trainer import train


def run(out: str, model: str) -> None:
    """Three injection steps of `model` on the reverse task (the tests' tiny configuration)."""
    train(tiny_config(model, out, steps=3), progress=False)


if __name__ == "__main__":
    debug_launcher(run, args=(sys.argv[1], sys.argv[2]), num_processes=2)
