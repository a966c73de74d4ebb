# The two commands of the README: `make demo` (the main job) and `make test` (every test).
SHELL := /bin/bash
KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
export KUBETUNE_CACHE
PY := $(KUBETUNE_CACHE)/venv/bin/python
PYTEST_ARGS ?=

.PHONY: demo demo-down test setup lint unit generate check-generated bench

setup:
	@hack/setup.sh

## The main job: a real fine-tune on a local cluster, with one injected preemption.
demo: setup
	$(PY) -m kubetune_dev.demo

demo-down:
	$(PY) -m kubetune_dev.demo --down

## Every test: lint and types first, then unit, trainer (real S3 server), cluster (real control plane)
## and e2e (real node).
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -o junit_family=xunit2 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -q tests/unit

generate:
	$(PY) -m kubetune_operator.crdgen

check-generated:
	$(PY) -m kubetune_operator.crdgen --check

bench: setup
	$(PY) bench/operator_reconcile.py
	$(PY) bench/checkpoint.py
	$(PY) bench/trainer_throughput.py
