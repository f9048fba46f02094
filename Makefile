# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# idle OpenMP threads sleep instead of spinning (3.5-4.7x faster on 2 shared cores; see cirlab/cli.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run lint test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,demo,cluster]"
	touch $(STAMP)

## the main job: CLIP4Cir (fine-tune + Combiner) with the tiny backbone on the synthetic benchmark
run: install
	$(VENV)/bin/cirlab method=clip4cir

## lint + format check (ruff, configured in pyproject.toml); `make test` runs it first
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## lint + the test suite on two workers (slow integration tests included; ≈24 min on 2 cores from a fresh clone with
## cold caches and the install, measured 2026-12-07; 18.5 min on 2026-12-08's faster 2 cores with FTI4CIR's and
## LinCIR's tests, which add ≈95 s of test time, ≈50 s on the two workers; warm ≈17 min)
test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

bench: install
	for f in bench/[!_]*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf outputs multirun .pytest_cache
