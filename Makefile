# tidegate: `make serve` and `make test` work on a fresh clone (they create .venv themselves).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
ARGS ?=

# Models are always loaded from local files; nothing is ever downloaded from a model hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := true

.PHONY: serve test lint typecheck layers unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in pyproject.toml (torch==2.13.0, a CPU build); an unpinned torch would pull CUDA.
# The OpenVINO exporter (optimum-intel and the transformers it supports) gets its own directory
# inside the venv: see README, "Generation on OpenVINO".
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	$(BIN)/tidegate install-exporter
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

serve: $(VENV)/.installed
	$(BIN)/tidegate serve $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The import layering and the absence of import cycles (contracts in pyproject.toml).
layers: $(VENV)/.installed-dev
	$(BIN)/lint-imports

unit: $(VENV)/.installed-dev
	$(BIN)/pytest $(ARGS)

test: lint typecheck layers unit

# Benchmarks need wrk (Debian: apt-get install wrk). Results go to BENCHMARKS.md.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .import_linter_cache .grimp_cache .hypothesis
