"""Use cases over in-memory ports: crash recovery of the outbox, idempotency, and the accountant's absence."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from agentbus.agent_runner.ports import RunRecord
from agentbus.agent_runner.service import RunnerMetrics, RunnerService, run_key
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import BuiltinToolbox
from agentbus.contracts.llm import ChatMessage, LlmResult
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.tasks import TaskCancelRequested, TaskSubmitted
from agentbus.runtime.errors import DependencyUnavailableError
from fakes import CrashError, FakeBudgetGate, FakePublisher, FakeRunStore
from prometheus_client import CollectorRegistry

SPEC = AgentSpec(name="echo", model="scripted", system_prompt="Restate.", max_steps=1)
KEY = run_key("acme", "t1")


def _service(store: FakeRunStore, publisher: FakePublisher, budget: FakeBudgetGate | None = None) -> RunnerService:
    return RunnerService(
        store,
        publisher,
        {"echo": SPEC},
        BuiltinToolbox(),
        RunnerMetrics(CollectorRegistry()),
        budget or FakeBudgetGate(),
    )


def _submission(task_id: str = "t1", agent: str = "echo", text: str = "hello") -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, tenant="acme", agent=agent, input=text, submitted_by="app")


def _sent(publisher: FakePublisher) -> list[str]:
    """What went out, without the run's wake-up schedule."""
    return [p.msg_id for p in publisher.published if not p.msg_id.startswith("wake:")]


def _kinds(publisher: FakePublisher) -> list[str]:
    return [json.loads(p.payload)["kind"] for p in publisher.published if p.msg_id.startswith("event:")]


def _answer(text: str = "done") -> LlmResult:
    return LlmResult(
        request_id="acme.t1.step-1",
        task_id="t1",
        tenant="acme",
        model="scripted",
        step=1,
        message=ChatMessage(role="assistant", content=text),
        usage_id="llm:acme.t1.step-1",
    )


async def test_same_task_id_twice_starts_one_run() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(), None)
    await service.submit(_submission(), None)
    assert _sent(publisher) == ["event:acme.t1:1", "llm:acme.t1.step-1"]
    assert any(p.msg_id.startswith("wake:") and p.headers for p in publisher.published), "the deadline is armed"


async def test_two_tenants_may_use_one_task_id() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(), None)
    await service.submit(_submission().model_copy(update={"tenant": "globex"}), None)
    assert set(store.records) == {"acme.t1", "globex.t1"}


async def test_crash_between_store_and_publish_is_recovered_by_the_redelivery() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    publisher.crash_after = 1  # the accepted event goes out, then the process dies
    service = _service(store, publisher)
    with pytest.raises(CrashError):
        await service.submit(_submission(), None)
    record, _ = store.records[KEY]
    assert [item.kind for item in record.outbox] == ["reserve", "publish", "publish", "publish"]

    publisher.crash_after = None
    await _service(store, publisher).submit(_submission(), None)  # redelivered to a restarted runner
    assert _sent(publisher) == ["event:acme.t1:1", "llm:acme.t1.step-1"]
    assert store.records[KEY][0].outbox == []


async def test_unknown_agent_is_rejected_and_the_id_stays_taken() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(agent="nobody"), None)
    await service.submit(_submission(agent="echo"), None)
    assert len(publisher.published) == 1
    assert '"kind":"rejected"' in publisher.published[0].payload
    assert "unknown_agent" in publisher.published[0].payload


async def test_while_the_accountant_is_away_the_task_is_accepted_and_waits_and_its_id_is_taken() -> None:
    store, publisher, budget = FakeRunStore(), FakePublisher(), FakeBudgetGate()
    budget.down = True
    service = _service(store, publisher, budget)
    with pytest.raises(DependencyUnavailableError):
        await service.submit(_submission(text="first"), None)
    assert _sent(publisher) == ["event:acme.t1:1"], "the client hears `accepted`; the step waits for its reservation"
    with pytest.raises(DependencyUnavailableError):
        await service.submit(_submission(text="a different input"), None)
    budget.down = False
    await service.submit(_submission(text="a different input"), None)  # the redelivery of the second
    assert _sent(publisher) == ["event:acme.t1:1", "llm:acme.t1.step-1"]
    request = json.loads(next(p.payload for p in publisher.published if p.msg_id == "llm:acme.t1.step-1"))
    assert request["messages"][-1]["content"] == "first", "the first submission owns the task id"
    assert budget.reserved == ["llm:acme.t1.step-1"]


async def test_a_denied_reservation_ends_the_run_before_its_call_and_closes_its_budget() -> None:
    store, publisher, budget = FakeRunStore(), FakePublisher(), FakeBudgetGate()
    budget.deny = True
    await _service(store, publisher, budget).submit(_submission(), None)
    assert _kinds(publisher) == ["accepted", "budget_exceeded"]
    assert "llm:acme.t1.step-1" not in _sent(publisher)
    exceeded = json.loads(_event(publisher, "budget_exceeded"))
    assert (exceeded["seq"], exceeded["requested_usd"]) == (2, 0.002)
    assert budget.closed == ["t1"]
    assert store.records[KEY][0].outbox == []


