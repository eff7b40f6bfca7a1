# quadsel: `make demo` and `make test` each set up (or reuse) a virtual environment and run.
#
#   PYTHON=python3        interpreter used to create the environment
#   VENV=.venv            where the environment lives (reused when present)
#   TORCH_VERSION=2.13.0  torch installed when none is importable (CPU build on CPU machines)
#
# A torch that the interpreter already has is respected: the environment is then created with
# --system-site-packages and no torch is installed.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_DIR ?= demo-run
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install install-test clean-demo

$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the torch that $(PYTHON) already has"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PIP) install "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch', torch.__version__)"
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	@touch $@

# kronfluence is an independent EK-FAC implementation the tests compare against. Its wheel
# declares torchvision, which has no CPU build here and which it does not need: install it
# without dependencies plus the light ones it imports.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	$(PIP) install "accelerate>=0.31" "einops>=0.8" "einconv>=0.1" "opt-einsum>=3.3"
	$(PIP) install --no-deps "kronfluence==1.0.1"
	@touch $@

# Headless Chromium from Debian for the report's browser test (skipped where it cannot be had).
$(VENV)/.chromium: | $(PY)
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	fi
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(VENV)/.chromium

demo: $(VENV)/.installed
	$(VENV)/bin/quadsel demo --run-dir $(DEMO_DIR)

test: $(VENV)/.installed-test $(VENV)/.chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop: everything but the end-to-end crash / Ray-fault / concurrency / bench suites
# (marked slow), stopping at the first failure. CI runs the whole suite through `make test`.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -x -m "not slow" $(PYTEST_ARGS)

$(VENV)/.installed-lint: $(VENV)/.installed
	$(PIP) install -e ".[lint]"
	@touch $@

# ruff (pyproject [tool.ruff]) over the whole tree, mypy over the public API
lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean-demo:
	rm -rf $(DEMO_DIR)
