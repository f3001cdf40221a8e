# The two commands of the README: `make demo` and `make test`.
# Both create .venv on first use and (re)install the package when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export WANDB_MODE ?= offline

.PHONY: demo test lint typecheck install clean

demo: $(STAMP)
	$(BIN)/milhema demo

# One pytest-xdist worker per core (at most 4: each builds its own session fixtures), one torch
# thread each (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check milhema tests tools

typecheck: $(STAMP)
	$(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing milhema and its dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache .mypy_cache
