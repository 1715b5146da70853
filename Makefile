# mailbus: `make run` starts the embedded stack and a worker; `make test` runs every check.
PY := .venv/bin/python
STATE ?= .devstack

.PHONY: deps bench-deps run test test-fast lint typecheck schema bench clean

deps:
	@bash deploy/devstack/bootstrap.sh

bench-deps:
	@bash deploy/devstack/bootstrap.sh bench

run: deps
	$(PY) -m deploy.devstack --state $(STATE)

lint: deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports

typecheck: deps
	$(PY) -m mypy

test: lint typecheck
	$(PY) -m pytest

# The tests that need no server: pure and in-process, in well under a minute.
test-fast: deps
	$(PY) -m pytest -m fast -q

# Benchmarks against a private stack; JSON on stdout and in deploy/bench/results.json.
bench: bench-deps
	$(PY) -m deploy.bench --out deploy/bench/results.json

schema: deps
	$(PY) -c 'import json; from consumer.core.message import job_json_schema; \
	print(json.dumps(job_json_schema(), indent=2, ensure_ascii=False))' > consumer/schemas/job-v1.json
	$(PY) -c 'import json; from consumer.core.event_contract import events_json_schema; \
	print(json.dumps(events_json_schema(), indent=2, ensure_ascii=False))' > consumer/schemas/events-v1.json

clean:
	rm -rf .venv .devstack .mypy_cache .ruff_cache .pytest_cache
