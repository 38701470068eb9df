# The two commands of the README. Both create (or reuse) .venv and install the package.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test publish


$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

# The main job: train the cpu preset on WikiText-2 (resuming runs/cpu if it exists),
# then evaluate early exit on the test set (batched, then token-by-token decoding at
# B = 1 and B = 8 on its first 8,192 tokens). Data: $(EE_JAX_DATA_DIR) or DATA_DIR=...
DATA_DIR ?= $(EE_JAX_DATA_DIR)
WORKDIR ?= runs/cpu
DATA_FLAG = $(if $(DATA_DIR),--data_dir $(DATA_DIR),)
run: $(STAMP)
	$(VENV)/bin/python experiments/train_wikitext2.py --preset cpu --workdir $(WORKDIR) --report_test true $(DATA_FLAG)
	$(VENV)/bin/python experiments/eval_early_exit.py --workdir $(WORKDIR) $(DATA_FLAG)
	$(VENV)/bin/python experiments/stream_early_exit.py --workdir $(WORKDIR) --max_tokens 8192 --measures softmax_max softmax_margin learned state_saturation $(DATA_FLAG)

# The whole test suite: every test file in a fresh pytest process, two at a time (a
# file's module fixtures and compiled shapes are shared within it). Long-lived
# processes are avoided on purpose: in a pytest-xdist worker that had compiled the
# programs of many earlier files, XLA's CPU compiler (jaxlib 0.10.2) crashed
# (segfault or abort) in four of five suite runs, each time in a different test;
# every file run alone passes.
# The longest files start first, so that the two lanes finish together.
SLOW_TESTS := train adaptive recurrence decode model bk_core evaluate early_exit speculative multihost api accelerator_check notebooks
# The processes share compiled programs through a compilation cache of this run
# (EE_JAX_CACHE_DIR, when not set already), removed at the end.
test: $(STAMP)
	cache=$${EE_JAX_CACHE_DIR:-$$(mktemp -d)}; \
	(printf 'tests/test_%s.py\n' $(SLOW_TESTS); ls tests/test_*.py) | awk '!seen[$$0]++' \
		| EE_JAX_CACHE_DIR=$$cache xargs -P 2 -n 1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider; \
	status=$$?; [ -n "$$EE_JAX_CACHE_DIR" ] || rm -rf $$cache; exit $$status

# Publish a finished `make run` (WORKDIR, default runs/cpu) into docs/results/cpu/:
# its evaluation, decoding results, config, metrics, exit perplexities and training
# summary, with a header in docs/results/cpu/README.md (experiments/publish_run.py).
publish: $(STAMP)
	$(VENV)/bin/python experiments/publish_run.py --workdir $(WORKDIR) --out docs/results/cpu
