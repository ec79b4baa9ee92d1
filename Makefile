# The front door. `make demo` and `make test` do all set-up themselves on a fresh machine:
# Debian packages (PostgreSQL, Java, Maven), a virtualenv with the project, and the Java pieces
# of the stack fetched from Maven Central into ~/.cache/cdc-projector (outside git).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup system-deps venv jars demo test lint typecheck unit integration packaging bench stack-up stack-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

system-deps:  ## apt-get install PostgreSQL, Java 17, Maven, Chromium (ops-page test) and wrk (query bench) when missing
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v java >/dev/null \
	    && command -v mvn >/dev/null && command -v chromium >/dev/null \
	    && command -v wrk >/dev/null; then \
	  echo "system packages: present"; \
	else \
	  echo "system packages: installing postgresql, openjdk-17-jre-headless, maven, chromium, wrk"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    postgresql openjdk-17-jre-headless maven chromium wrk >/dev/null; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed  ## virtualenv with the project and its dev tools

jars: venv  ## fetch Kafka, Connect, Debezium, Apicurio and the Avro converter into the cache
	$(BIN)/projector stack fetch

setup: system-deps venv jars  ## everything above

demo: setup  ## the main job: stack up, connector applied, sample rows written, events shown
	$(BIN)/projector demo

lint: venv  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv  ## mypy on the packages
	$(BIN)/mypy

unit: venv  ## the fast tests (no services)
	$(BIN)/pytest tests/unit

integration: setup  ## the real-stack tests (starts the stack itself)
	$(BIN)/pytest tests/integration

packaging: venv  ## build the wheel, install it into a fresh virtualenv, run it outside the checkout
	$(BIN)/pytest tests/packaging

# The tests that need no stack (unit, security, packaging) run beside the real-stack ones, which
# mostly wait on Debezium and Kafka: the suite's wall time is the integration tests' alone. Their
# output follows the integration tests'; the target fails if either group fails.
test: setup lint typecheck  ## set-up, lint, types, and the whole suite
	@$(BIN)/pytest -p no:cacheprovider --durations=10 tests/unit tests/security tests/packaging \
		> .test-without-stack.log 2>&1 & without_stack=$$!; \
	$(BIN)/pytest --durations=25 tests/integration; integration=$$?; \
	wait $$without_stack; others=$$?; \
	echo "--- tests/unit, tests/security, tests/packaging (run beside the integration tests) ---"; \
	cat .test-without-stack.log; \
	test $$integration -eq 0 -a $$others -eq 0

# Benchmark sizes (override on the command line: `make bench RATES=1000 ORDERS=1000000`). Not
# `$(or $(RATES),1000,5000)`: `or` splits its arguments at commas and would keep `1000` alone.
EVENTS ?= 1000000
RATES ?= 1000,5000
SHOP_TRANSACTIONS ?= 5000
ORDERS ?= 10000000
INITIAL_LOAD_ROWS ?= 1000000

bench: setup  ## throughput, freshness, the query service and the read models into docs/benchmarks.md
	$(BIN)/projector bench --events $(EVENTS)
	$(BIN)/projector freshness --rates $(RATES)
	$(BIN)/projector query-bench --transactions $(SHOP_TRANSACTIONS)
	$(BIN)/projector read-model-bench --orders $(ORDERS) --write-events $(EVENTS)
	$(BIN)/projector bench --initial-load $(INITIAL_LOAD_ROWS)

stack-up: setup  ## start the local stack
	$(BIN)/projector stack up

stack-down: venv  ## stop the local stack
	$(BIN)/projector stack down

clean: stack-down  ## stop the stack and delete its state (data!) and the virtualenv
	rm -rf .stack .stack-tests $(VENV)
