# The two commands of the README. Both create (or reuse) .venv and install the package.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

# The main job.
run: $(STAMP)
	$(VENV)/bin/python experiments/bench_bk_core.py

# The whole test suite.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests
