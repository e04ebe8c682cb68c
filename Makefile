# Setup and test entry points. `make test` is the README's test command and what CI runs.
#
# Variables:
#   PYTHON           interpreter used to create the virtual environment (default: python3)
#   VENV             virtual environment directory (default: .venv)
#   TORCH_VERSION    torch release installed first (default: 2.13.0, the CPU wheel on the project's machines)
#   TORCH_INDEX_URL  wheel index for torch; set it to a CUDA index for GPU machines, for example
#                    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make install
#   PYTEST_ARGS      extra arguments for pytest (for example: PYTEST_ARGS="-k tokenizer")
#   TEST_WORKERS     pytest-xdist worker processes (default: 2, one per core of the project's machines; 0: none).
#                    Each runs whole work units (tests/conftest.py): a shared Ray cluster's modules, or one module.
#                    More workers than cores does not pay: the tests' Ray clusters and stacks keep both cores busy
#                    (3 workers on the 2-core VM, 2026-12-05: 13:25 of tests against 12:37 with 2, the CPU ~99% busy)

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_PIN := $(VENV)/torch-constraint.txt

.PHONY: install test lint bench clean demo chromium

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	echo "torch==$(TORCH_VERSION)" > $(TORCH_PIN)
	$(PY) -m pip install --quiet -c $(TORCH_PIN) -e '.[dev]'
	touch $(STAMP)

# The browser tests (tests/browser) drive Debian's Chromium, /usr/bin/chromium: installed with apt-get when missing
# (never a downloaded browser build); nothing happens when it is there.
chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; }

test: $(STAMP) chromium
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(VENV)/bin/qwenvl demo

bench: $(STAMP)
	$(PY) bench/model_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
