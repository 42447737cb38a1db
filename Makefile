PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test lint bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# DEMO_ARGS goes to pgreplica demo, e.g. make demo DEMO_ARGS="--port 6543 --seconds 20".
demo: install
	$(BIN)/pgreplica demo $(DEMO_ARGS)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy --strict src

# The bench extra (matplotlib, for the report's charts) on top of install's.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Every scenario, then bench/REPORT.md and the README headline from bench/results/.
# BENCH_ARGS goes to bench.run, e.g. make bench BENCH_ARGS="--only overhead,offload".
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Workers reading their own writes while faults fire on real servers (bench/chaos.py);
# CHAOS_SECONDS=300 make chaos for a longer run. Exits non-zero on any stale read, lost
# write or unexpected error.
CHAOS_SECONDS ?= 60
chaos: install
	$(BIN)/python -m bench.chaos --seconds $(CHAOS_SECONDS)

.PHONY: docs
# The documentation site, API reference from the docstrings, into site/ (git-ignored).
docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pgreplica-cluster .pytest_cache .mypy_cache
