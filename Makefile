# The same targets CI uses. `make demo` and `make test` set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck format clean

setup:
	VENV=$(VENV) scripts/setup.sh

demo: setup  ## set up, then compare the static baselines and the heuristic on the default task
	$(BIN)/triaccel-rl compare

test: setup lint typecheck  ## set up, lint, type-check, run the test suite
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
