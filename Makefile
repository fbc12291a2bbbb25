# make train / make test work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch; on a GPU cluster install your CUDA build first (see README).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup train test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow" $(ARGS)

bench: setup
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
