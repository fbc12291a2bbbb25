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
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup tests -m "not slow" $(ARGS)

# The papers' claims at small scale (CPU): every repro_* recipe, then docs/reproduction.md and
# docs/reproduction/*.png (docs/reproducing.md). The recipes run in two lanes of single-threaded processes: tiny
# models are bound by per-operation overhead, so two processes do ~1.8x the work of one two-threaded process.
# trainer.resume=auto: an interrupted `make reproduce` continues, and runs that finished are kept.
REPRO_LANE_1 := gains fp8 bslo
REPRO_LANE_2 := residual lns moe moe_u
reproduce: setup
	mkdir -p multirun/repro
	$(PY) -m stabletrain.cli.tokenizer > /dev/null   # the bundled corpus's tokenizer, once, before the lanes start
	$(MAKE) --no-print-directory -j2 reproduce-lane-1 reproduce-lane-2
	$(PY) -m stabletrain.analysis.reproduce multirun/repro --out docs

reproduce-lane-%: setup
	@for r in $(REPRO_LANE_$*); do \
	  echo "repro_$$r: started $$(date +%T) (log: multirun/repro/repro_$$r.log)"; \
	  OMP_NUM_THREADS=1 $(PY) train.py -m experiment=repro_$$r trainer.resume=auto > multirun/repro/repro_$$r.log 2>&1 \
	    || { tail -n 20 multirun/repro/repro_$$r.log; exit 1; }; \
	  echo "repro_$$r: finished $$(date +%T)"; \
	done

# One recipe alone: make repro-lns, make repro-moe-u, ...
repro-%: setup
	$(PY) train.py -m experiment=repro_$(subst -,_,$*) trainer.resume=auto

bench: setup
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
