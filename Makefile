# Two commands do everything:
#   make quickstart   set up .venv, then run the quickstart pipeline on the CPU
#   make test         set up .venv, then run the whole test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first; GPU users set TORCH_SPEC to their own build (or preinstall torch in the venv, which
# is then kept). TORCH_INDEX_URL, when set, is the index torch comes from: pip's own index gives
# whatever build it has (on Linux x86_64 PyPI's torch is a CUDA build of several GB), so for the
# CPU build set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (as the Dockerfile does).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# DeepSpeed's compiled CPU op lives with the venv it was built against: its build commands name the
# venv's torch and DeepSpeed paths, so two checkouts sharing one folder rebuilt it for each other.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=
# Test processes (pytest-xdist; 0, the default: one process). With 2, each file runs whole in one
# of them (--dist loadfile), so its module fixtures are built once, and the second process uses the
# CPU time one leaves idle: 24:31 and 29:11 against 37:35 for one, on 2 cores (README). Not the
# default: two Ray-heavy files side by side load 2 cores past 14, and a test's fresh Ray node then
# missed Ray's fixed 30 s start-up wait (1 failure in 2 runs, 1 in 3 the night before).
PYTEST_WORKERS ?= 0

.PHONY: setup warm quickstart science test bench mutation

setup: $(VENV)/.installed warm

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[dev]'
	@touch $@

warm: $(VENV)/.installed
	@mkdir -p $(TORCH_EXTENSIONS_DIR)
	$(PY) -m alloylm.warm

quickstart: setup
	$(VENV)/bin/alloylm run configs/quickstart.yaml

# The paper's table at a larger scale (docs/results/science.md): about 23 minutes on 2 cores (22:32 measured).
science: setup
	$(VENV)/bin/alloylm run configs/science.yaml

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Mutation score of the decision modules ([tool.mutmut] in pyproject.toml), per module; not part of
# `make test`. MUTATION_ARGS: module path suffixes to limit it (e.g. merge/space.py), --max-children N.
MUTATION_ARGS ?=
mutation: setup
	nice -n 19 $(PY) .ci/mutation.py $(MUTATION_ARGS)

bench: setup
	$(PY) benchmarks/data_prep.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/merge_search.py
	$(PY) benchmarks/stage_startup.py
