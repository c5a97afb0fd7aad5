# Every target sets up its own virtual environment from scratch on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of this torch release lies on the machines we use; an unpinned torch pulls CUDA.
TORCH := torch==2.13.0

.PHONY: venv test test-fast demo bench docs lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,cli]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

demo: venv
	$(VENV)/bin/torchnde demo

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py
	$(PY) benchmarks/adjoints.py
	$(PY) benchmarks/sde.py
	$(PY) benchmarks/brownian_queries.py
	$(PY) benchmarks/cde.py
	$(PY) benchmarks/generative.py
	$(PY) benchmarks/generative_trained.py

$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

# The documentation site (mkdocs.yml) into site/. --strict: a broken link, anchor or
# cross-reference, or a docstring mkdocstrings cannot parse, fails the build.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: venv
	$(PY) -m ruff check src tests benchmarks examples tools docs/_hooks.py
	$(PY) -m ruff format --check src tests benchmarks examples tools docs/_hooks.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
