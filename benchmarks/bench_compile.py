#!/usr/bin/env python
"""Benchmark tracr compile time and peak memory, plain vs ``fast_craft()``.

Every measurement runs in a fresh Python subprocess (this script, re-invoked
with ``--child``), so JAX compilation caches and the heap start cold and the
peak memory belongs to that single compile.  Reported per measurement:

* ``compile_s``: wall time of ``compile_rasp_to_model`` alone (imports and
  building the RASP program excluded);
* ``peak_rss_mb``: the child's peak resident set size,
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read by the child at exit
  (identical to what ``RUSAGE_CHILDREN`` gives the parent for that one child;
  tracemalloc is not used because it does not see JAX/XLA buffers);
* ``baseline_rss_mb``: the same figure just before compiling (imports done), so
  ``peak - baseline`` is what the compile itself added;
* ``params_sha256``: hash over all parameter arrays, so plain and fast runs of
  the same program can be checked for bit-identical weights.

By default it measures Shuffle-Dyck with 3 bracket pairs at ``--max-len`` 40
with fast_craft only; ``--with-plain`` adds plain tracr at that length (~7.5
min for N=40) and ``--plain-max-len`` adds plain+fast pairs at smaller lengths.
Further programs are given as qualified names of zero-argument builders
(``module:function``), e.g.::

  python benchmarks/bench_compile.py --program tracr.compiler.lib:make_hist \\
      --vocab a,b,c --max-len 20 --with-plain
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DYCK3 = "bench_compile:shuffle_dyck3"
REGISTERED = "registered:"
PAPER_PROGRAMS = ["dyck_trigger", "count_trigger", "sum_trigger"]
DYCK3_VOCAB = ["(", ")", "[", "]", "{", "}"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compile.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


def shuffle_dyck3() -> Any:
    """Shuffle-Dyck over (), [] and {} (tracr.compiler.lib.make_shuffle_dyck)."""
    from tracr.compiler import lib  # pylint: disable=import-outside-toplevel

    return lib.make_shuffle_dyck(["()", "[]", "{}"])


def _resolve(qualified_name: str) -> Callable[[], Any]:
    """``pkg.module:func`` (or ``pkg.module.func``) -> the function."""
    module_name, sep, attr = qualified_name.partition(":")
    if not sep:
        module_name, _, attr = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def build_program(build_fn: str, max_seq_len: int) -> Any:
    """`registered:NAME` builds a registry program at `max_seq_len`; else a zero-argument builder."""
    if build_fn.startswith(REGISTERED):
        from tracr_injection.programs.registry import get_program

        return get_program(build_fn[len(REGISTERED) :]).build(max_seq_len)
    return _resolve(build_fn)()


def registered_plan(name: str) -> tuple[str, list[Any], int, bool, int]:
    """(build_fn, vocab, default max_seq_len, causal, exactness) of a registered program."""
    from tracr_injection.compile.exactness import exactness_candidates
    from tracr_injection.programs.registry import get_program

    spec = get_program(name)
    vocab = sorted(spec.vocab, key=repr)
    return REGISTERED + name, vocab, spec.max_seq_len, spec.causal, exactness_candidates(spec.max_seq_len)[0]


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one compile in this (fresh) process and returns its measurements."""
    import contextlib  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel
    from tracr.compiler import compiling  # pylint: disable=import-outside-toplevel

    from tracr_injection.compile.fast_craft import fast_craft  # pylint: disable=import-outside-toplevel

    program = build_program(spec["build_fn"], spec["max_seq_len"])
    baseline = _max_rss_mb()
    context = fast_craft() if spec["fast"] else contextlib.nullcontext()
    start = time.perf_counter()
    with context:
        model = compiling.compile_rasp_to_model(
            program,
            set(spec["vocab"]),
            spec["max_seq_len"],
            causal=spec["causal"],
            compiler_bos="BOS",
            mlp_exactness=spec["mlp_exactness"],
        )
    seconds = time.perf_counter() - start
    peak = _max_rss_mb()

    digest = hashlib.sha256("\n".join(model.residual_labels).encode())
    for module in sorted(model.params):
        for name in sorted(model.params[module]):
            array = np.asarray(model.params[module][name])
            digest.update(f"{module}/{name}{array.shape}{array.dtype}".encode())
            digest.update(array.tobytes())
    return {
        "compile_s": seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "d_model": len(model.residual_labels),
        "num_layers": model.model_config.num_layers,
        "mlp_hidden_size": model.model_config.mlp_hidden_size,
        "params_sha256": digest.hexdigest(),
    }


