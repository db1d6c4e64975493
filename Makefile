# The README's two commands are `make demo` and `make test`; the other targets are their parts.
SHELL := /bin/bash
VENV := .venv/bin
NETNS := scripts/netns.sh

.PHONY: bootstrap demo up test lint unit integration e2e helm-check

bootstrap:
	@scripts/bootstrap.sh

## Start the embedded stack in a loopback-only network namespace, show a correction and an adapter
## hot-swap on shipped data, stop everything.
demo: bootstrap
	$(NETNS) $(VENV)/driftserve demo

## Serve on 127.0.0.1:8000 until Ctrl-C (reachable from this machine).
up: bootstrap
	$(VENV)/driftserve up

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports

helm-check: bootstrap
	scripts/helm-check.sh

## Everything CI runs: lint, layer contract, chart checks, then unit, integration and e2e tests on the
## real broker, Redis, Ray Serve and model, inside a loopback-only network namespace.
test: lint helm-check
	$(NETNS) $(VENV)/pytest tests

unit: bootstrap
	$(VENV)/pytest tests/unit

integration: bootstrap
	$(NETNS) $(VENV)/pytest tests/integration

e2e: bootstrap
	$(NETNS) $(VENV)/pytest tests/e2e
