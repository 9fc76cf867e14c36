# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make demo   creates .venv, installs, runs the whole pipeline on the shipped sample corpus
#   make test   creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the project so that pip never resolves a multi-GB CUDA build.
# GPU users: make TORCH_SPEC='torch' (or install their torch into .venv first).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,hf,dask,postgres
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bertscale pipeline --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
