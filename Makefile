# Quick start targets. Each one creates ./.venv on first use, so they work on
# a fresh machine with only python3 (3.9+) installed.
#
# Two installs, two stamps: `make demo` installs callcp and its runtime
# dependencies only (.venv/.installed); test, check, bench and dist install
# the dev extra too (.venv/.installed-dev: test and quality tools, the bench
# and display extras, build and twine), which implies the runtime one.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test check docs bench dist smoke-wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

test: $(VENV)/.installed-dev
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest -q

# Results go to benchmarks/results/local/ (not committed); to replace the
# committed ones: make bench BENCH_ARGS=--save (any benchmarks/run.py options).
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

check: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

# The documentation site, into site/ (not committed): MkDocs + Material +
# mkdocstrings, from mkdocs.yml and docs/. --strict: a broken link, anchor
# or cross-reference fails the build. The docs tools need Python 3.11+.
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The release files: dist/callcp-VERSION.tar.gz and the wheel built from it
# (not committed), checked as PyPI would render them.
dist: $(VENV)/.installed-dev
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# Builds the wheel, installs it in a fresh venv and runs callcp serve/send.
smoke-wheel: $(VENV)/.installed-dev
	BUILD_PYTHON=$(CURDIR)/$(BIN)/python bash scripts/smoke_wheel.sh

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
