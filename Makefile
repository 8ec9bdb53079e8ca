# The two set-up commands of the README. Both create (or reuse) a virtual environment in .venv,
# install into it, then serve or test. PYTHON picks the interpreter that creates the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The fast inner loop (`make check`): lint, then every test that needs neither TensorFlow, a server
# process nor a browser and takes at most a few seconds. `make test` runs all of them.
FAST_TESTS := not tf and not live and not slow and not browser

.PHONY: serve test lint venv check test-fast

venv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

serve: venv
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/toonserve serve

lint:
	$(BIN)/ruff check service api inference jobs tests bench devkit
	$(BIN)/ruff format --check service api inference jobs tests bench devkit
	$(BIN)/mypy --strict service api inference jobs devkit
	$(BIN)/hadolint Dockerfile

# The Redis job store's tests run Debian's redis-server (they fail, not skip, without it): installed
# here when missing (as root, as on our machines and in CI).
test: venv
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	command -v redis-server >/dev/null || (apt-get update && \
		apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 redis-server)
	$(MAKE) lint
	$(BIN)/python -m pytest

check: lint test-fast

test-fast:
	$(BIN)/python -m pytest -q -m "$(FAST_TESTS)"
