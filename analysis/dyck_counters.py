"""Why injected Dyck counters fail out of distribution: decoded vs true value of the counting variables.

For one trained Dyck run (its map, or its post-hoc probe for a baseline), decodes `dyck_lhs` and
`dyck_rhs` (categorical counts 0..N, written by block 1) at the last aligned level on 100 examples of
the `test`, `almost_balanced` and `length` splits, at every real position, and reports the share of
each error (decoded - true, clamped to +-3) and the accuracy per true-count bucket.  Prints JSON.

    python analysis/dyck_counters.py runs/reproduce/cpu/dyck-inject-s0 > counters.json
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

SPLITS = ("test", "almost_balanced", "length")
COUNTERS = ("dyck_lhs", "dyck_rhs")


def counter_errors(subject, decoder: LinearDecoder, split: str, examples: int = 100) -> dict:
    """Error shares and accuracy per true-count bucket of each counter on `split`."""
    config = subject.teacher.config
    data = subject.task_data(split, examples, seed=0, with_targets=True)
    errors = {name: collections.Counter() for name in COUNTERS}
    hits = {name: collections.defaultdict(lambda: [0, 0]) for name in COUNTERS}
    for batch in aligned_batches(subject.model, data, subject.layer_map, list(range(len(data)))):
        mapped, scale, truth_NT = last_level_mapped(subject, decoder, batch)
        for name in COUNTERS:
            decoded = decode_mapped(mapped, scale, config.variable(name))
            truth = subject.teacher.decode_variable(truth_NT, name)
            for d, t in zip(decoded, truth):
                errors[name][max(-3, min(3, int(d) - int(t)))] += 1
                hits[name][bucket(int(t))][0] += int(d == t)
                hits[name][bucket(int(t))][1] += 1
    return {
        name: {
            "positions": sum(errors[name].values()),
            "error_share": {
                k: round(v / sum(errors[name].values()), 3) for k, v in sorted(errors[name].items())
            },
            "accuracy_by_true_count": {
                b: {"accuracy": round(a / n, 3), "positions": n}
                for b, (a, n) in sorted(hits[name].items(), key=lambda kv: bucket_order(kv[0]))
            },
        }
        for name in COUNTERS
    }


def main(run: str) -> None:
    subject, decoder = load_run(run)
    result = {"run": run, "decoder": decoder.kind, **{s: counter_errors(subject, decoder, s) for s in SPLITS}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
