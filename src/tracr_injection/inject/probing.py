"""Injection strength measured during training: map decoding per teacher variable and gradient norms per loss term.

In: the training objective (LM + map), its config, the task's teacher and tokenizer.  Out: every
`probe_every` steps (and at step 0 and the last step) one extra line of metrics.jsonl, also logged to
TensorBoard, and `probes.png` in the run folder.  A probe line holds `step` (the weights after that many
updates), `seconds` (the probe's wall time) and keys under `probe/`:

- `probe/decode/{split}/{variable}`: the map's decoding accuracy of each teacher variable at the level it is
  written (`TeacherVariable.level`), on the real positions of a fixed batch of each split the teacher can
  represent (the in-distribution eval split and every OOD split; `PROBE_EXAMPLES` examples, the first ones
  evaluation's decoding draws), read exactly as `tracr-inject eval` reads it (`inject.linear_decoding`).
  Inject runs only: a baseline has no map.
- `probe/as_number/{split}/{variable}`: for each ordinal variable (a count, a difference;
  `linear_decoding.is_ordinal`) the same map read as a number, as evaluation's `as_number` table reads it:
  the curve of a map that holds the value as a magnitude rather than as a one-hot.
- `probe/grad/{term}/{group}`: the gradient norm of each loss term as it enters the loss (weight included:
  `task_ce`, `alignment`, `kl`; `InjectionObjective.terms`) on the parameters of the decoder blocks
  `0..roll block` (`early`: everything the task loss reaches only through the injected subspace under
  detach-and-roll, the roll block itself included) and of the blocks after it (`late`). Embeddings, the
  final norm and the head are in neither group (SmolLM2 ties the embedding to the head). Measured under the
  training step's own edit (detach-and-roll, subspace forcing while it lasts) on the first `batch_size`
  examples of the in-distribution batch and the first `kl_batch_size` KL windows, so the norms are on the
  scale gradient clipping sees. A baseline is split where an inject run would roll.

With `accuracy_every`, `AccuracyProber` adds lines of `probe/accuracy/{split}`: the task accuracy
(teacher-forced exact match, `inject.answers`) on the first `ACCURACY_EXAMPLES` examples of the seed-0 draw
of every evaluated split (the in-distribution test split and every OOD split, LM-only ones included), the
same examples for every run, and draws them as `accuracy_curves.png`.

A probe runs in eval mode under a forked RNG and takes gradients with `torch.autograd.grad` (nothing is
written to `.grad`), so the same config and seed train the same weights with probes on or off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tracr_injection.compile.teacher import TeacherModel
from tracr_injection.inject.answers import answers_correct
from tracr_injection.inject.config import TrainConfig
from tracr_injection.inject.data import TaskData
from tracr_injection.inject.kl_cache import KLCache
from tracr_injection.inject.linear_decoding import (
    LinearDecoder,
    accuracy_table,
    aligned_batches,
    decode_counts,
)
from tracr_injection.inject.lm import decoder_blocks
from tracr_injection.inject.run import RunFolder
from tracr_injection.tasks import TeacherCannotRepresentError, get_task

PROBE_EXAMPLES = 32  # per split: the first examples of evaluation's seed-0 decoding draw
PREFIX = "probe/"
ACCURACY_EXAMPLES = 200  # per split, for the accuracy over training


@dataclasses.dataclass
class ProbeData:
    """The fixed probe batches: per split the decoding data, why other splits are skipped, and the gradient batches."""

    decode: dict[str, TaskData]
    skipped: dict[str, str]
    gradient: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]


def probe_data(
    config: TrainConfig, tokenizer: Any, teacher: TeacherModel, kl_cache: KLCache, with_map: bool
) -> ProbeData:
    """Fixed batches drawn once: the eval split and every OOD split the teacher represents (teacher targets
    computed here, cached on disk), the gradient batch from the eval split and the first KL windows."""
    task = get_task(config.task)
    names = [config.eval_split] + [s.name for s in task.splits if s.kind == "ood"]
    decode, skipped = {}, {}
    for split in names if with_map else []:
        try:
            decode[split] = TaskData(
                config.task, split, tokenizer, config.model, teacher=teacher,
                max_examples=PROBE_EXAMPLES, seed=0, progress=False,
            )  # fmt: skip
        except TeacherCannotRepresentError as err:
            skipped[split] = str(err)
    in_distribution = decode.get(config.eval_split)
    if in_distribution is None:  # a baseline: no teacher targets needed
        in_distribution = TaskData(
            config.task, config.eval_split, tokenizer, config.model,
            max_examples=PROBE_EXAMPLES, seed=0, progress=False,
        )  # fmt: skip
    gradient = in_distribution.collate(list(range(min(config.batch_size, len(in_distribution)))))
    kl = kl_cache.batch(list(range(min(config.kl_batch_size, len(kl_cache)))))
    return ProbeData(decode, skipped, gradient, kl)


def block_groups(model: Any, roll_block: int) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters of the decoder blocks 0..`roll_block` (`early`) and of the blocks after it (`late`)."""
    blocks = decoder_blocks(model)
    return {
        "early": [p for block in blocks[: roll_block + 1] for p in block.parameters()],
        "late": [p for block in blocks[roll_block + 1 :] for p in block.parameters()],
    }


