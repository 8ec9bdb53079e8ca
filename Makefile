# The two set-up commands of the README. Both create (or reuse) a virtual environment in .venv,
# install into it, then serve or test. PYTHON picks the interpreter that creates the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint venv

venv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

serve: venv
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/toonserve serve

lint:
	$(BIN)/ruff check service api inference tests bench devkit
	$(BIN)/ruff format --check service api inference tests bench devkit
	$(BIN)/mypy --strict service api inference devkit
	$(BIN)/hadolint Dockerfile

test: venv
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(MAKE) lint
	$(BIN)/python -m pytest
