# The two commands of the README. Both create (or reuse) .venv and install the package.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test

# Large [tokens, vocabulary] buffers are allocated and freed every step; with
# huge pages glibc hands them out about 2x faster (see experiments/bench_model.py).
export GLIBC_TUNABLES := glibc.malloc.hugetlb=1

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
