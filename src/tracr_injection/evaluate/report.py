"""The human-readable side of an evaluation: report.md and its PNG plots.

In: the metrics dict of `evaluate.pipeline` and an output folder.  Out: `report.md` (readable
in a minute: accuracy per split with breakdowns, kept language ability, decoding of the output
variable, answer readout, causal effects, one example token by token) and `accuracy.png`, `decoding_<decoder>.png`
(variables x levels heatmaps per split), `noise.png` (accuracy vs noise norm, output vs random
subspace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def pct(value: float | None) -> str:
    """A rate as a percentage with one decimal ("–" when missing)."""
    return "–" if value is None else f"{100 * value:.1f}%"


def fmt_value(value: Any) -> str:
    """A decoded or true variable value, short (floats to 3 significant digits)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots


def plot_accuracy(accuracy: dict[str, Any], path: Path, title: str) -> Path:
    """Bar chart of greedy exact-match accuracy per split (ID first, then OOD)."""
    splits = list(accuracy)
    values = [accuracy[s]["accuracy"] for s in splits]
    colors = ["tab:blue" if accuracy[s]["kind"] == "test" else "tab:orange" for s in splits]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(splits), 3.2))
    bars = ax.bar(splits, values, color=colors)
    ax.bar_label(bars, labels=[f"{100 * v:.0f}%" for v in values], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def decoding_matrix(result: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Variables and their accuracy per level as a float matrix (NaN where the variable is not yet written)."""
    names = list(result["accuracy"])
    matrix = np.array(
        [[np.nan if a is None else a for a in result["accuracy"][n]] for n in names], dtype=float
    ).reshape(len(names), -1)
    return names, matrix


def plot_decoding(decoding: dict[str, Any], path: Path, title: str) -> Path | None:
    """One heatmap (variables x aligned levels) of decoding accuracy per split the teacher represents."""
    splits = [s for s, r in decoding.items() if not r.get("skipped") and r["accuracy"]]
    if not splits:
        return None
    names, _ = decoding_matrix(decoding[splits[0]])
    fig, axes = plt.subplots(
        1, len(splits), figsize=(1.6 + 2.4 * len(splits), 0.9 + 0.32 * len(names)), squeeze=False
    )
    for ax, split in zip(axes[0], splits):
        names, matrix = decoding_matrix(decoding[split])
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")  # fmt: skip
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_xlabel("aligned level")
        ax.set_title(split, fontsize=9)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0][0] else [], fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="decoding accuracy")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_noise(causal: dict[str, Any], path: Path, title: str) -> Path:
    """Accuracy vs noise norm inside the output subspace and inside a random one (absolute and relative)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, norms_key, label in (
        (axes[0], "noise", "noise_norms", "noise norm"),
        (axes[1], "relative_noise", "relative_norms", "noise norm / hidden-state norm"),
    ):
        for subspace, style in (("output", "o-"), ("random", "s--")):
            ax.plot(causal[norms_key], causal[key][subspace], style, label=f"{subspace} subspace")
        ax.set_xlabel(label)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (block {causal['block']}, {causal['k']} dims)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ report


def accuracy_section(accuracy: dict[str, Any]) -> str:
    """Accuracy per split, then each split's breakdowns."""
    rows = [[s, r["kind"], r["n"], pct(r["accuracy"])] for s, r in accuracy.items()]
    parts = [
        "## Task accuracy (greedy exact match)",
        markdown_table(["split", "kind", "n", "accuracy"], rows),
    ]
    breakdown_rows = [
        [split, name, key, cell["n"], pct(cell["accuracy"])]
        for split, r in accuracy.items()
        for name, cells in r["breakdowns"].items()
        for key, cell in cells.items()
    ]
    if breakdown_rows:
        parts.append(markdown_table(["split", "by", "group", "n", "accuracy"], breakdown_rows))
    return "\n\n".join(parts)


def ood_section(views: Mapping[str, Any]) -> str:
    """report.md's section: almost_balanced by length bin and the balanced accuracy."""
    rows = [
        [name, cell["n"], pct(cell["accuracy"])] for name, cell in views["almost_balanced_by_length"].items()
    ]
    parts = [
        "## Out of distribution: generalisation or bias?",
        "`almost_balanced` (always no) by input length:",
        markdown_table(["length", "n", "accuracy"], rows),
    ]
    if "balanced_accuracy" in views:
        parts.append(
            "Balanced accuracy of `almost_balanced` (always no) with `balanced_long` (always yes): "
            f"{pct(views['balanced_accuracy']['accuracy'])} (a constant answer scores 50%)."
        )
    return "\n\n".join(parts)


def language_section(language: dict[str, Any]) -> str:
    """Perplexity, KL and top-1 agreement on held-out text (and lm-eval when it ran)."""
    perplexity = (
        f"{language['perplexity_original']:.2f} -> {language['perplexity_trained']:.2f} "
        f"(x{language['perplexity_ratio']:.3f})"
    )
    rows = [
        ["perplexity (original -> trained)", perplexity],
        ["KL(original ‖ trained) per token", f"{language['kl_original_trained']:.4f}"],
        ["top-1 agreement", pct(language["top1_agreement"])],
        ["held-out text", f"{language['num_windows']} windows ({language['text_source']})"],
    ]
    text = "## Kept language ability\n\n" + markdown_table(["metric", "value"], rows)
    if "lm_eval" in language:
        text += f"\n\nlm-evaluation-harness: {language['lm_eval']['status']}"
        for task, scores in language["lm_eval"].get("scores", {}).items():
            text += f"\n- {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    return text


def output_decoding_rows(decoding: dict[str, Any], output_variable: str) -> list[list[str]]:
    """Per decoder and split: the output variable's decoding accuracy at each level where it is written."""
    rows = []
    for decoder, by_split in decoding.items():
        for split, result in by_split.items():
            if result.get("skipped"):
                rows.append([decoder, split, f"skipped: {result['skipped']}"])
                continue
            levels = result["accuracy"].get(output_variable, [])
            cells = [f"L{i} {pct(a)}" for i, a in enumerate(levels) if a is not None]
            rows.append([decoder, split, ", ".join(cells)])
    return rows


def decoding_section(decoding: dict[str, Any], output_variable: str, plots: list[str]) -> str:
    """The output variable's decoding per split and decoder, with the heatmaps of every variable."""
    intro = (
        "## Decoding the program's variables\n\n"
        f"Output variable `{output_variable}` decoded from the LM's hidden states "
        "(`map`: the learned alignment map; `probe`: ridge probe fitted post hoc on training-split examples).\n\n"
    )
    table = markdown_table(
        ["decoder", "split", "accuracy per aligned level"], output_decoding_rows(decoding, output_variable)
    )
    text = intro + table
    return text + "".join(f"\n\n![{p}]({p})" for p in plots)


def baseline_section(comparison: dict[str, Any]) -> str:
    """Per teacher variable, the run's map decoding beside the baseline run's post-hoc probe, split by split."""
    splits = comparison["splits"]
    header = ["variable", "level"] + [f"{s}: {who}" for s in splits for who in ("map", "baseline probe")]
    rows = [
        [name, f"L{row['level']}", *(pct(row[s][who]) for s in splits for who in ("map", "baseline_probe"))]
        for name, row in comparison["variables"].items()
    ]
    text = (
        f"## Map decoding beside the baseline's probe (baseline `{comparison['baseline']['name']}`)\n\n"
        "Each variable at the level it is written: through this run's learned map, and through the ridge probe "
        "fitted post hoc on the baseline run.\n\n" + markdown_table(header, rows)
    )
    if not splits:
        return text
    first = splits[0]
    columns = ("majority", "map", "baseline_probe", "map_balanced", "baseline_probe_balanced", "map_as_number",
               "baseline_probe_as_number")  # fmt: skip
    detail = [[name, f"L{row['level']}", *(pct(row[first].get(c)) for c in columns)]
              for name, row in comparison["variables"].items()]  # fmt: skip
    return (
        text + f"\n\nOn `{first}`, beside the share of the most common true value (what a decoder that knows "
        "only that value scores), the balanced accuracies (mean over true values of the share decoded "
        "right) and, for counts and differences, both read as a number (the one-hot block's scores weighted "
        "by the values: a linear read of a count held as a magnitude):\n\n" + markdown_table(
            ["variable", "level", "most common value", "map", "baseline probe", "map balanced",
             "baseline probe balanced", "map as number", "baseline probe as number"], detail,
        )  # fmt: skip
    )


def readout_section(readout: dict[str, Any]) -> str:
    """Per decoder and split, at the answer positions: subspace right, LM right, and whom the LM follows."""
    rows = [
        [decoder, split, r["positions"], pct(r["subspace_accuracy"]), pct(r["lm_accuracy"]),
         pct(r["lm_agrees_with_subspace"]), r["subspace_wrong"], pct(r["lm_follows_subspace_when_wrong"]),
         pct(r["lm_right_when_subspace_wrong"]), pct(r["lm_wrong_when_subspace_right"])]
        for decoder, by_split in readout.items()
        for split, r in by_split.items()
    ]  # fmt: skip
    header = ["decoder", "split", "answer positions", "subspace right", "LM right", "LM says the subspace's answer",
              "subspace wrong (n)", "LM follows it there", "LM right there", "LM wrong where subspace right"]  # fmt: skip
    return (
        "## Answer readout (output variable at the last aligned level, at every answer position)\n\n"
        "Where the subspace is wrong, an LM that reads its answer from it is wrong the same way.\n\n"
        + markdown_table(header, rows)
    )


def causal_section(causal: dict[str, Any], plot: str) -> str:
    """Clean accuracy, ablation, noise at the largest norm and interchange, output vs random subspace."""
    inter = causal["interchange"]
    rows = [
        ["clean accuracy", pct(causal["clean_accuracy"]), pct(causal["clean_accuracy"])],
        ["ablation (project the subspace out)", pct(causal["ablation"]["output"]), pct(causal["ablation"]["random"])],
        [f"noise, norm {causal['noise_norms'][-1]:g}", pct(causal["noise"]["output"][-1]),
         pct(causal["noise"]["random"][-1])],
        [f"noise, {causal['relative_norms'][-1]:g} x ‖h‖", pct(causal["relative_noise"]["output"][-1]),
         pct(causal["relative_noise"]["random"][-1])],
        ["interchange: answer follows the source", pct(inter["output"]["source_followed"]),
         pct(inter["random"]["source_followed"])],
        ["interchange: base answer kept", pct(inter["output"]["base_kept"]), pct(inter["random"]["base_kept"])],
    ]  # fmt: skip
    return (
        f"## Causal tests (block {causal['block']}, {causal['k']}-dim subspace from the {causal['subspace']})\n\n"
        + markdown_table(["intervention", "output subspace", "random subspace"], rows)
        + f"\n\nWithout intervention the answer follows the source in "
        f"{pct(inter['none']['source_followed'])} of {causal['pairs']} pairs.\n\n![{plot}]({plot})"
    )


def example_section(example: dict[str, Any], output_variable: str) -> str:
    """One test example token by token: teacher symbol, decoded vs true output variable (and the others)."""
    names = list(example["rows"][0]["values"]) if example["rows"] else []
    names = [output_variable] + [n for n in names if n != output_variable]
    header = ["pos", "token", "symbol"] + [f"{n} (decoded / true)" for n in names]
    rows = []
    for row in example["rows"]:
        values = row["values"]
        cells = [f"{fmt_value(values[n]['decoded'])} / {fmt_value(values[n]['true'])}" for n in names]
        rows.append([row["position"], repr(row["token"]), row["symbol"], *cells])
    level_note = (
        ", ".join(f"{n} at L{example['rows'][0]['values'][n]['level']}" for n in names) if names else ""
    )
    return f"## One example, token by token ({example['decoder']}; {level_note})\n\n" + markdown_table(
        header, rows
    )


def write_report(metrics: dict[str, Any], folder: str | Path) -> Path:
    """Write report.md and its PNG plots into `folder`; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subject = metrics["subject"]
    title = f"{subject['name']}: {subject['method']} on {subject['task']}"
    plot_accuracy(metrics["accuracy"], folder / "accuracy.png", title)
    decoding_plots = []
    for decoder, by_split in metrics["decoding"].items():
        name = f"decoding_{decoder}.png"
        if plot_decoding(by_split, folder / name, f"{title}: decoding via the {decoder}"):
            decoding_plots.append(name)
    plot_noise(metrics["causal"], folder / "noise.png", title)
    output_variable = metrics["output_variable"]
    header = (
        f"# Evaluation of {title}\n\nBase model `{subject['base_model']}`, seed {subject['seed']}, "
        f"layer map {subject['layer_map']}, intervention block {subject['block']}."
    )
    sections = [
        header,
        accuracy_section(metrics["accuracy"]) + "\n\n![accuracy.png](accuracy.png)",
        *([ood_section(metrics["ood"])] if "ood" in metrics else []),
        language_section(metrics["language"]),
        decoding_section(metrics["decoding"], output_variable, decoding_plots),
        *([baseline_section(metrics["baseline_comparison"])] if "baseline_comparison" in metrics else []),
        *([readout_section(metrics["readout"])] if "readout" in metrics else []),
        causal_section(metrics["causal"], "noise.png"),
        example_section(metrics["example"], output_variable),
        "## Timings (s)\n\n" + markdown_table(["part", "seconds"], list(metrics["timings"].items())),
    ]
    path = folder / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
