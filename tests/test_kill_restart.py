"""A runner killed with SIGKILL mid-task and restarted finishes the task with no step done twice."""

from __future__ import annotations

import asyncio
import contextlib
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
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.contracts.llm import LlmRequest
from agentbus.contracts.registry import LLM_RESULT, RUNNER_ACK_WAIT_SECONDS
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.ports import Generation, TextSink
from agentbus.inference_worker.service import ABORTED
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import running_nats_server
from helpers import AGENTS_DIR, new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy


class GatedEngine:
    """The real scripted engine, counting generations and holding chosen steps until released."""

    def __init__(self, hold_steps: set[int]) -> None:
        self._engine = ScriptedEngine()
        self.generations: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.release = asyncio.Event()
        self._hold_steps = hold_steps

    def healthy(self) -> bool:
        return True

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        self.generations[request.request_id] += 1
        if request.step in self._hold_steps:
            await self.release.wait()
        generation = await self._engine.generate(request, on_text)
        self.finished[request.request_id] += 1
        return generation


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A server of this test's own: no other runner may share its consumers."""
    with running_nats_server(tmp_path / "nats") as server:
        yield server


@pytest_asyncio.fixture
async def own_client(own_server: NatsServerProcess) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(own_server.url, "kill-test")
    await apply_topology(nc.jetstream())
    yield nc
    await nc.close()


def _start_runner_process(server: NatsServerProcess, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AGENTBUS_RUNNER_NATS_URL": server.url,
        "AGENTBUS_RUNNER_AGENTS_DIR": str(AGENTS_DIR),
        "AGENTBUS_RUNNER_BUDGETS_ENABLED": "false",
    }
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agentbus.agent_runner"], env=env, stdout=out, stderr=out)


async def _wait_for_event(nc: NatsClient, task_id: str, kind: str, seq: int) -> None:
    sub = await nc.jetstream().subscribe(
        f"agentbus.tasks.events.acme.{task_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            event = json.loads((await sub.next_msg(timeout=20)).data)
            if event["kind"] == kind and event["seq"] == seq:
                return
    finally:
        await sub.unsubscribe()


async def _usage_ids(nc: NatsClient) -> list[str]:
    sub = await nc.jetstream().subscribe("agentbus.usage.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    ids = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            ids.append(json.loads(msg.data)["usage_id"])
    except TimeoutError:
        return ids
    finally:
        await sub.unsubscribe()


async def test_runner_killed_after_its_first_step_and_restarted_completes_with_no_step_twice(
    own_server: NatsServerProcess, own_client: NatsClient, tmp_path: Path
) -> None:
    engine = GatedEngine(hold_steps={2})
    worker = create_worker(WorkerSettings(nats_url=own_server.url, drain_timeout_seconds=1), engine=engine)
    await worker.start()
    runner = _start_runner_process(own_server, tmp_path / "runner.log")
    try:
        task_id = new_task_id("kill")
        text = "calculator(6*7) then word_count(one two three)"
        await publish_submission(own_client, submission(task_id, agent="assistant", text=text), msg_id=task_id)
        await _wait_for_event(own_client, task_id, "step", 2)
        runner.send_signal(signal.SIGKILL)
        runner.wait()

        # Killed after publishing step 2's request, the held step finishes while the runner is dead and
        # its result waits in the stream. Killed between the step event and that request, the request
        # is still in the run's stored outbox: the restarted runner re-publishes it when the unacked
        # result of step 1 is redelivered (after the consumer's ack_wait).
        engine.release.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while not engine.finished[f"acme.{task_id}.step-2"]:
                    await asyncio.sleep(0.05)
        runner = _start_runner_process(own_server, tmp_path / "runner.log")
        events = await task_events(own_client, task_id, timeout=RUNNER_ACK_WAIT_SECONDS + 20, settle=1.0)
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=15)
        await worker.stop()

    assert [e["kind"] for e in events] == ["accepted", "step", "step", "step", "completed"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert "= 42" in events[-1]["output"]
    assert "= 3" in events[-1]["output"]
    steps = [f"acme.{task_id}.step-{n}" for n in (1, 2, 3)]
    assert {rid: engine.generations[rid] for rid in steps} == dict.fromkeys(steps, 1), "a step ran twice"
    usage = [u for u in await _usage_ids(own_client) if task_id in u]
    assert sorted(usage) == sorted(f"llm:{rid}" for rid in steps)
    assert runner.returncode == 0, "the restarted runner drained and exited cleanly on SIGTERM"


async def test_cancel_during_a_step_ends_the_task_and_its_late_result_is_ignored(
    own_server: NatsServerProcess, own_client: NatsClient
) -> None:
    """The step's late result is the generation's own, or `aborted` when the runner's abort notice reaches
    the worker first (a race: the notice and the task's `cancelled` event leave the runner together). It
    comes back either way, and the ended task ignores it."""
    engine = GatedEngine(hold_steps={1})
    late_results: list[dict[str, Any]] = []

    async def on_result(msg: Msg) -> None:
        late_results.append(json.loads(msg.data))

    results = await own_client.subscribe(LLM_RESULT.format(tenant="acme"), cb=on_result)
    services = [
        create_worker(WorkerSettings(nats_url=own_server.url, drain_timeout_seconds=1), engine=engine),
        create_runner(
            RunnerSettings(
                nats_url=own_server.url, agents_dir=AGENTS_DIR, budgets_enabled=False, drain_timeout_seconds=1
            )
        ),
    ]
    for service in services:
        await service.start()
    try:
        task_id = new_task_id("midcancel")
        await publish_submission(own_client, submission(task_id), msg_id=task_id)
        await _wait_for_event(own_client, task_id, "accepted", 1)
        step = f"acme.{task_id}.step-1"
        async with asyncio.timeout(10):  # the step is in the model's hands (its request follows `accepted`)
            while not engine.generations[step]:
                await asyncio.sleep(0.02)
        cancel = json.dumps({"task_id": task_id, "tenant": "acme", "reason": "changed my mind"}).encode()
        await own_client.jetstream().publish("agentbus.tasks.cancel.acme.acme-app", cancel)
        await _wait_for_event(own_client, task_id, "cancelled", 2)
        engine.release.set()
        async with asyncio.timeout(10):
            while not any(r["request_id"] == step for r in late_results):
                await asyncio.sleep(0.02)
        events = await task_events(own_client, task_id, settle=1.5)
    finally:
        await results.unsubscribe()
        for service in services:
            await service.stop()
    assert [e["kind"] for e in events] == ["accepted", "cancelled"]
    assert events[-1]["reason"] == "changed my mind"
    (late,) = [r for r in late_results if r["request_id"] == step]
    if late.get("error") is None:
        assert engine.finished[step] == 1, "the generation's own result"
    else:
        assert late["error"]["code"] == ABORTED, late
    assert engine.generations[step] == 1, "the step was generated once, never again"
