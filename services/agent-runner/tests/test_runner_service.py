"""Use cases over in-memory ports: crash recovery of the outbox and idempotency."""

from __future__ import annotations

import pytest
from agentbus.agent_runner.adapters.nats_budget_gate import UnlimitedBudgetGate
from agentbus.agent_runner.service import RunnerMetrics, RunnerService
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import BuiltinToolbox
from agentbus.contracts.tasks import TaskSubmitted
from fakes import CrashError, FakePublisher, FakeRunStore
from prometheus_client import CollectorRegistry

SPEC = AgentSpec(name="echo", model="scripted", system_prompt="Restate.", max_steps=1)


def _service(store: FakeRunStore, publisher: FakePublisher) -> RunnerService:
    return RunnerService(
        store, publisher, {"echo": SPEC}, BuiltinToolbox(), RunnerMetrics(CollectorRegistry()), UnlimitedBudgetGate()
    )


def _submission(task_id: str = "t1", agent: str = "echo") -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, tenant="acme", agent=agent, input="hello")


async def test_same_task_id_twice_starts_one_run() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(), None)
    await service.submit(_submission(), None)
    assert [p.msg_id for p in publisher.published] == ["event:t1:1", "llm:t1.step-1"]


async def test_crash_between_store_and_publish_is_recovered_by_the_redelivery() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    publisher.crash_after = 1  # the accepted event goes out, then the process dies
    service = _service(store, publisher)
    with pytest.raises(CrashError):
        await service.submit(_submission(), None)
    record, _ = store.records["t1"]
    assert len(record.outbox) == 2, "the outbox was stored before publishing"

    publisher.crash_after = None
    await _service(store, publisher).submit(_submission(), None)  # redelivered to a restarted runner
    assert [p.msg_id for p in publisher.published] == ["event:t1:1", "llm:t1.step-1"]
    assert store.records["t1"][0].outbox == []


async def test_unknown_agent_is_rejected_and_the_id_stays_taken() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(agent="nobody"), None)
    await service.submit(_submission(agent="echo"), None)
    assert len(publisher.published) == 1
    assert '"kind":"rejected"' in publisher.published[0].payload
    assert "unknown_agent" in publisher.published[0].payload
