PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= classification
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit loop: everything but the tests marked slow (multi-process DDP, SLURM, end-to-end runs)
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m swin.demo $(TASK)

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m swin.bench

clean:
	rm -rf $(VENV) data/demo runs
