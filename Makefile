PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/pgreplica demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy --strict src

bench: install
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.failover
	$(BIN)/python -m bench.token_cost
	$(BIN)/python -m bench.tagging
	$(BIN)/python -m bench.pubsub
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.classify
	$(BIN)/python -m bench.dump
	$(BIN)/python -m bench.sqlalchemy_session
	$(BIN)/python -m bench.pgbouncer

clean:
	rm -rf $(VENV) .pgreplica-cluster .pytest_cache .mypy_cache
