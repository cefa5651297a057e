"""Does the numerical Dyck counter extrapolate?  Decoded vs true share of openers, by bracket count.

For one trained `dyck_frac` run (its map, or its post-hoc probe for a baseline), reads at the last aligned
level, on 100 examples of the `test`, `almost_balanced` and `length` splits, at every closer and at the
trigger (where `dyck_open_frac` is the share of openers among the brackets it averages over, n of them):
the raw decoded fraction (its dim over the mapped `one` dim, not snapped), and the decoded categorical
comparison `dyck_open_share` (lt / eq / gt 1/2) and flag `dyck_bad`.  Reports, per bucket of n, the mean
absolute error of the fraction and the accuracy of the comparison and the flag; and at the trigger, how
often the comparison is decoded as each value.  Prints JSON.

    python analysis/dyck_frac_counter.py runs/frac/cpu/dyck_frac-inject-s0 > frac.json
"""

from __future__ import annotations

import collections
import json
import sys

from common import bucket, bucket_order, last_level_mapped, load_run

from tracr_injection.evaluate.decoding import (
    LinearDecoder,
    aligned_batches,
    decode_mapped,
)
from tracr_injection.programs.paper import DYCK_PAIRS, TRIGGER

SPLITS = ("test", "almost_balanced", "length")
FRACTION, COMPARISON, FLAG = "dyck_open_frac", "dyck_open_share", "dyck_bad"
PAIR_OF = {c: p for p in DYCK_PAIRS for c in p}


def averaged_over(symbols: list[str]) -> list[int | None]:
    """Per position, how many brackets `dyck_open_frac` averages over (None where it is not used)."""
    counts, seen, out = collections.Counter(), 0, []
    for s in symbols:
        if s in PAIR_OF:
            counts[PAIR_OF[s]] += 1
            seen += 1
        closer = s in PAIR_OF and s == PAIR_OF[s][1]
        out.append(counts[PAIR_OF[s]] if closer else seen if s == TRIGGER else None)
    return out


def split_report(subject, decoder: LinearDecoder, split: str, examples: int = 100) -> dict:
    """Per bucket of n: fraction error, comparison and flag accuracy; the decoded comparison at the trigger."""
    config = subject.teacher.config
    data = subject.task_data(split, examples, seed=0, with_targets=True)
    fraction_dim = config.variable(FRACTION).dims[0]
    rows = collections.defaultdict(lambda: {"abs_error": 0.0, "comparison": 0, "flag": 0, "positions": 0})
    at_trigger = collections.Counter()
    for index in range(len(data)):
        (batch,) = aligned_batches(subject.model, data, subject.layer_map, [index])
        mapped, scale, truth_NT = last_level_mapped(subject, decoder, batch)
        raw = (mapped[:, fraction_dim] / scale).tolist()
        truth = {v: subject.teacher.decode_variable(truth_NT, v) for v in (FRACTION, COMPARISON, FLAG)}
        decoded = {v: decode_mapped(mapped, scale, config.variable(v)) for v in (COMPARISON, FLAG)}
        symbols = data.bridged[index].teacher_symbols
        for p, n in enumerate(averaged_over(symbols)):
            if not n:
                continue
            row = rows[bucket(n)]
            row["abs_error"] += abs(raw[p] - truth[FRACTION][p])
            row["comparison"] += int(decoded[COMPARISON][p] == truth[COMPARISON][p])
            row["flag"] += int(decoded[FLAG][p] == truth[FLAG][p])
            row["positions"] += 1
            if symbols[p] == TRIGGER:
                at_trigger[f"true {truth[COMPARISON][p]} -> decoded {decoded[COMPARISON][p]}"] += 1
    return {
        "by_bracket_count": {
            b: {
                "positions": r["positions"],
                "fraction_mean_abs_error": round(r["abs_error"] / r["positions"], 4),
                "comparison_accuracy": round(r["comparison"] / r["positions"], 3),
                "flag_accuracy": round(r["flag"] / r["positions"], 3),
            }
            for b, r in sorted(rows.items(), key=lambda kv: bucket_order(kv[0]))
        },
        "comparison_at_trigger": dict(sorted(at_trigger.items())),
    }


def main(run: str) -> None:
    subject, decoder = load_run(run)
    result = {"run": run, "decoder": decoder.kind, **{s: split_report(subject, decoder, s) for s in SPLITS}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
