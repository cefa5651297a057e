"""Training configuration: one dataclass, loadable from YAML, overridable by flags.

In: YAML text and/or keyword values.  Out: a `TrainConfig` whose every field has its declared type
and a sensible range, or a `ConfigError` naming the field (or file) and what it takes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shlex
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tracr_injection.errors import TracrInjectionError

METHODS = ("baseline", "inject")  # also the order `tracr-inject reproduce` runs them in
MIXED_PRECISION = ("no", "bf16", "fp16")
ROLL_ALIGN = ("answer", "position")
KL_REDUCTIONS = ("token_mean", "window_sum")
ALIGNMENT_BALANCES = ("none", "early_grad")
MAP_INITS = ("default", "lstsq")
VARIABLE_WEIGHTINGS = ("residual", "equal")
AT_LEAST_ONE = (
    "steps", "batch_size", "kl_windows", "kl_window_len", "kl_batch_size", "kl_top_k", "checkpoint_every",
    "keep_checkpoints", "eval_examples", "balance_every", "balance_cap",
)  # fmt: skip
NOT_NEGATIVE = (
    "lr_lm", "lr_map", "weight_decay", "warmup_steps", "alignment_weight", "kl_weight", "roll_block",
    "subspace_forcing_steps", "seed", "max_grad_norm", "probe_every", "accuracy_every",
    "alignment_first_steps",
)  # fmt: skip


class ConfigError(TracrInjectionError, ValueError):
    """A training configuration (YAML file or values) with a missing file, bad syntax, unknown key,
    wrong type or value out of range."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run (same config and seed -> same weights on CPU).

    `method="baseline"` is the same run with the alignment term and detach-and-roll off.
    `roll_block` is the LM block whose output detach-and-roll edits (default: the block right
    after the last aligned hidden state); `roll_align="answer"` lines the rolled-in example up with
    this one (first token and answer position; `objective.donor_positions`), `"position"` rolls by
    absolute position as the paper's code does (under right padding that hands the answer position
    another example's pad state).  Learning rates are separate for the LM and the map.
    `alignment_scales` maps teacher variable names to a factor that stretches their dims in the
    alignment cosine (`objective.alignment_dim_scales`), e.g. to make a numerical share count.
    For the first `subspace_forcing_steps` steps of an inject run the rolled output subspace holds the
    teacher's output variable instead of the LM's own (`objective.teacher_inside`): the later layers learn
    to read the subspace before the early layers can fill it, which they learn from the alignment alone
    meanwhile. 0 (default, the paper's method) never forces it.
    Every `probe_every` steps (and before the first, and after the last) the run measures how strongly the
    program is injected on small fixed batches (`inject.probing`): the map's decoding of each teacher
    variable and the gradient norm of each loss term on the blocks up to and after the roll block, as extra
    lines of metrics.jsonl; 0 turns it off. It never changes the trained weights.
    Every `accuracy_every` steps (0, default: never) the run also measures its task accuracy on the first
    `probing.ACCURACY_EXAMPLES` examples of every evaluated split (the same examples for every seed), as
    probe lines too (`probing.AccuracyProber`), so accuracy can be drawn over training.
    `teacher` names the registered program that teaches the task, one of the task's teachers
    (`Task.teacher_program`); None (default, and what a record written before the field existed
    means) is the task's own program.
    `max_grad_norm` clips the gradient norm; 0 turns clipping off (the authors' setting; the norm is
    still logged).  `kl_reduction` weighs the KL term: `"token_mean"` (default) averages it over every
    natural-text token, `"window_sum"` sums it over each window's tokens and averages over windows, as
    the authors' `kl_div(..., reduction="batchmean")` does (`kl_window_len` times the token mean).

    Levers that let the alignment shape the early blocks (defaults: the paper's method, and what a record
    written before they existed means; `inject.levers` explains each):
    `alignment_balance="early_grad"` rescales the alignment term so that its gradient norm on the blocks
    up to the roll block is `alignment_weight` times the task term's there (measured every
    `balance_every` steps, smoothed, never below 1x and at most `balance_cap` times the fixed weight).
    `alignment_first_steps` N: the first N steps train the alignment (and KL) alone, no task loss and no
    detach-and-roll; the LM's learning-rate warm-up starts again at step N.  `map_init="lstsq"` starts the
    map at the ridge least-squares fit of the teacher targets on the LM's hidden states of the run's first
    examples (all aligned levels jointly).  `clip_per_term` clips each term's gradient to `max_grad_norm`
    on its own, then sums (instead of clipping the sum).  `alignment_variable_weighting="equal"` stretches
    each teacher variable's dims so that every variable has the same mean squared norm in the targets
    (1, a one-hot's), on top of `alignment_scales`.
    """

    task: str = "dyck"
    teacher: str | None = None
    method: str = "inject"
    model: str = "smollm2"
    out: str = "runs/dyck-inject"
    steps: int = 300
    batch_size: int = 8
    lr_lm: float = 1e-5
    lr_map: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    alignment_weight: float = 1.0
    alignment_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    kl_weight: float = 1.0
    kl_reduction: str = "token_mean"
    kl_source: str = "self"
    kl_windows: int = 256
    kl_window_len: int = 30
    kl_batch_size: int = 4
    kl_top_k: int = 1024  # benchmarks/results/kl_topk.json: KL within 2-5% on SmolLM2 (4096: <2%)
    layer_strategy: str = "identity"
    roll_block: int | None = None
    roll_align: str = "answer"
    subspace_forcing_steps: int = 0
    probe_every: int = 50
    accuracy_every: int = 0
    alignment_balance: str = "none"
    balance_every: int = 10
    balance_cap: float = 100.0
    alignment_first_steps: int = 0
    map_init: str = "default"
    clip_per_term: bool = False
    alignment_variable_weighting: str = "residual"
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    train_split: str = "train"
    eval_split: str = "test"
    eval_examples: int = 200

    def __post_init__(self) -> None:
        for name, hint in field_types().items():
            if not has_type(getattr(self, name), hint):
                raise ConfigError(f"{name} must be {type_name(hint)}, got {getattr(self, name)!r}.")
        choices_of = {
            "method": METHODS, "roll_align": ROLL_ALIGN, "mixed_precision": MIXED_PRECISION,
            "kl_reduction": KL_REDUCTIONS, "alignment_balance": ALIGNMENT_BALANCES, "map_init": MAP_INITS,
            "alignment_variable_weighting": VARIABLE_WEIGHTINGS,
        }  # fmt: skip
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        for name, low in [(n, 1) for n in AT_LEAST_ONE] + [(n, 0) for n in NOT_NEGATIVE]:
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value!r}.")
        for name, factor in self.alignment_scales.items():
            if factor <= 0:
                raise ConfigError(f"alignment_scales: the factor of {name!r} must be > 0, got {factor!r}.")
        self.check_levers()

    def check_levers(self) -> None:
        """The alignment levers act on the alignment only, and per-term clipping needs a norm to clip to."""
        inject_only = {
            "alignment_balance": self.alignment_balance != "none",
            "alignment_first_steps": self.alignment_first_steps > 0,
            "map_init": self.map_init != "default",
            "alignment_variable_weighting": self.alignment_variable_weighting != "residual",
        }
        if not self.injecting and any(inject_only.values()):
            used = [name for name, on in inject_only.items() if on]
            raise ConfigError(f"{', '.join(used)} act on the alignment, which method {self.method!r} does not have.")
        if self.clip_per_term and self.max_grad_norm == 0:
            raise ConfigError("clip_per_term clips each term to max_grad_norm; set max_grad_norm > 0.")
        if self.clip_per_term and self.mixed_precision == "fp16":
            raise ConfigError("clip_per_term takes its gradients without the fp16 loss scaler; use bf16 or no.")

    @property
    def injecting(self) -> bool:
        """Whether the alignment term and detach-and-roll are on."""
        return self.method == "inject"

    @property
    def clip_norm(self) -> float:
        """The norm gradients are clipped to: `max_grad_norm`, or infinity (no clipping) when it is 0."""
        return self.max_grad_norm if self.max_grad_norm > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the manifest and checkpoints)."""
        return dataclasses.asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint (not the budget or bookkeeping)."""
        free = {
            "steps", "out", "checkpoint_every", "keep_checkpoints", "eval_examples", "probe_every",
            "accuracy_every",
        }  # fmt: skip
        return {k: v for k, v in self.to_dict().items() if k not in free}

    def command(self) -> str:
        """The `tracr-inject train` command that trains exactly this config (defaults left out)."""
        flags = [f"--task {self.task}", f"--method {self.method}", f"--model {shlex.quote(str(self.model))}"]
        flags.append(f"--seed {self.seed}")
        spelled = {"out", "task", "method", "model", "seed"}
        defaults = TrainConfig().to_dict()
        for key, value in self.to_dict().items():
            if key == "alignment_scales":
                flags += alignment_scale_flags(value)
            elif isinstance(value, bool) and value != defaults[key]:
                flags.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
            elif key not in spelled and value != defaults[key] and value is not None:
                flags.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
        return f"tracr-inject train {' '.join(flags)} --out {shlex.quote(str(self.out))}"

    @classmethod
    def from_record(cls, values: dict[str, Any]) -> TrainConfig:
        """The config a manifest or checkpoint recorded; fields added since it was written take their defaults."""
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Config from a YAML file (optional), then `overrides` (flags) that are not None."""
        values = read_yaml(Path(path)) if path is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def alignment_scale_flags(scales: Mapping[str, float]) -> list[str]:
    """`--alignment-scale VAR=FACTOR` per entry, as `train` and `reproduce` take them."""
    return [f"--alignment-scale {shlex.quote(f'{name}={factor}')}" for name, factor in scales.items()]


def read_yaml(path: Path) -> dict[str, Any]:
    """The TrainConfig fields a YAML file sets (an empty file sets none), with YAML 1.1's string-typed
    exponent floats such as `1e-5` read as numbers; a `ConfigError` for anything else."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"Cannot read the config file {path}: {err.strerror or err}.") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path} is not valid YAML{line}: {problem}; fix the file.") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path} must hold a mapping of TrainConfig fields (e.g. `steps: 300`), "
            f"not a {type(loaded).__name__}."
        )
    hints = field_types()
    unknown = sorted(map(str, set(loaded) - set(hints)))
    if unknown:
        raise ConfigError(f"Unknown keys in {path}: {', '.join(unknown)}; valid keys: {', '.join(hints)}.")
    values = {name: as_float(value) if hints[name] is float else value for name, value in loaded.items()}
    try:
        TrainConfig(**values)  # checked alone, so that an error names the file
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return values


def as_float(value: Any) -> Any:
    """A string YAML left unparsed (`1e-5`: YAML 1.1 wants `1.0e-5`) as a float; anything else unchanged."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@functools.cache
def field_types() -> dict[str, Any]:
    """TrainConfig's field names and their (evaluated) type hints, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits `hint` (int, float, str, X | None, dict[str, float]); an int counts as a float,
    a bool as neither."""
    if isinstance(hint, types.UnionType):
        return any(has_type(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            return False
        key, item = typing.get_args(hint)
        return all(has_type(k, key) and has_type(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def type_name(hint: Any) -> str:
    """`int | None` -> "an integer or null", for error messages."""
    if isinstance(hint, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        return "a mapping of names to numbers"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names[hint]
