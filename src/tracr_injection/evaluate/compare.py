"""`tracr-inject compare`: the paper's table from evaluated runs, grouped by task and method over seeds.

In: evaluated run folders (`<run>/eval/metrics.json`) or evaluation folders holding metrics.json.
Out: `comparison.md` (one table per task: mean ± std over seeds of ID accuracy, each OOD split,
perplexity change, decoding accuracy and causal effects), `comparison.csv` (every metric, long
form, with the per-seed values) and `comparison.png` (accuracy per split, bars per method).  Where a task
has baseline and inject runs of the same seeds (same seed = same data order and evaluation sets), the
accuracies are also compared paired by seed: per split the mean and std per method, the gain of each seed
and a paired bootstrap 95% interval of the mean gain (`paired.json`, `paired.csv`, a table in
comparison.md, `paired.png` with the per-seed points and the interval).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracr_injection.errors import TracrInjectionError
from tracr_injection.evaluate.decoding import written_level, written_value
from tracr_injection.evaluate.report import markdown_table, plt
from tracr_injection.inject.run import RunFolder

METHOD_ORDER = {"pretrained": 0, "baseline": 1, "inject": 2}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
BALANCED_ACC = "balanced acc (almost_balanced, balanced_long)"


class CompareError(TracrInjectionError, ValueError):
    """Runs that cannot be compared (not evaluated, or nothing given)."""


def load_metrics(path: str | Path) -> dict[str, Any]:
    """metrics.json of an evaluated run folder (`<run>/eval/`) or of an evaluation folder."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist; pass run folders evaluated by `tracr-inject eval`.")
    found = RunFolder(path).find_evaluation()
    if found is None:
        raise CompareError(
            f"{path} has no evaluation ({RunFolder(path).evaluation_file}); run `tracr-inject eval {path}` first."
        )
    return json.loads(found.read_text())


def output_decoding(metrics: dict[str, Any], decoder: str, split: str) -> float | None:
    """Decoding accuracy of the output variable at the last aligned level on `split` (None if not measured)."""
    result = metrics["decoding"].get(decoder, {}).get(split)
    if not result or result.get("skipped"):
        return None
    levels = result["accuracy"].get(metrics["output_variable"]) or [None]
    return levels[-1]


def ordinal_decoding(metrics: dict[str, Any], decoder: str, split: str, table: str) -> float | None:
    """Mean over the ordinal variables (counts, differences) of `table` ("accuracy" or "as_number") at the level
    each is written, on `split` (None where not measured or the evaluation predates `as_number`)."""
    result = metrics["decoding"].get(decoder, {}).get(split)
    if not result or result.get("skipped") or not result.get("as_number"):
        return None
    values = [
        written_value(result, table, name, written_level(result["positions"][name])) for name in result["as_number"]
    ]
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def main_decoder(metrics: dict[str, Any]) -> str:
    """The decoder a run's causal tests used: the map of an injected run, else the probe."""
    return metrics["causal"]["subspace"]


