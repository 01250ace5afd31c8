"""The orchestrator and the runner, each its own process, SIGKILLed together at every step boundary of the
research-report workflow and started again: the run still finishes exactly once, every step's task runs once,
no LLM step is generated twice, and the run's concurrency slot is given back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentbus.contracts.llm import LlmRequest
from agentbus.contracts.registry import ORCHESTRATOR_ACK_WAIT_SECONDS, RUNNER_ACK_WAIT_SECONDS, WORKFLOW_RUNS
from agentbus.contracts.workflows import WorkflowSubmitted
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.ports import Generation, TextSink
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import running_nats_server
from agentbus.workflow_orchestrator.ports import SlotsRecord
from agentbus.workflow_orchestrator.service import slots_key
from helpers import AGENTS_DIR, REPO_ROOT, task_events
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

STAGES = (("research",), ("analyze-trends", "analyze-sentiment"), ("write-report",), ("review",))
"""The research-report's steps in the order they become ready; a kill falls between each two."""
RECOVERY_SECONDS = max(ORCHESTRATOR_ACK_WAIT_SECONDS, RUNNER_ACK_WAIT_SECONDS) + 20


class GatedEngine:
    """The real scripted engine, holding each request until the test lets its task through."""

    def __init__(self) -> None:
        self._engine = ScriptedEngine()
        self.generations: Counter[str] = Counter()
        self.allowed: set[str] = set()
        self._changed = asyncio.Event()

    def healthy(self) -> bool:
        return True

    def allow(self, task_ids: list[str]) -> None:
        self.allowed.update(task_ids)
        self._changed.set()

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        self.generations[request.request_id] += 1
        while request.task_id not in self.allowed:
            self._changed.clear()
            await self._changed.wait()
        return await self._engine.generate(request, on_text)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A server of this test's own: no other runner or orchestrator may share its consumers."""
    with running_nats_server(tmp_path / "nats") as server:
        yield server


@pytest_asyncio.fixture
async def own_client(own_server: NatsServerProcess) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(own_server.url, "workflow-kill-test")
    await apply_topology(nc.jetstream())
    yield nc
    await nc.close()


class Processes:
    """The orchestrator and the runner as processes of their own, killed and started again together."""

    def __init__(self, server: NatsServerProcess, logs: Path) -> None:
        self._server = server
        self._logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {
            **os.environ,
            "AGENTBUS_ORCHESTRATOR_NATS_URL": self._server.url,
            "AGENTBUS_ORCHESTRATOR_WORKFLOWS_DIR": str(REPO_ROOT / "workflows"),
            "AGENTBUS_ORCHESTRATOR_AGENTS_DIR": str(AGENTS_DIR),
            "AGENTBUS_RUNNER_NATS_URL": self._server.url,
            "AGENTBUS_RUNNER_AGENTS_DIR": str(AGENTS_DIR),
            "AGENTBUS_RUNNER_BUDGETS_ENABLED": "false",
        }
        for module in ("agentbus.workflow_orchestrator", "agentbus.agent_runner"):
            with open(self._logs / f"{module}.log", "ab") as out:
                self.running.append(subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=out))

    def kill(self) -> None:
        for process in self.running:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self.running = []

    def stop(self) -> list[int]:
        for process in self.running:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in self.running]
        self.running = []
        return codes


async def _events_so_far(nc: NatsClient, run_id: str) -> list[dict[str, Any]]:
    sub = await nc.jetstream().subscribe(
        f"agentbus.workflows.events.acme.{run_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events: list[dict[str, Any]] = []
    try:
        while True:
            events.append(json.loads((await sub.next_msg(timeout=0.3)).data))
    except TimeoutError:
        return events
    finally:
        await sub.unsubscribe()


async def _wait_for(nc: NatsClient, run_id: str, done: Any, timeout: float) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while not done(events := await _events_so_far(nc, run_id)):
            await asyncio.sleep(0.1)
    return events


def _started(events: list[dict[str, Any]], steps: tuple[str, ...]) -> list[str] | None:
    found = {e["step"]: e["task_id"] for e in events if e["kind"] == "step_started"}
    return [found[step] for step in steps] if set(steps) <= set(found) else None


async def test_killing_the_orchestrator_and_the_runner_at_every_step_boundary_still_finishes_the_run_once(
    own_server: NatsServerProcess, own_client: NatsClient, tmp_path: Path
) -> None:
    engine = GatedEngine()
    worker = create_worker(WorkerSettings(nats_url=own_server.url, drain_timeout_seconds=1), engine=engine)
    await worker.start()
    processes = Processes(own_server, tmp_path)
    processes.start()
    run_id = "killed-at-every-boundary"
    live = await own_client.subscribe(f"agentbus.workflows.events.acme.{run_id}")
    try:
        body = WorkflowSubmitted(run_id=run_id, tenant="acme", workflow="research-report", input={"topic": "chaos"})
        await own_client.jetstream().publish(
            "agentbus.workflows.submit.acme.acme-app", body.model_dump_json().encode(), headers={"Nats-Msg-Id": run_id}
        )
        seen: list[dict[str, Any]] = []
        for stage in STAGES:
            async with asyncio.timeout(RECOVERY_SECONDS):
                while (tasks := _started(seen, stage)) is None:
                    seen.append(json.loads((await live.next_msg(timeout=RECOVERY_SECONDS)).data))
            # Killed the moment the stage's tasks were announced: the orchestrator is still carrying out that
            # transition's outbox, the runner accepting the tasks; what either was in the middle of dies with it.
            processes.kill()
            processes.start()
            engine.allow(tasks)
        events = await _wait_for(
            own_client, run_id, lambda found: any(e["kind"] == "completed" for e in found), RECOVERY_SECONDS
        )
        await asyncio.sleep(1.0)  # anything a restarted process would still send twice arrives meanwhile
        events = await _events_so_far(own_client, run_id)
    finally:
        await live.unsubscribe()
        codes = processes.stop()
        await worker.stop()

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "gap-free"
    kinds = Counter(e["kind"] for e in events)
    assert (kinds["accepted"], kinds["completed"], kinds["failed"], kinds["cancelled"]) == (1, 1, 0, 0)
    steps = [step for stage in STAGES for step in stage]
    for kind in ("step_started", "step_completed"):
        assert sorted(e["step"] for e in events if e["kind"] == kind) == sorted(steps), f"each step {kind} once"
    assert all(e["attempt"] == 1 for e in events if e["kind"] == "step_started")
    assert events[-1]["outputs"]["metadata"]["research_sources"] == ["web", "academic", "news"]
    for started in (e for e in events if e["kind"] == "step_started"):
        task = await task_events(own_client, started["task_id"], timeout=5)
        assert [e["kind"] for e in task] == ["accepted", "step", "completed"], started["step"]
        assert engine.generations[f"acme.{started['task_id']}.step-1"] == 1, f"{started['step']}: an LLM step ran twice"
    kv = await own_client.jetstream().key_value(WORKFLOW_RUNS.bucket)
    slots = SlotsRecord.model_validate_json((await kv.get(slots_key("acme", "research-report"))).value or b"")
    assert slots.state.active == []
    assert slots.state.queue == []
    assert codes == [0, 0], "the restarted processes drained and exited cleanly on SIGTERM"
