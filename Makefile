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

# The papers' claims at small scale (CPU, ~45 min on 2 cores): every repro_* recipe, then docs/reproduction.md and
# docs/reproduction/*.png. trainer.resume=auto: an interrupted `make reproduce` continues, finished runs are kept.
REPRO_RECIPES := gains residual lns bslo moe moe_u fp8
reproduce: setup
	for r in $(REPRO_RECIPES); do $(PY) train.py -m experiment=repro_$$r trainer.resume=auto || exit 1; done
	$(PY) -m stabletrain.analysis.reproduce multirun/repro --out docs

# One recipe alone: make repro-lns, make repro-moe, ...
repro-%: setup
	$(PY) train.py -m experiment=repro_$(subst -,_,$*) trainer.resume=auto

bench: setup
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
