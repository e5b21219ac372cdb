# Targets by purpose (after etcd's Makefile): set-up, the demo, tests, verify, benches.
# Every target that needs the tools runs the idempotent set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CTL := $(VENV)/bin/clearingctl
PYTEST := $(VENV)/bin/pytest

.PHONY: help setup demo bench up down status test test-unit test-integration test-cluster verify lint typecheck fmt proto clean

help:
	@echo "make demo     set up (if needed), start the local 3-city cluster and show it working"
	@echo "make test     set up (if needed) and run every test against real etcd and Cassandra"
	@echo "make verify   ruff, mypy and the unit tests"
	@echo "make down     stop everything the demo started"

setup:
	@bash cluster/setup.sh

proto: setup
	@PYTHON=$(PY) bash cluster/gen_proto.sh

demo: setup
	@$(CTL) demo

up: setup
	@$(CTL) cluster up

down:
	@if [ -x $(CTL) ]; then $(CTL) cluster down; else echo "nothing to stop (no .venv)"; fi

status: setup
	@$(CTL) cluster status

# The tests start their own cluster in .state/pytest on the topology's addresses, so a
# demo cluster must not hold those ports: stop it first (its data is kept).
test: setup
	@$(CTL) cluster down >/dev/null
	@$(PYTEST) -m "unit or integration or cluster" --durations=30

test-unit: setup
	@$(PYTEST) -m unit

test-integration: setup
	@$(CTL) cluster down >/dev/null
	@$(PYTEST) -m "integration"

test-cluster: setup
	@$(CTL) cluster down >/dev/null
	@$(PYTEST) -m "cluster"

# Results are committed: docs/bench/latest.json, summarised in docs/PERFORMANCE.md.
bench: setup
	@$(CTL) bench --out docs/bench/latest.json

lint: setup
	@$(VENV)/bin/ruff check services tests
	@$(VENV)/bin/ruff format --check services tests

typecheck: setup
	@$(VENV)/bin/mypy

verify: lint typecheck
	@$(PYTEST) -m unit -q

fmt: setup
	@$(VENV)/bin/ruff format services tests
	@$(VENV)/bin/ruff check --fix services tests

clean: down
	rm -rf .state .venv .cache services/clearing
