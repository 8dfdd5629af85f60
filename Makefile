# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test soak lint format bench clean browser prometheus

install: $(STAMP)

# torch is pinned here (the CPU build on this machine's disk); pyproject only declares a range.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/embedq demo

lint: $(STAMP)
	$(VENV)/bin/ruff check embedq tests bench
	$(VENV)/bin/ruff format --check embedq tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format embedq tests bench
	$(VENV)/bin/ruff check --fix embedq tests bench

# The Flower test drives Debian's chromium; installed here when missing and we may (root).
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) || \
	  echo "chromium could not be installed: the Flower browser test will skip"

# The monitoring test runs Debian's prometheus (and promtool) with deploy/prometheus's config;
# installed here when missing and we may (root).
prometheus:
	@command -v prometheus >/dev/null || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null) || \
	  echo "prometheus could not be installed: the Prometheus tests will skip"

# pytest leaves out the long soak and load runs (marker `soak`, see pyproject's addopts).
test: lint browser prometheus
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Only the soak and load runs (pytest marker `soak`, then 100,000 documents through capped
# Redis servers with a worker killed midway); their figures are in docs/reliability.md.
soak: $(STAMP)
	$(PY) -m pytest -q -ra -s -m soak $(PYTEST_ARGS)
	$(PY) bench/soak.py --out bench-results/soak.json

bench: $(STAMP)
	$(VENV)/bin/embedq bench --repeats 3 --out bench-results
	$(PY) bench/search_index.py --n 100000 --queries 2000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
