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

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
