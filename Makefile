# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv bench clean

demo: $(VENV)/.installed
	$(BIN)/slmflow demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts
