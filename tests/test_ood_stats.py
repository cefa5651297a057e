"""OOD views and paired statistics: length bins and balanced accuracy on a hand case, the paired bootstrap
interval against a hand computation and numpy, and `compare_runs`' paired outputs on written metrics."""

from __future__ import annotations

import csv
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from tracr_injection.evaluate.compare import BALANCED_ACC, bootstrap_ci, compare_runs, paired_statistics
from tracr_injection.evaluate.ood import accuracy_by_length_bin, balanced_accuracy, ood_views


def test_length_bins_and_balanced_accuracy_by_hand():
    lengths = [15, 29, 30, 31, 45, 46, 89, 90, 91]
    correct = [True, False, True, True, True, False, True, False, True]
    bins = accuracy_by_length_bin(lengths, correct)
    assert list(bins) == ["15-30 (train range)", "31-45", "46-60", "76-90"]  # 61-75 empty, 91 outside
    assert bins["15-30 (train range)"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert bins["31-45"]["accuracy"] == 1.0 and bins["46-60"]["accuracy"] == 0.0
    assert bins["76-90"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert balanced_accuracy(1.0, 0.0) == 0.5  # always "no" is not generalising
    assert balanced_accuracy(0.2, 0.9) == pytest.approx(0.55)


def test_ood_views_from_split_accuracies():
    def split(lengths, correct):
        predictions = [SimpleNamespace(meta={"length": n}, correct=ok) for n, ok in zip(lengths, correct)]
        return SimpleNamespace(predictions=predictions, accuracy=sum(correct) / len(correct))

    accuracy = {
        "almost_balanced": split([20, 40, 41], [True, False, True]),
        "balanced_long": split([32], [False]),
    }
    views = ood_views("dyck", accuracy)
    assert views["almost_balanced_by_length"]["31-45"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert views["balanced_accuracy"]["accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    assert ood_views("count", accuracy) == {}
    assert "balanced_accuracy" not in ood_views("dyck", {"almost_balanced": accuracy["almost_balanced"]})


def test_bootstrap_ci_against_hand_case_and_numpy():
    assert bootstrap_ci([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1))  # no spread, no interval
    # two values: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 -> the 2.5/97.5 percentiles
    low, high = bootstrap_ci([0.0, 1.0])
    assert (low, high) == (0.0, 1.0)
    gains = [0.115, -0.085, 0.135, 0.02, 0.05]
    rng = np.random.default_rng(0)
    means = np.array(gains)[rng.integers(0, 5, size=(10_000, 5))].mean(axis=1)
    assert bootstrap_ci(gains) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    low, high = bootstrap_ci(gains)
    assert min(gains) < low < statistics.fmean(gains) < high < max(gains)
    assert bootstrap_ci(gains) == bootstrap_ci(gains)  # fixed generator seed


def fake_metrics(method: str, seed: int, accuracies: dict[str, float], ood: dict | None = None) -> dict:
    """The fields `compare.run_row` reads, with the given accuracies per split."""
    metrics = {
        "subject": {"task": "dyck", "method": method, "seed": seed},
        "output_variable": "out",
        "accuracy": {s: {"accuracy": a, "kind": "test" if s == "test" else "ood"} for s, a in accuracies.items()},
        "language": {"perplexity_ratio": 1.0, "kl_original_trained": 0.0, "top1_agreement": 1.0},
        "decoding": {},
        "causal": {
            "subspace": "probe", "ablation": {"output": 1.0, "random": 1.0}, "noise_norms": [0.0],
            "noise": {"output": [1.0], "random": [1.0]},
            "interchange": {"output": {"source_followed": 0.0}, "random": {"source_followed": 0.0}},
        },
    }  # fmt: skip
    if ood is not None:
        metrics["ood"] = ood
    return metrics


def test_paired_statistics_and_compare_outputs(tmp_path):
    base = {0: 0.20, 1: 0.10, 2: 0.30}
    gain = {0: 0.10, 1: -0.05, 2: 0.15}
    folders = []
    for method in ("baseline", "inject"):
        for seed in (0, 1, 2):
            ab = base[seed] + (gain[seed] if method == "inject" else 0.0)
            ood = {"almost_balanced_by_length": {"15-30 (train range)": {"n": 1, "correct": 1, "accuracy": 1.0}},
                   "balanced_accuracy": {"accuracy": (ab + 0.9) / 2}}  # fmt: skip
            folder = tmp_path / f"dyck-{method}-s{seed}"
            folder.mkdir()
            metrics = fake_metrics(method, seed, {"test": 0.99, "almost_balanced": ab}, ood)
            (folder / "metrics.json").write_text(json.dumps(metrics))
            folders.append(folder)
    paired = paired_statistics({m: [json.loads((f / "metrics.json").read_text()) for f in folders
                                    if m in f.name] for m in ("baseline", "inject")})  # fmt: skip
    ab = paired["splits"]["almost_balanced"]
    assert paired["seeds"] == [0, 1, 2]
    assert ab["gains"] == pytest.approx([0.10, -0.05, 0.15])
    assert ab["gain_mean"] == pytest.approx(0.2 / 3)
    assert ab["baseline_mean"] == pytest.approx(0.2) and ab["baseline_std"] == pytest.approx(0.1)
    assert ab["gain_ci95"] == pytest.approx(list(bootstrap_ci([0.10, -0.05, 0.15])))
    half = 4.302652729911275 * statistics.stdev([0.10, -0.05, 0.15]) / 3**0.5  # t(0.975, 2 df), by hand
    assert ab["gain_t95"] == pytest.approx([0.2 / 3 - half, 0.2 / 3 + half])
    assert ab["gain_t95"][0] < min(ab["gain_ci95"][0], -0.05)  # wider than the bootstrap and the seeds' range
    assert paired["splits"][BALANCED_ACC]["gain_mean"] == pytest.approx(0.2 / 6)
    assert paired["splits"]["test"]["gains"] == pytest.approx([0.0, 0.0, 0.0])
    out = compare_runs(folders, tmp_path / "cmp")
    text = (out / "comparison.md").read_text()
    assert "paired by seed" in text and "+10.0 / -5.0 / +15.0" in text and "+6.7" in text
    assert json.loads((out / "paired.json").read_text())["dyck"]["splits"]["almost_balanced"][
        "gains"
    ] == pytest.approx([0.10, -0.05, 0.15])
    rows = list(csv.DictReader((out / "paired.csv").open()))
    assert len(rows) == 3 * len(paired["splits"]) and (out / "paired.png").stat().st_size > 0
    # one method only: no paired outputs
    alone = compare_runs(folders[:3], tmp_path / "alone")
    assert (
        not (alone / "paired.json").exists() and "paired by seed" not in (alone / "comparison.md").read_text()
    )


def test_one_seed_gets_its_gain_and_no_interval(tmp_path):
    folders = []
    for method, ab in (("baseline", 0.20), ("inject", 0.35)):
        folder = tmp_path / f"dyck-{method}-s0"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(fake_metrics(method, 0, {"test": 0.99, "almost_balanced": ab})))
        folders.append(folder)
    out = compare_runs(folders, tmp_path / "cmp")
    ab = json.loads((out / "paired.json").read_text())["dyck"]["splits"]["almost_balanced"]
    assert ab["gains"] == pytest.approx([0.15]) and ab["gain_ci95"] == ab["gain_t95"] == [None, None]
    assert "+15.0" in (out / "comparison.md").read_text() and "– (one seed)" in (out / "comparison.md").read_text()
    assert (out / "paired.png").stat().st_size > 0