def term_gradient_norms(
    terms: dict[str, torch.Tensor], groups: dict[str, list[torch.nn.Parameter]]
) -> dict[str, dict[str, float]]:
    """Per loss term and parameter group, the L2 norm of the term's gradient (autograd.grad: `.grad` untouched)."""
    params = [p for group in groups.values() for p in group]
    norms: dict[str, dict[str, float]] = {}
    for name, term in terms.items():
        grads = iter(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
        norms[name] = {}
        for group, members in groups.items():
            squares = [g.float().square().sum() for g in (next(grads) for _ in members) if g is not None]
            norms[name][group] = math.sqrt(float(sum(squares))) if squares else 0.0
    return norms


def written_level_accuracy(
    model: Any, decoder: LinearDecoder, teacher: TeacherModel, layer_map: list[int], data: TaskData
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per teacher variable, the decoder's accuracy at the level the variable is written over `data`, and per
    ordinal variable its accuracy read as a number there."""
    batches = aligned_batches(model, data, layer_map, list(range(len(data))))
    hits, totals, number_hits = decode_counts(batches, decoder, teacher)
    table, as_number = accuracy_table(hits, totals), accuracy_table(number_hits, totals)
    level_of = {var.name: var.level for var in teacher.config.variables}
    return (
        {name: table[name][level] for name, level in level_of.items()},
        {name: row[level_of[name]] for name, row in as_number.items()},
    )


@contextlib.contextmanager
def untouched(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and a forked RNG for the block; training flag and RNG state restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        module.train(was_training)


def due_every(step: int, every: int, last: int) -> bool:
    """Whether a probe is due after `step` updates: at 0, every `every`-th and the `last`; never for every <= 0."""
    return every > 0 and (step % every == 0 or step == last)


def append_record(
    record: dict[str, Any], metrics_file: Path, log: Callable[[dict[str, float], int], None], step: int
) -> None:
    """Append `record` to metrics.jsonl as one line and log its probe values (keys under PREFIX, not None)."""
    with metrics_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
    log({k: v for k, v in record.items() if k.startswith(PREFIX) and v is not None}, step)


class Prober:
    """Takes the probes of one run and writes them (main process only; see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        objective: Any,
        teacher: TeacherModel,
        tokenizer: Any,
        kl_cache: KLCache,
        out: Path,
        log: Callable[[dict[str, float], int], None],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.config, self.objective, self.teacher = config, objective, teacher
        self.device = next(objective.parameters()).device
        self.metrics_file, self.plot_file = RunFolder(out).metrics_file, RunFolder(out).probe_plot
        self.log, self.autocast = log, autocast
        layer_map = objective.parts.layer_map
        self.groups = block_groups(
            objective.lm, layer_map[-1] if config.roll_block is None else config.roll_block
        )
        with untouched(objective, self.device):
            self.data = probe_data(config, tokenizer, teacher, kl_cache, with_map=objective.amap is not None)

    def due(self, step: int) -> bool:
        """Whether a probe is taken after `step` updates: 0, every `probe_every`-th and the last."""
        return due_every(step, self.config.probe_every, self.config.steps)

    def measure(self, step: int) -> dict[str, Any]:
        """The probe record of the weights after `step` updates (see the module docstring for its keys)."""
        began = time.perf_counter()
        record: dict[str, Any] = {"step": step}
        objective = self.objective
        with untouched(objective, self.device):
            if objective.amap is not None:
                decoder = LinearDecoder.from_map(objective.amap, self.teacher.config.num_levels)
                layer_map = objective.parts.layer_map
                for split, data in self.data.decode.items():
                    accuracy, as_number = written_level_accuracy(
                        objective.lm, decoder, self.teacher, layer_map, data
                    )
                    record.update({f"{PREFIX}decode/{split}/{name}": a for name, a in accuracy.items()})
                    record.update({f"{PREFIX}as_number/{split}/{name}": a for name, a in as_number.items()})
            batch = {k: v.to(self.device) for k, v in self.data.gradient.items()}
            kl_batch = {k: v.to(self.device) for k, v in self.data.kl.items()}
            forced = step < self.config.subspace_forcing_steps
            with torch.enable_grad(), self.autocast():
                terms, _ = objective.terms(batch, kl_batch, force_subspace=forced)
            for term, by_group in term_gradient_norms(terms, self.groups).items():
                record.update({f"{PREFIX}grad/{term}/{group}": norm for group, norm in by_group.items()})
        record["seconds"] = time.perf_counter() - began
        return record

    def record(self, step: int) -> dict[str, Any]:
        """Measure after `step` updates, append the line to metrics.jsonl, log it and redraw probes.png."""
        record = self.measure(step)
        append_record(record, self.metrics_file, self.log, step)
        plot_probes(
            read_probe_lines(self.metrics_file), self.plot_file, self.data.skipped, self.config.eval_split
        )
        return record


def accuracy_splits(task_name: str) -> list[str]:
    """The splits evaluation scores: every split but train, in the task's order."""
    return [s.name for s in get_task(task_name).splits if s.kind != "train"]


class AccuracyProber:
    """Task accuracy on fixed examples of every evaluated split every `accuracy_every` steps (see the module
    docstring); main process only."""

    def __init__(self, config: TrainConfig, lm: Any, tokenizer: Any, out: Path,
                 log: Callable[[dict[str, float], int], None]):  # fmt: skip
        self.config, self.lm, self.log = config, lm, log
        self.device = next(lm.parameters()).device
        self.metrics_file, self.plot_file = RunFolder(out).metrics_file, RunFolder(out).accuracy_plot
        self.data = {
            split: TaskData(config.task, split, tokenizer, config.model, max_examples=ACCURACY_EXAMPLES, seed=0,
                            progress=False)
            for split in accuracy_splits(config.task)
        }  # fmt: skip

    def due(self, step: int) -> bool:
        """Whether accuracy is measured after `step` updates: 0, every `accuracy_every`-th and the last."""
        return due_every(step, self.config.accuracy_every, self.config.steps)

    def measure(self, step: int) -> dict[str, Any]:
        """`{"step", "probe/accuracy/<split>": accuracy, "seconds"}` for the weights after `step` updates."""
        began = time.perf_counter()
        record: dict[str, Any] = {"step": step}
        with untouched(self.lm, self.device):
            for split, data in self.data.items():
                correct = answers_correct(self.lm, data, len(data))
                record[f"{PREFIX}accuracy/{split}"] = float(correct.float().mean())
        record["seconds"] = time.perf_counter() - began
        return record

    def record(self, step: int) -> dict[str, Any]:
        """Measure after `step` updates, append the line to metrics.jsonl, log it and redraw the curves."""
        record = self.measure(step)
        append_record(record, self.metrics_file, self.log, step)  # accuracies are never None
        plot_accuracy_curves({"run": accuracy_series(read_probe_lines(self.metrics_file))}, self.plot_file)
        return record


def accuracy_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """split -> [(step, accuracy)] from a run's probe lines."""
    series: dict[str, list[tuple[int, float]]] = {}
    prefix = f"{PREFIX}accuracy/"
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix):
                series.setdefault(key.removeprefix(prefix), []).append((record["step"], value))
    return series


def plot_accuracy_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    path: Path,
    spread: dict[str, dict[str, list[float]]] | None = None,
) -> Path | None:
    """One panel per split: accuracy vs step, a line per curve (a run, or a method's mean over seeds, with
    `spread[curve][split]` its std as a band); None when there is nothing to draw."""
    splits = list(dict.fromkeys(s for series in curves.values() for s in series))
    if not splits:
        return None
    fig, axes = plt.subplots(1, len(splits), figsize=(3.2 * len(splits), 3.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for name, series in curves.items():
            if split not in series:
                continue
            steps, values = zip(*series[split])
            ax.plot(steps, values, marker=".", label=name)
            if spread and split in spread.get(name, {}):
                low = [v - s for v, s in zip(values, spread[name][split])]
                high = [v + s for v, s in zip(values, spread[name][split])]
                ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def is_probe_line(record: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl record is a probe line (not a training step's)."""
    return any(key.startswith(PREFIX) for key in record)


def read_probe_lines(metrics_file: Path) -> list[dict[str, Any]]:
    """The probe lines of a run's metrics.jsonl, in order."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return [line for line in lines if is_probe_line(line)]


def probe_series(records: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(split, variable) for `decode`, (term, group) for `grad` -> [(step, value)], None values left out."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(f"{PREFIX}{kind}/") and value is not None:
                first, second = key[len(f"{PREFIX}{kind}/") :].split("/", 1)
                series.setdefault((first, second), []).append((record["step"], value))
    return series


def draw_decoding(
    ax: Any, series: dict[tuple[str, str], list[tuple[int, float]]], in_distribution: str
) -> None:
    """Accuracy per (split, variable) vs step on `ax`: a color per variable, ID solid, each OOD split dashed."""
    variables = sorted({v for _, v in series}, key=[v for _, v in series].index)
    ood = sorted({s for s, _ in series if s != in_distribution})
    dashes = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
    styles = {in_distribution: "-", **{s: dashes[i % len(dashes)] for i, s in enumerate(ood)}}
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variables)}
    for (split, var), points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, linestyle=styles[split], color=colors[var], marker=".",
                label=var if split == in_distribution else None)  # fmt: skip
    for split, style in styles.items():
        ax.plot([], [], linestyle=style, color="gray", label=f"split: {split}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("map decoding accuracy (level written)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_probes(
    records: list[dict[str, Any]], path: Path, skipped: dict[str, str], in_distribution: str
) -> Path | None:
    """Decoding accuracy per variable vs step (ID solid, OOD dashed; the ordinal variables read as numbers in a
    panel of their own where the lines carry that read) and gradient norm per term and block group (log scale)
    in one PNG; None when there is nothing to draw."""
    grad = probe_series(records, "grad")
    if not grad:
        return None
    reads = {kind: series for kind in ("decode", "as_number") if (series := probe_series(records, kind))}
    rows = max(
        (len({v for _, v in pairs}) + len({s for s, _ in pairs}) for pairs in reads.values()), default=0
    )
    height = max(4.2, 0.17 * rows + 1.0)  # tall enough for the legend of a program with many variables
    fig, axes = plt.subplots(1, len(reads) + 1, figsize=(7.2 * (len(reads) + 1), height), squeeze=False)
    note = f" (skipped: {', '.join(skipped)})" if skipped else ""
    titles = {"decode": "decoding through the map", "as_number": "ordinal variables read as numbers (map)"}
    for ax, (kind, series) in zip(axes[0], reads.items()):
        draw_decoding(ax, series, in_distribution)
        ax.set_title(titles[kind] + note, fontsize=9)
    ax = axes[0][-1]
    term_colors = {"task_ce": "tab:blue", "alignment": "tab:orange", "kl": "tab:green"}
    for (term, group), points in grad.items():
        positive = [
            (step, value) for step, value in points if value > 0
        ]  # 0: the term cannot reach the group
        if positive:
            steps, values = zip(*positive)
            ax.plot(steps, values, "-" if group == "early" else "--", color=term_colors.get(term, "gray"),
                    marker="o" if group == "early" else "x", label=f"{term}, {group} blocks")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm of the term")
    ax.set_title(
        "gradient norm per loss term (early: blocks 0..roll block; late: after; 0 not drawn)", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