def run_row(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The comparison metrics of one run (accuracy per split, kept ability, decoding, causal effects)."""
    accuracy = metrics["accuracy"]
    id_split = next(s for s, r in accuracy.items() if r["kind"] == "test")
    row: dict[str, float | None] = {f"acc {s}": r["accuracy"] for s, r in accuracy.items()}
    row.update(ood_rows(metrics.get("ood", {})))
    language, causal = metrics["language"], metrics["causal"]
    row["perplexity ratio"] = language["perplexity_ratio"]
    row["KL(orig‖trained)"] = language["kl_original_trained"]
    row["top-1 agreement"] = language["top1_agreement"]
    row["decode output (map)"] = output_decoding(metrics, "map", id_split)
    row["decode output (probe)"] = output_decoding(metrics, "probe", id_split)
    for decoder in ("map", "probe"):
        row[f"decode counts/diffs ({decoder})"] = ordinal_decoding(metrics, decoder, id_split, "accuracy")
        row[f"decode counts/diffs as number ({decoder})"] = ordinal_decoding(metrics, decoder, id_split, "as_number")
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


def ood_rows(views: dict[str, Any]) -> dict[str, float]:
    """Accuracy rows of the OOD views (`evaluate.ood`): almost_balanced per length bin, the balanced accuracy."""
    rows = {
        f"acc almost_balanced {name}": cell["accuracy"]
        for name, cell in views.get("almost_balanced_by_length", {}).items()
    }
    if "balanced_accuracy" in views:
        rows[BALANCED_ACC] = views["balanced_accuracy"]["accuracy"]
    return rows


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


def bootstrap_ci(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. paired gains): `resamples` draws of
    len(values) values with replacement from a fixed-seed generator, so the interval is reproducible."""
    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[draws].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seed_rows(runs: Sequence[dict[str, Any]]) -> dict[int, dict[str, float | None]]:
    """seed -> `run_row` of one method's runs (runs without a seed left out)."""
    return {m["subject"]["seed"]: run_row(m) for m in runs if m["subject"]["seed"] is not None}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Student-t interval of the mean (n - 1 degrees of freedom), beside the bootstrap's: with 3-5 seeds the
    percentile bootstrap is too narrow (it cannot reach beyond the seeds' own range); None for one value."""
    if len(values) < 2:
        return None, None
    from scipy import stats

    mean, half = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    quantile = float(stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return mean - quantile * half, mean + quantile * half


def paired_statistics(methods: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Inject against baseline, paired by seed, for every accuracy row both measured on every shared seed:
    mean and std per method, the gain (inject - baseline) per seed, its mean and a paired bootstrap 95%
    interval of the mean gain.  None without both methods on a common seed."""
    base, inject = seed_rows(methods.get("baseline", [])), seed_rows(methods.get("inject", []))
    seeds = sorted(set(base) & set(inject))
    if not seeds:
        return None
    names = [n for n in base[seeds[0]] if n.startswith(("acc ", "balanced acc"))]
    splits = {}
    for name in names:
        pairs = [(base[s].get(name), inject[s].get(name)) for s in seeds]
        if any(b is None or i is None for b, i in pairs):
            continue
        gains = [i - b for b, i in pairs]
        (b_mean, b_std), (i_mean, i_std) = mean_std([b for b, _ in pairs]), mean_std([i for _, i in pairs])
        splits[name.removeprefix("acc ")] = {
            "baseline_mean": b_mean, "baseline_std": b_std, "inject_mean": i_mean, "inject_std": i_std,
            "baseline": [b for b, _ in pairs], "inject": [i for _, i in pairs],
            "gains": gains, "gain_mean": statistics.fmean(gains), "gain_std": mean_std(gains)[1],
            "gain_ci95": list(bootstrap_ci(gains)) if len(gains) > 1 else [None, None],  # no interval of one
            "gain_t95": list(t_interval(gains)),
        }  # fmt: skip
    return {
        "seeds": seeds,
        "resamples": BOOTSTRAP_RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "splits": splits,
    }


def ci_text(interval: Sequence[float | None]) -> str:
    """An interval in points, or why there is none (one seed: its gain alone is no interval)."""
    low, high = interval
    return "– (one seed)" if low is None else f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def paired_table(paired: dict[str, Any]) -> str:
    """The paired comparison as Markdown (percentage points)."""
    header = ["split", "baseline", "inject", "gain per seed (" + " / ".join(map(str, paired["seeds"])) + ")",
              "mean gain", "95% CI (paired bootstrap)", "95% CI (t)"]  # fmt: skip
    rows = [
        [
            split, f"{100 * r['baseline_mean']:.1f} ± {100 * r['baseline_std']:.1f}",
            f"{100 * r['inject_mean']:.1f} ± {100 * r['inject_std']:.1f}",
            " / ".join(f"{100 * g:+.1f}" for g in r["gains"]), f"{100 * r['gain_mean']:+.1f}",
            ci_text(r["gain_ci95"]),
            ci_text(r["gain_t95"]),
        ]
        for split, r in paired["splits"].items()
    ]  # fmt: skip
    note = (
        f"Inject − baseline, paired by seed ({len(paired['seeds'])} seeds; accuracy in %, gains in points; "
        f"percentile interval of {paired['resamples']:,} bootstrap resamples of the seeds' gains, generator seed "
        f"{paired['bootstrap_seed']}; t: Student-t interval of the mean gain, n - 1 degrees of freedom)."
    )
    return note + "\n\n" + markdown_table(header, rows)


def plot_paired(paired_by_task: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per task: each split's per-seed accuracies, baseline and inject joined by a line per seed (top), and
    the per-seed gains with their mean and 95% interval (bottom)."""
    fig, axes = plt.subplots(2, len(paired_by_task), figsize=(1.2 + 1.1 * max(len(p["splits"]) for p in
                             paired_by_task.values()) * len(paired_by_task), 6.4), squeeze=False)  # fmt: skip
    for column, (task, paired) in enumerate(paired_by_task.items()):
        top, bottom = axes[0][column], axes[1][column]
        splits = list(paired["splits"])
        for j, split in enumerate(splits):
            r = paired["splits"][split]
            for b, i in zip(r["baseline"], r["inject"]):
                top.plot([j - 0.2, j + 0.2], [b, i], "-", color="gray", alpha=0.5, lw=0.8)
            top.scatter([j - 0.2] * len(r["baseline"]), r["baseline"], color="tab:blue", s=12, zorder=3)
            top.scatter([j + 0.2] * len(r["inject"]), r["inject"], color="tab:orange", s=12, zorder=3)
            bottom.scatter([j] * len(r["gains"]), r["gains"], color="gray", s=12, zorder=3)
            low, high = r["gain_ci95"]
            if low is not None:
                bottom.errorbar([j], [r["gain_mean"]], yerr=[[r["gain_mean"] - low], [high - r["gain_mean"]]],
                                fmt="o", color="black", capsize=4, zorder=4)  # fmt: skip
        top.scatter([], [], color="tab:blue", label="baseline")
        top.scatter([], [], color="tab:orange", label="inject")
        top.set_ylim(-0.03, 1.03)
        top.set_ylabel("exact-match accuracy")
        top.set_title(f"{task}: per seed ({len(paired['seeds'])} seeds)", fontsize=9)
        top.legend(fontsize=7)
        bottom.axhline(0, color="gray", lw=0.8)
        bottom.set_ylabel("gain (inject − baseline)")
        bottom.set_title("per-seed gains, mean and paired bootstrap 95% interval", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks(range(len(splits)))
            ax.set_xticklabels(splits, rotation=40, ha="right", fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_paired(paired_by_task: dict[str, dict[str, Any]], out: Path) -> None:
    """paired.json, paired.csv (a row per task, split and seed) and paired.png."""
    (out / "paired.json").write_text(json.dumps(paired_by_task, indent=2))
    with (out / "paired.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "split", "seed", "baseline", "inject", "gain", "gain_mean", "gain_ci95_low",
                         "gain_ci95_high"])  # fmt: skip
        for task, paired in paired_by_task.items():
            for split, r in paired["splits"].items():
                for seed, b, i, g in zip(paired["seeds"], r["baseline"], r["inject"], r["gains"]):
                    writer.writerow([task, split, seed, b, i, g, r["gain_mean"], *r["gain_ci95"]])
    plot_paired(paired_by_task, out / "paired.png")


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
    paired_by_task = {
        task: p for task, methods in sorted(groups.items()) if (p := paired_statistics(methods))
    }
    for task, paired in paired_by_task.items():
        sections.append(f"## {task}: inject vs baseline, paired by seed\n\n" + paired_table(paired))
    if paired_by_task:
        sections.append("![paired.png](paired.png)")
        write_paired(paired_by_task, out)
    (out / "comparison.md").write_text("\n\n".join(sections) + "\n")
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "metric", "mean", "std", "n", "values"])
        writer.writerows(csv_rows)
    plot_comparison(tables, out / "comparison.png")
    return out
