"""Cross-service fixtures: the real runner and worker, in this process, on the session's nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.retriever.app import create_app as create_retriever
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.tool_executor.app import create_app as create_executor
from agentbus.tool_executor.settings import ExecutorSettings
from agentbus.trace_exporter.app import create_app as create_trace_exporter
from agentbus.trace_exporter.settings import TraceExporterSettings
from helpers import AGENTS_DIR, REPO_ROOT, TRACES_FILE_NAME


@pytest_asyncio.fixture(scope="session")
async def suite(
    bootstrapped_nats: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[list[BusService]]:
    """agent-runner, inference-worker (scripted engine), tool-executor (SQLite), retriever (Milvus Lite) and
    trace-exporter (JSONL) serving the session's server.

    Budgets are off here (no cost-accountant); tests/test_budget_flow.py runs the accountant for real.
    """
    executor_db = tmp_path_factory.mktemp("executor") / "tool-executor.db"
    milvus = tmp_path_factory.mktemp("retriever") / "milvus.db"
    traces = tmp_path_factory.mktemp("traces")
    services: list[BusService] = [
        create_runner(
            RunnerSettings(
                nats_url=bootstrapped_nats.url,
                agents_dir=AGENTS_DIR,
                tools_dir=REPO_ROOT / "tools",
                routing_file=REPO_ROOT / "config" / "models.yaml",
                budgets_enabled=False,
                drain_timeout_seconds=2,
            )
        ),
        create_worker(WorkerSettings(nats_url=bootstrapped_nats.url, drain_timeout_seconds=2)),
        create_executor(
            ExecutorSettings(
                nats_url=bootstrapped_nats.url,
                tools_dir=REPO_ROOT / "tools",
                approvers_file=REPO_ROOT / "config" / "approvers.yaml",
                database_url=f"sqlite+aiosqlite:///{executor_db}",
                expiry_sweep_seconds=0.5,
                drain_timeout_seconds=2,
            )
        ),
        create_retriever(
            RetrieverSettings(
                nats_url=bootstrapped_nats.url,
                milvus_uri=str(milvus),
                drain_timeout_seconds=2,
                # Embedding in this process: the test session needs no worker processes of its own.
                embedding_processes=0,
            )
        ),
        create_trace_exporter(
            TraceExporterSettings(
                nats_url=bootstrapped_nats.url,
                jsonl_path=traces / TRACES_FILE_NAME,
                ledger_path=traces / "ledger.sqlite3",
                flush_interval_seconds=0.2,
                drain_timeout_seconds=2,
            )
        ),
    ]
    for service in services:
        await service.start()
    yield services
    for service in services:
        await service.stop()
