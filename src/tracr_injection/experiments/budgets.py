"""Experiment budgets: how long each run of `tracr-inject reproduce` trains and how much it evaluates.

In: a budget name (smoke, demo, cpu, full) and a task.  Out: the `TrainConfig` fields and evaluation
sizes of one run.  `smoke` is CI-sized (minutes for everything), `demo` is the README's main job, `cpu` fits one run well inside
an hour on a 2-core CPU (so a machine reclaimed after a few hours loses at most one run's
progress since its last checkpoint), `full` is the paper's scale for a GPU (one epoch of the
training split at batch 8, capped at 20k steps; LR 1e-6 for the LM and 1e-4 for the map).
"""

from __future__ import annotations

import dataclasses
from typing import Any

TASKS = ("dyck", "count", "sum")
METHODS = ("baseline", "inject")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training steps per task, shared training settings, and the evaluation sizes of one budget."""

    name: str
    description: str
    steps: dict[str, int]
    train: dict[str, Any]
    eval_examples: int  # per evaluated split
    probe_examples: int  # training-split examples the post-hoc probe is fitted on
    causal_examples: int
    language_windows: int
    checkpoint_every: int

    def train_fields(self, task: str) -> dict[str, Any]:
        """`TrainConfig` fields of a run of `task` under this budget."""
        return {
            **self.train,
            "steps": self.steps.get(task, self.steps["default"]),
            "checkpoint_every": self.checkpoint_every,
        }


SMOKE = Budget(
    name="smoke",
    description="a few steps per run and small evaluations: checks the whole pipeline in minutes",
    steps={"default": 4},
    train={"batch_size": 4, "kl_windows": 16, "kl_batch_size": 2, "warmup_steps": 2, "eval_examples": 16},
    eval_examples=16,
    probe_examples=32,
    causal_examples=16,
    language_windows=8,
    checkpoint_every=2,
)

DEMO = Budget(
    name="demo",
    description="the README's main job: 150 steps at batch 8 and 100 examples per split (about 30 min for "
    "baseline + inject on Dyck on 2 CPU cores)",
    steps={"default": 150},
    train={"batch_size": 8, "lr_lm": 1e-5, "lr_map": 1e-3, "warmup_steps": 20, "eval_examples": 100},
    eval_examples=100,
    probe_examples=200,
    causal_examples=64,
    language_windows=32,
    checkpoint_every=50,
)

CPU = Budget(
    name="cpu",
    description="400 steps at batch 8 (about 25 min per run, training and evaluation, on 2 CPU cores) and "
    "200 examples per split",
    steps={"default": 400},
    train={"batch_size": 8, "lr_lm": 1e-5, "lr_map": 1e-3, "warmup_steps": 20, "eval_examples": 200},
    eval_examples=200,
    probe_examples=400,
    causal_examples=100,
    language_windows=64,
    checkpoint_every=50,
)

FULL = Budget(
    name="full",
    description="the paper's scale: one epoch at batch 8 capped at 20k steps, LR 1e-6 (LM) / 1e-4 (map)",
    steps={"default": 20_000, "dyck": 2_500, "count": 2_500, "sum": 20_000},
    train={"batch_size": 8, "lr_lm": 1e-6, "lr_map": 1e-4, "warmup_steps": 100, "eval_examples": 1000},
    eval_examples=1000,
    probe_examples=2000,
    causal_examples=500,
    language_windows=256,
    checkpoint_every=500,
)

BUDGETS = {b.name: b for b in (SMOKE, DEMO, CPU, FULL)}


def get_budget(name: str) -> Budget:
    """The budget called `name`, or a ValueError listing the known ones."""
    if name not in BUDGETS:
        raise ValueError(f"Unknown budget {name!r}; choose one of {', '.join(BUDGETS)}.")
    return BUDGETS[name]
