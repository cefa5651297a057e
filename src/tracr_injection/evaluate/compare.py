"""`tracr-inject compare`: the paper's table from evaluated runs, grouped by task and method over seeds.

In: evaluated run folders (`<run>/eval/metrics.json`) or evaluation folders holding metrics.json.
Out: `comparison.md` (one table per task: mean ± std over seeds of ID accuracy, each OOD split,
perplexity change, decoding accuracy and causal effects), `comparison.csv` (every metric, long
form, with the per-seed values) and `comparison.png` (accuracy per split, bars per method).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate.report import markdown_table, plt

METHOD_ORDER = {"pretrained": 0, "baseline": 1, "inject": 2}


class CompareError(TracrInjectionError, ValueError):
    """Runs that cannot be compared (not evaluated, or nothing given)."""


def load_metrics(path: str | Path) -> dict[str, Any]:
    """metrics.json of an evaluated run folder (`<run>/eval/`) or of an evaluation folder."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist; pass run folders evaluated by `tracr-inject eval`.")
    for candidate in (path / "eval" / "metrics.json", path / "metrics.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise CompareError(f"{path} has no evaluation (eval/metrics.json); run `tracr-inject eval {path}` first.")


def output_decoding(metrics: dict[str, Any], decoder: str, split: str) -> float | None:
    """Decoding accuracy of the output variable at the last aligned level on `split` (None if not measured)."""
    result = metrics["decoding"].get(decoder, {}).get(split)
    if not result or result.get("skipped"):
        return None
    levels = result["accuracy"].get(metrics["output_variable"]) or [None]
    return levels[-1]


def main_decoder(metrics: dict[str, Any]) -> str:
    """The decoder a run's causal tests used: the map of an injected run, else the probe."""
    return metrics["causal"]["subspace"]


def run_row(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The comparison metrics of one run (accuracy per split, kept ability, decoding, causal effects)."""
    accuracy = metrics["accuracy"]
    id_split = next(s for s, r in accuracy.items() if r["kind"] == "test")
    row: dict[str, float | None] = {f"acc {s}": r["accuracy"] for s, r in accuracy.items()}
    language, causal = metrics["language"], metrics["causal"]
    row["perplexity ratio"] = language["perplexity_ratio"]
    row["KL(orig‖trained)"] = language["kl_original_trained"]
    row["top-1 agreement"] = language["top1_agreement"]
    row["decode output (map)"] = output_decoding(metrics, "map", id_split)
    row["decode output (probe)"] = output_decoding(metrics, "probe", id_split)
    readout = metrics.get("readout", {}).get(main_decoder(metrics), {})
    for split, result in readout.items():
        row[f"readout {split}: subspace right"] = result["subspace_accuracy"]
        row[f"readout {split}: LM follows wrong subspace"] = result["lm_follows_subspace_when_wrong"]
    row["ablation acc"] = causal["ablation"]["output"]
    row["ablation acc (random)"] = causal["ablation"]["random"]
    row[f"noise {causal['noise_norms'][-1]:g} acc"] = causal["noise"]["output"][-1]
    row[f"noise {causal['noise_norms'][-1]:g} acc (random)"] = causal["noise"]["random"][-1]
    row["interchange follows source"] = causal["interchange"]["output"]["source_followed"]
    row["interchange follows source (random)"] = causal["interchange"]["random"]["source_followed"]
    return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: Sequence[float | None], rate: bool) -> str:
    """`mean ± std` over the seeds that measured it (percent for rates), '–' when none did."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean, std = mean_std(present)
    if rate:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def is_rate(metric: str) -> bool:
    """Whether a metric is a fraction shown as a percentage."""
    return not metric.startswith(("perplexity", "KL"))


def group_runs(paths: Sequence[str | Path]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> method -> the metrics of each run (ordered by seed)."""
    if not paths:
        raise CompareError("No runs given; pass evaluated run folders.")
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        metrics = load_metrics(path)
        subject = metrics["subject"]
        groups[subject["task"]][subject["method"]].append(metrics)
    for methods in groups.values():
        for runs in methods.values():
            runs.sort(key=lambda m: m["subject"]["seed"] if m["subject"]["seed"] is not None else -1)
    return groups


def task_table(methods: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, list]]]:
    """Metric names (in order) and method -> metric -> per-seed values for one task."""
    values: dict[str, dict[str, list]] = {}
    names: list[str] = []
    for method in sorted(methods, key=lambda m: METHOD_ORDER.get(m, 9)):
        rows = [run_row(m) for m in methods[method]]
        for row in rows:
            names += [k for k in row if k not in names]
        values[method] = {name: [row.get(name) for row in rows] for name in names}
    for per_metric in values.values():
        for name in names:
            per_metric.setdefault(name, [])
    return names, values


def plot_comparison(tables: dict[str, tuple[list[str], dict]], path: Path) -> Path:
    """Per task, accuracy on each split as bars per method (mean over seeds, std as error bars)."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), 3.4), squeeze=False)
    for ax, (task, (names, values)) in zip(axes[0], tables.items()):
        splits = [n for n in names if n.startswith("acc ")]
        width = 0.8 / max(1, len(values))
        for i, (method, per_metric) in enumerate(values.items()):
            stats = [mean_std([v for v in per_metric[s] if v is not None] or [0.0]) for s in splits]
            xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(splits))]
            ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=method)
        ax.set_xticks(range(len(splits)))
        ax.set_xticklabels([s[4:] for s in splits], rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(task)
        ax.set_ylabel("exact-match accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def compare_runs(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write comparison.md, comparison.csv and comparison.png for these runs into `out`; returns `out`."""
    out = Path(out)
    groups = group_runs(paths)  # before creating `out`: bad runs leave nothing behind
    out.mkdir(parents=True, exist_ok=True)
    tables = {task: task_table(methods) for task, methods in sorted(groups.items())}
    sections = ["# Inject vs baseline (mean ± std over seeds; rates in %)"]
    csv_rows = []
    for task, (names, values) in tables.items():
        header = ["metric"] + [f"{m} (n={len(groups[task][m])})" for m in values]
        rows = [[name] + [cell(values[m][name], is_rate(name)) for m in values] for name in names]
        sections.append(f"## {task}\n\n" + markdown_table(header, rows))
        for method, per_metric in values.items():
            for name in names:
                present = [v for v in per_metric[name] if v is not None]
                mean, std = mean_std(present) if present else (None, None)
                csv_rows.append([task, method, name, mean, std, len(present), json.dumps(per_metric[name])])
    sections.append("![comparison.png](comparison.png)")
    (out / "comparison.md").write_text("\n\n".join(sections) + "\n")
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "metric", "mean", "std", "n", "values"])
        writer.writerows(csv_rows)
    plot_comparison(tables, out / "comparison.png")
    return out
