PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= classification
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-faults demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# everything but the fault tests (`make test-faults`)
test: setup
	$(PY) -m pytest -m "not faults" $(PYTEST_ARGS)

# runs SIGKILLed at random moments and resumed, a full and a read-only disk, a DDP rank killed (4-5 min on 2 cores)
test-faults: setup
	$(PY) -m pytest -m faults $(PYTEST_ARGS)

# the edit loop: everything but the tests marked slow (multi-process DDP, SLURM, end-to-end runs)
test-fast: setup
	$(PY) -m pytest -m "not slow and not faults" $(PYTEST_ARGS)

demo: setup
	$(PY) -m swin.demo $(TASK)

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m swin.bench

clean:
	rm -rf $(VENV) data/demo runs