def measure(
    build_fn_qualified_name: str,
    vocab: Sequence[Any],
    max_seq_len: int,
    causal: bool,
    fast: bool,
    mlp_exactness: int = 100,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Compiles the program in a fresh subprocess; returns spec + measurements.

    On failure or timeout the record has an ``error`` entry instead of numbers.
    """
    spec = {
        "build_fn": build_fn_qualified_name,
        "vocab": list(vocab),
        "max_seq_len": max_seq_len,
        "causal": causal,
        "fast": fast,
        "mlp_exactness": mlp_exactness,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout_s} s"}
    record = {**spec, "process_s": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {**record, "error": (proc.stderr or proc.stdout)[-2000:]}
    return {**record, **json.loads(lines[-1])}


def _print_table(records: list[dict[str, Any]]) -> None:
    header = (
        f"{'program':<40} {'N':>4} {'causal':>6} {'mode':>5} "
        f"{'compile_s':>10} {'peak_MB':>8} {'+MB':>7} {'d_model':>7} "
        f"{'mlp_h':>6}  sha256"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        mode = "fast" if r["fast"] else "plain"
        prefix = f"{r['build_fn']:<40} {r['max_seq_len']:>4} {r['causal']!s:>6} {mode:>5} "
        if "error" in r:
            print(prefix + "ERROR: " + r["error"].strip().splitlines()[-1])
            continue
        print(
            prefix + f"{r['compile_s']:>10.2f} {r['peak_rss_mb']:>8.0f} "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>7.0f} "
            f"{r['d_model']:>7} {r['mlp_hidden_size']:>6}  "
            f"{r['params_sha256'][:12]}"
        )
    pairs: dict[tuple, dict[bool, dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            key = (r["build_fn"], r["max_seq_len"], r["causal"])
            pairs.setdefault(key, {})[r["fast"]] = r
    for (build_fn, n, causal), by_mode in pairs.items():
        if len(by_mode) == 2:
            plain, fast = by_mode[False], by_mode[True]
            same = plain["params_sha256"] == fast["params_sha256"]
            print(
                f"{build_fn} N={n} causal={causal}: "
                f"{plain['compile_s'] / fast['compile_s']:.1f}x faster, peak RSS "
                f"{plain['peak_rss_mb']:.0f} -> {fast['peak_rss_mb']:.0f} MB, "
                f"weights {'identical' if same else 'DIFFER'}"
            )


def _parse_vocab(text: str) -> list[Any]:
    """Comma-separated tokens; all-integer vocabularies become ints."""
    tokens = text.split(",")
    return [int(t) for t in tokens] if all(t.lstrip("-").isdigit() for t in tokens) else tokens


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--max-len", type=int, default=40, help="max_seq_len of the main measurements (default 40)"
    )
    parser.add_argument(
        "--with-plain", action="store_true", help="also compile with plain tracr at --max-len (slow)"
    )
    parser.add_argument(
        "--plain-max-len",
        type=int,
        action="append",
        default=[],
        help="extra max_seq_len measured plain and fast (repeatable)",
    )
    parser.add_argument(
        "--program",
        action="append",
        default=[],
        help="extra program: qualified name of a zero-argument builder, module:function (repeatable)",
    )
    parser.add_argument(
        "--vocab", default="a,b,c", help="comma-separated vocab for --program (default a,b,c)"
    )
    parser.add_argument(
        "--no-dyck", action="store_true", help="skip the default Shuffle-Dyck 3-pair measurements"
    )
    parser.add_argument(
        "--registered",
        action="append",
        default=None,
        help=f"registered program measured at its default length, causal flag and exactness "
        f"(repeatable; default: {', '.join(PAPER_PROGRAMS)}; 'none' for none)",
    )
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--mlp-exactness", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement (default: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    programs = [] if args.no_dyck else [(DYCK3, DYCK3_VOCAB)]
    programs += [(name, _parse_vocab(args.vocab)) for name in args.program]
    plan = []  # (program, vocab, max_seq_len, fast)
    for name, vocab in programs:
        for n in sorted(set(args.plain_max_len)):
            plan += [(name, vocab, n, False), (name, vocab, n, True)]
        if args.with_plain:
            plan.append((name, vocab, args.max_len, False))
        plan.append((name, vocab, args.max_len, True))

    jobs = [(name, vocab, n, args.causal, fast, args.mlp_exactness) for name, vocab, n, fast in plan]
    for registered in args.registered or PAPER_PROGRAMS:
        if registered == "none":
            continue
        build_fn, vocab, n, causal, exactness = registered_plan(registered)
        modes = [False, True] if args.with_plain else [True]
        jobs += [(build_fn, vocab, n, causal, fast, exactness) for fast in modes]

    records = []
    for name, vocab, n, causal, fast, exactness in jobs:
        print(f"measuring {name} N={n} {'fast' if fast else 'plain'} ...", file=sys.stderr, flush=True)
        records.append(measure(name, vocab, n, causal, fast, mlp_exactness=exactness, timeout_s=args.timeout))
    _print_table(records)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "tracr": importlib.metadata.version("tracr-pypi"),
        "memory_metric": "child ru_maxrss (RUSAGE_SELF in the child), MiB",
    }
    args.out.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
