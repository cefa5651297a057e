"""Experiment budgets: how long each run of `tracr-inject reproduce` trains and how much it evaluates.

In: a budget name (smoke, demo, cpu, full) and a task.  Out: the `TrainConfig` fields and evaluation
sizes of one run.  `smoke` is CI-sized (minutes for everything), `demo` is the README's main job, `cpu`
fits one run well inside an hour on a 2-core CPU (so a machine reclaimed after a few hours loses at most one
run's progress since its last checkpoint; demo and cpu train in bf16 autocast), `full` is the authors'
released schedule for a GPU (20,000 steps at batch 2, LR 1e-6 for the LM and 1e-4 for the map, no clipping,
the KL summed over each window's tokens; bf16 on CUDA) with what still differs from their code listed in its `deviations`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracr_injection.errors import InvalidArgumentError

TASKS = ("dyck", "count", "sum")


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
    cuda_train: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides `train` where CUDA is
    deviations: tuple[str, ...] = ()  # how runs of this budget differ from the authors' released code

    def train_fields(self, task: str, cuda: bool | None = None) -> dict[str, Any]:
        """`TrainConfig` fields of a run of `task` under this budget; with `cuda` (default: whether this
        machine has a CUDA device) the `cuda_train` overrides apply too."""
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return {
            **self.train,
            **(self.cuda_train if cuda else {}),
            "steps": self.steps.get(task, self.steps["default"]),
            "checkpoint_every": self.checkpoint_every,
        }


# The CPU budgets train the LM's forward pass under bf16 autocast (the alignment's cosine, the KL and the
# losses stay fp32): on this 2-core AVX-512 BF16 CPU an inject step took 3.08-3.28 s against 4.77-4.93 s in
# fp32 with two 1-thread workers side by side (1.45-1.60x; baseline 1.46-1.61x), and a 400-step Dyck inject
# run ended at 95.5% vs 96.5% test accuracy (`results/tuning/bf16/`, seed 0).  `results/cpu/` was trained
# in fp32 before this choice.
CPU_PRECISION = {"mixed_precision": "bf16"}

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
    train={
        **CPU_PRECISION,
        "batch_size": 8, "lr_lm": 1e-5, "lr_map": 1e-3, "warmup_steps": 20, "eval_examples": 100,
    },  # fmt: skip
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
    train={
        **CPU_PRECISION,
        "batch_size": 8, "lr_lm": 1e-5, "lr_map": 1e-3, "warmup_steps": 20, "eval_examples": 200,
    },  # fmt: skip
    eval_examples=200,
    probe_examples=400,
    causal_examples=100,
    language_windows=64,
    checkpoint_every=50,
)

FULL_DEVIATIONS = (
    (
        "model: SmolLM2-135M-Instruct (30 blocks, width 576, de-quantised from a Q4_1 GGUF) instead of GPT-2 "
        "large/xl, which cannot be installed offline"
    ),
    "mixed precision: bf16 autocast on CUDA (the authors train in fp32; CPU runs of this budget stay fp32)",
    "learning rate: linear warm-up over the first 100 steps, then constant (the authors' code has no warm-up)",
    (
        "task loss: cross-entropy on exactly the answer tokens (the authors mask by the answer's character count, "
        "which also trains pad positions)"
    ),
    "alignment: 1 - cos averaged over real token positions only (the authors' average includes padding)",
    (
        "detach-and-roll: the rolled-in example is lined up at the answer (`roll_align=answer`; the authors roll "
        "by absolute position, which hands the answer position another example's pad state under right padding)"
    ),
    (
        "KL: on 256 fixed 30-token windows sampled from the original model itself, 4 per step, against its "
        "top-1024 tokens plus a tail bucket (a lower bound of the exact KL); the authors stream FineWeb-Edu windows "
        "and use the full vocabulary"
    ),
    (
        "Dyck teacher: `dyck_trigger` compares total opener and closer counts (the authors' program keeps per-type "
        "counts and a negative-prefix flag); evaluation's `length` split draws lengths 31-90 (theirs 5-90)"
    ),
    (
        "prompts are not cut at 37 tokens (the authors' cut drops the answer of training strings longer than about "
        "26 brackets)"
    ),
    "Sum trains at batch 2 like Dyck and Count (the authors used batch 2-16 across tasks)",
)

FULL = Budget(
    name="full",
    description="the authors' released schedule: 20,000 steps at batch 2, LR 1e-6 (LM) / 1e-4 (map), no "
    "gradient clipping, KL summed over each 30-token window (their `batchmean`), bf16 on CUDA; "
    "1000 examples per evaluated split",
    steps={"default": 20_000},
    train={
        "batch_size": 2,
        "lr_lm": 1e-6,
        "lr_map": 1e-4,
        "warmup_steps": 100,
        "max_grad_norm": 0.0,
        "kl_reduction": "window_sum",
        "eval_examples": 1000,
    },
    cuda_train={"mixed_precision": "bf16"},
    eval_examples=1000,
    probe_examples=2000,
    causal_examples=500,
    language_windows=256,
    checkpoint_every=500,
    deviations=FULL_DEVIATIONS,
)

BUDGETS = {b.name: b for b in (SMOKE, DEMO, CPU, FULL)}


def get_budget(name: str) -> Budget:
    """The budget called `name`, or a ValueError listing the known ones."""
    if name not in BUDGETS:
        raise InvalidArgumentError(f"Unknown budget {name!r}; choose one of {', '.join(BUDGETS)}.")
    return BUDGETS[name]