def _event(publisher: FakePublisher, kind: str) -> str:
    return next(p.payload for p in publisher.published if p.msg_id.startswith("event:") and f'"{kind}"' in p.payload)


async def test_a_cancel_ends_the_run_even_while_the_accountant_is_away_and_closes_it_when_back() -> None:
    store, publisher, budget = FakeRunStore(), FakePublisher(), FakeBudgetGate()
    service = _service(store, publisher, budget)
    budget.down = True
    with pytest.raises(DependencyUnavailableError):
        await service.submit(_submission(), None)
    request = TaskCancelRequested(task_id="t1", tenant="acme", reason="no longer needed")
    with pytest.raises(DependencyUnavailableError):
        await service.cancel(request, "app", None)  # cancelled is out; closing the budget waits
    assert _kinds(publisher) == ["accepted", "cancelled"]
    assert "llm:acme.t1.step-1" not in _sent(publisher), "the step waiting for its reservation is never made"
    assert json.loads(_event(publisher, "cancelled"))["by"] == "app"
    budget.down = False
    await service.cancel(request, "app", None)
    assert budget.closed == ["t1"]
    assert store.records[KEY][0].outbox == []


async def test_a_completed_run_is_priced_on_all_its_usage_and_its_trace_root_goes_out_with_it() -> None:
    store, publisher, budget = FakeRunStore(), FakePublisher(), FakeBudgetGate(cost_usd=0.25)
    service = _service(store, publisher, budget)
    await service.submit(_submission(), None)
    await service.advance(_answer(), None)
    assert _kinds(publisher) == ["accepted", "step", "completed"]
    assert json.loads(_event(publisher, "completed"))["cost_usd"] == 0.25
    assert budget.cost_queries == [["llm:acme.t1.step-1"]]
    root = next(json.loads(p.payload) for p in publisher.published if p.msg_id.startswith("span:"))
    assert (root["kind"], root["attributes"]["gen_ai.usage.cost"]) == ("task", 0.25)
    assert budget.closed == ["t1"]


async def test_a_run_whose_message_was_given_up_on_fails_and_a_lost_submission_is_answered() -> None:
    store, publisher = FakeRunStore(), FakePublisher()
    service = _service(store, publisher)
    await service.submit(_submission(), None)
    await service.fail("acme", "t1", "the worker gave up")
    assert _kinds(publisher) == ["accepted", "failed"]
    assert json.loads(_event(publisher, "failed"))["error"]["code"] == "internal_error"
    await service.fail("acme", "t2", "the submission was given up on")
    assert "acme.t2" not in store.records, "only a given-up submission claims a task id"
    await service.fail("acme", "t2", "the submission was given up on", claim=True)
    assert store.records["acme.t2"][0].state.status == "failed"


async def test_a_finished_run_waits_for_a_usage_record_still_on_its_way_to_the_ledger() -> None:
    store, publisher, budget = FakeRunStore(), FakePublisher(), FakeBudgetGate(cost_usd=0.5)
    service = _service(store, publisher, budget)
    await service.submit(_submission(), None)
    budget.unpriced = {"llm:acme.t1.step-1"}
    with pytest.raises(DependencyUnavailableError):
        await service.advance(_answer(), None)
    assert "completed" not in _kinds(publisher), "the terminal event does not go out short of a cost"
    budget.unpriced = set()
    await service.advance(_answer(), None)  # redelivered once the record is in the ledger
    assert json.loads(_event(publisher, "completed"))["cost_usd"] == 0.5


class _CountingStore(FakeRunStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, task_id: str) -> tuple[RunRecord, int] | None:
        self.reads += 1
        return await super().get(task_id)


def _step_timer() -> RunTimer:
    return RunTimer(task_id="t1", tenant="acme", due_at=datetime.now(UTC), kind="step", step=1)


async def test_a_timer_of_a_run_this_runner_ended_is_passed_over_without_a_read() -> None:
    store, publisher, budget = _CountingStore(), FakePublisher(), FakeBudgetGate()
    service = _service(store, publisher, budget)
    await service.submit(_submission(), None)
    await service.advance(_answer(), None)
    assert store.records[KEY][0].state.terminal
    reads, published = store.reads, len(publisher.published)
    await service.wake(_step_timer())
    assert store.reads == reads, "the ended run is remembered"
    # Another replica remembers nothing: it reads the run, finds it ended, and does nothing either.
    await _service(store, publisher, budget).wake(_step_timer())
    assert (store.reads, len(publisher.published)) == (reads + 1, published)


async def test_a_run_whose_ending_was_not_carried_out_is_not_passed_over() -> None:
    store, publisher, budget = _CountingStore(), FakePublisher(), FakeBudgetGate()
    service = _service(store, publisher, budget)
    await service.submit(_submission(), None)
    budget.down = True
    with pytest.raises(DependencyUnavailableError):
        await service.advance(_answer(), None)  # stored ended, but not priced nor published yet
    budget.down = False
    reads = store.reads
    await service.wake(_step_timer())
    assert store.reads == reads + 1
    assert _kinds(publisher)[-1] == "completed", "the timer found the ending and carried it out"
