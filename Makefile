# modelfuse: `make demo` and `make test` work on a fresh clone with nothing installed.
# The first run creates .venv and installs the package with its extras; later runs reuse it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelfuse-installed
SRC := src tests benchmarks

.PHONY: install test test-slow test-all browser-test chromium demo lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependencies or the C kernels change.
$(STAMP): pyproject.toml setup.py src/modelfuse/merge/methods/_ckernels.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[vision,hf,dev,align,mtl]'
	touch $@

install: $(STAMP)

## the whole suite except tests marked slow or browser, plus the linter
test: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/python -m pytest -m "not slow and not browser"

## only the long tests (memory checks on big synthetic checkpoints, figures that train model pools),
## with their output (-s: the figures) and every test's duration. pytest's exit code 5 (no test
## collected, e.g. a marker renamed) is non-zero, so make fails on it like on a failing test.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not browser" -s --durations=0

test-all: $(STAMP) chromium
	$(BIN)/ruff check $(SRC)
	$(BIN)/python -m pytest

## the HTML benchmark report rendered in headless Chromium (tests marked browser); installs the
## Debian packages chromium and chromium-driver first when they are missing (apt-get: root or sudo)
browser-test: $(STAMP) chromium
	MODELFUSE_CHROMIUM=$(CHROMIUM) MODELFUSE_CHROMEDRIVER=$(CHROMEDRIVER) $(BIN)/python -m pytest -m browser

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET ?= $(SUDO) apt-get
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

chromium:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  echo "installing chromium and chromium-driver with apt-get (needed by the browser test)"; \
	  { $(APT_GET) update && $(APT_GET) install -y chromium chromium-driver; } \
	  && [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ] || { \
	    echo "error: could not install chromium and chromium-driver with apt-get (it needs root or sudo," \
	      "a Debian/Ubuntu system and a reachable package repository; $(CHROMIUM) and $(CHROMEDRIVER)" \
	      "must exist afterwards). Install them by hand (apt-get install -y chromium chromium-driver)" \
	      "and run make browser-test again." >&2; \
	    exit 1; }; \
	fi

## the main job: train (or load from cache) a pool of models and fuse them
demo: $(STAMP)
	$(BIN)/modelfuse demo

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

format: $(STAMP)
	$(BIN)/ruff check --fix $(SRC)
	$(BIN)/ruff format $(SRC)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
