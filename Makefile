# make train / make test work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch; on a GPU cluster install your CUDA build first (docs/clusters.md).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
WORKERS ?= 2

.PHONY: setup train test test-fast lint bench reproduce clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,fp8,export,eval,cluster]"
	touch $@

train: setup
	$(PY) train.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -n $(WORKERS) tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(WORKERS) tests -m "not slow" $(ARGS)

# The papers' claims at small scale (CPU): the repro_* recipes, then docs/reproduction.md.
reproduce: setup
	$(PY) train.py -m experiment=repro_lns model/norm=none,lns trainer.seed=0,1,2 \
	  'hydra.sweep.dir=multirun/repro/lns' 'hydra.sweep.subdir=$${model.norm.depth_scaling}_s$${trainer.seed}'
	$(PY) -m stabletrain.analysis.reproduce multirun/repro --out docs/reproduction.md

bench: setup
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
