# Stethoscope: `make demo` shows the product, `make test` runs every test.
# Both work on a fresh clone: the virtual environment is created and filled here.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is never a dependency of the hook; the tests and the demo need it. 2.13.0 is the CPU
# wheel this machine keeps on disk (a plain `torch` would pull a multi-GB CUDA build).
TORCH  := torch==2.13.0

.PHONY: install demo lint format test test-fast test-slow bench chromium clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the dashboard's browser tests (Playwright's own download cannot work here).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

demo: install
	$(BIN)/python -m stethoscope_server.demo

# ruff (configured in pyproject.toml): the code is formatted and passes the linter.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest workers (most tests wait on servers, browsers and trainings, not on the CPU), whole
# files per worker; then the fault tests alone, since one of them restarts PostgreSQL.
FAULTS := tests/e2e/test_faults.py

test: install chromium lint
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --ignore=$(FAULTS)
	$(BIN)/python -m pytest -q -ra $(FAULTS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install chromium
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache stethoscope.db*
