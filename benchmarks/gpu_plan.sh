#!/usr/bin/env bash
# GPU plan: train + evaluate as many Dyck inject/baseline seeds of the `full` budget as fit one short GPU loan
# (one H200, 15 min of device time, 10 min per command, 64 MiB of working tree per call, 8 files back).
#
#   benchmarks/gpu_plan.sh measure          CPU: count a full-budget step's FLOPs/operators, write
#                                           benchmarks/results/gpu_plan_estimate.json (the schedule)
#   benchmarks/gpu_plan.sh run --dry-run    any machine: print the schedule and the payload sizes
#   benchmarks/gpu_plan.sh prepare          CPU: build .gpu_payload/ (part1.bin, part2.tar, payload.json)
#   benchmarks/gpu_plan.sh stage            device call 1 (carry .gpu_payload/part1.bin, .gpu_payload/payload.json)
#   benchmarks/gpu_plan.sh run              device call 2 (carry .gpu_payload/part2.tar, .gpu_payload/payload.json),
#                                           within 30 s of call 1; results land in $OUT
#   benchmarks/gpu_plan.sh run --smoke --model DIR   CPU: the device path with a tiny model, 2 steps
#
# Decision (measured sizes in GPU_PLAN.md): the only lossless compact form of the LM is the 93.8 MiB Q4_1
# GGUF it is de-quantised from (fp32 538 MB, bf16 would be lossy and 269 MB), more than one call carries,
# so it travels in two calls: part 1 = its first ~50 MiB, staged in the machine's /tmp; part 2 = the rest
# + the Dyck teacher artifact gzipped (106 MB of mostly zeros -> 0.6 MB) + wheels of tracr-pypi, dm-haiku,
# jmp and gguf (0.6 MB; the device lacks them).  The machine stays warm only 30 s after a call, so call 2
# must follow call 1 at once; if it went back, `run` says so in one line and both calls are repeated.
# Targets and KL caches are built on the device (per run process, no shared writes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STAGE="${GPU_PLAN_STAGE:-/tmp/tracr-gpu}"
if [ "${1:-}" = run ] && [[ " $* " != *" --dry-run "* && " $* " != *" --smoke "* ]]; then
  if [ ! -f .gpu_payload/part2.tar ]; then
    echo "error: .gpu_payload/part2.tar is missing: run 'benchmarks/gpu_plan.sh prepare' and carry it" >&2
    exit 2
  fi
  mkdir -p "$STAGE"
  tar -xf .gpu_payload/part2.tar -C "$STAGE" --wildcards 'wheels/*'
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" \
    "$STAGE"/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$STAGE/site"
  "$PY" -c "import tracr.compiler, gguf" || { echo "error: the carried tracr/haiku/gguf wheels do not import here" >&2; exit 3; }
fi
exec "$PY" benchmarks/gpu_plan.py "$@"
