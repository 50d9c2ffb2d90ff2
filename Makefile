# Everything a fresh machine needs goes through these targets (CI runs `make test`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1
# The venv first on PATH, so tools it installs (deepspeed, mlflow) are the ones a recipe finds.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo test test-all bench clean ui

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel "setuptools>=77,<81"  # <81: louvain imports pkg_resources
	# The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# deepspeed is an sdist whose setup.py imports torch: build it against the torch above.
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py --out demo_out

# The MLflow UI on the demo's runs (after `make demo`); Ctrl-C stops it. `make ui PORT=5000` for a fixed port.
ui: $(STAMP)
	$(PY) launch/mlflow_ui.py --backend-store-uri sqlite:///$(CURDIR)/demo_out/runs/mlflow.db $(if $(PORT),--port $(PORT))

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not gpu and not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in bench/*_bench.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out bench_out .pytest_cache
