"""Rate limits in the run: a throttled step waits (a `throttled` event, a timer) and is reserved and sent again
when the timer fires; a `reject` limit rejects the submission before its acceptance goes out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from agentbus.agent_runner import domain
from agentbus.agent_runner.domain import RunStatus
from agentbus.agent_runner.service import RunnerMetrics, RunnerService, run_key
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import BuiltinToolbox
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.llm import ChatMessage, LlmResult
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.tasks import TaskCancelRequested, TaskSubmitted
from agentbus.runtime.errors import DependencyUnavailableError
from fakes import FakeBudgetGate, FakePublisher, FakeRunStore
from prometheus_client import CollectorRegistry

SPEC = AgentSpec(name="echo", model="scripted", system_prompt="Restate.", max_steps=1, timeout_seconds=600)
KEY = run_key("acme", "t1")
START = datetime(2026, 12, 6, 12, 0, 10, tzinfo=UTC)
LIMIT = "tenant:acme:requests_per_minute"


class ScriptedGate(FakeBudgetGate):
    """The accountant answering each reservation with the next scripted reply, then allowing."""

    def __init__(self, *replies: BudgetReserveReply) -> None:
        super().__init__()
        self.replies = list(replies)
        self.asked: list[str] = []

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        self._check()
        self.asked.append(request.reservation_id)
        if self.replies:
            return self.replies.pop(0).model_copy(update={"reservation_id": request.reservation_id})
        return await super().reserve(request)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def throttled(wait: float) -> BudgetReserveReply:
    return BudgetReserveReply(reservation_id="?", allowed=False, throttled=True, retry_after_seconds=wait, limit=LIMIT)


def refused() -> BudgetReserveReply:
    return BudgetReserveReply(
        reservation_id="?",
        allowed=False,
        retry_after_seconds=20.0,
        limit=LIMIT,
        error=ErrorInfo(code="rate_limited", message=f"rate limit {LIMIT} refuses new tasks while it is reached"),
    )


def service(store: FakeRunStore, publisher: FakePublisher, gate: FakeBudgetGate, clock: Clock) -> RunnerService:
    return RunnerService(
        store, publisher, {"echo": SPEC}, BuiltinToolbox(), RunnerMetrics(CollectorRegistry()), gate, clock=clock
    )


def submission() -> TaskSubmitted:
    return TaskSubmitted(task_id="t1", tenant="acme", agent="echo", input="hello", submitted_by="app")


def events(publisher: FakePublisher) -> list[dict[str, object]]:
    return [json.loads(p.payload) for p in publisher.published if p.msg_id.startswith("event:")]


def timers(publisher: FakePublisher) -> list[RunTimer]:
    return [RunTimer.model_validate_json(p.payload) for p in publisher.published if p.msg_id.startswith("wake:")]


def llm_requests(publisher: FakePublisher) -> list[str]:
    return [p.msg_id for p in publisher.published if p.msg_id.startswith("llm:")]


def answer() -> LlmResult:
    return LlmResult(
        request_id="acme.t1.step-1",
        task_id="t1",
        tenant="acme",
        model="scripted",
        step=1,
        message=ChatMessage(role="assistant", content="done"),
        usage_id="llm:acme.t1.step-1",
    )


async def test_a_throttled_step_waits_says_so_and_is_sent_when_its_timer_fires() -> None:
    store, publisher, gate, clock = FakeRunStore(), FakePublisher(), ScriptedGate(throttled(7.5)), Clock()
    runner = service(store, publisher, gate, clock)
    await runner.submit(submission(), None)

    assert [(e["kind"], e["seq"]) for e in events(publisher)] == [("accepted", 1), ("throttled", 2)]
    notice = events(publisher)[1]
    assert notice["limit"] == LIMIT
    assert notice["wait_seconds"] == 7.5
    assert notice["step"] == 1
    assert llm_requests(publisher) == [], "the held-back request is not sent"
    retry = timers(publisher)[-1]
    assert (retry.kind, retry.step, retry.due_at) == ("step", 1, START + timedelta(seconds=7.5))
    assert store.records[KEY][0].state.throttled

    clock.now = retry.due_at
    await runner.wake(retry)
    assert gate.asked == ["llm:acme.t1.step-1", "llm:acme.t1.step-1"], "the same reservation is asked again"
    assert llm_requests(publisher) == ["llm:acme.t1.step-1"]
    assert not store.records[KEY][0].state.throttled

    await runner.advance(answer(), None)
    assert [e["kind"] for e in events(publisher)] == ["accepted", "throttled", "step", "completed"]


async def test_a_step_throttled_again_waits_again_and_never_fails() -> None:
    store, publisher, gate, clock = FakeRunStore(), FakePublisher(), ScriptedGate(throttled(5), throttled(5)), Clock()
    runner = service(store, publisher, gate, clock)
    await runner.submit(submission(), None)
    clock.now += timedelta(seconds=5)
    await runner.wake(timers(publisher)[-1])
    assert [e["kind"] for e in events(publisher)] == ["accepted", "throttled", "throttled"]
    clock.now += timedelta(seconds=5)
    await runner.wake(timers(publisher)[-1])
    await runner.advance(answer(), None)
    assert [e["kind"] for e in events(publisher)] == ["accepted", "throttled", "throttled", "step", "completed"]


async def test_a_wait_past_the_deadline_ends_the_run_at_its_deadline() -> None:
    store, publisher, gate, clock = FakeRunStore(), FakePublisher(), ScriptedGate(throttled(3600)), Clock()
    runner = service(store, publisher, gate, clock)
    await runner.submit(submission(), None)
    deadline = timers(publisher)[-1]
    assert deadline.kind == "deadline"
    clock.now = deadline.due_at
    await runner.wake(deadline)
    final = events(publisher)[-1]
    assert final["kind"] == "failed"
    error = final["error"]
    assert isinstance(error, dict)
    assert error["code"] == "deadline_exceeded"


async def test_a_reject_limit_rejects_the_submission_before_its_acceptance_goes_out() -> None:
    store, publisher, gate, clock = FakeRunStore(), FakePublisher(), ScriptedGate(refused()), Clock()
    runner = service(store, publisher, gate, clock)
    await runner.submit(submission(), None)
    assert [(e["kind"], e["seq"]) for e in events(publisher)] == [("rejected", 1)]
    assert events(publisher)[0]["error"] == {
        "code": "rate_limited",
        "message": f"rate limit {LIMIT} refuses new tasks while it is reached",
    }
    assert llm_requests(publisher) == []
    assert store.records[KEY][0].state.status is RunStatus.REJECTED
    await runner.submit(submission(), None)
    assert len(events(publisher)) == 1, "the task id stays taken"


async def test_a_task_accepted_while_the_accountant_was_away_waits_rather_than_being_rejected() -> None:
    store, publisher, gate, clock = FakeRunStore(), FakePublisher(), ScriptedGate(refused()), Clock()
    gate.down = True
    runner = service(store, publisher, gate, clock)
    with pytest.raises(DependencyUnavailableError):
        await runner.submit(submission(), None)
    assert [e["kind"] for e in events(publisher)] == ["accepted"], "the client hears `accepted` meanwhile"
    gate.down = False
    await runner.submit(submission(), None)  # the redelivery
    assert [e["kind"] for e in events(publisher)] == ["accepted", "throttled"]
    assert events(publisher)[1]["wait_seconds"] == 20.0


def test_throttling_a_run_that_ended_does_nothing() -> None:
    started = domain.start(submission(), SPEC, BuiltinToolbox(), now=START)
    ended = domain.cancel(started.state, TaskCancelRequested(task_id="t1", tenant="acme"))
    assert ended is not None
    assert domain.throttle(ended.state, throttled(5), START) is None
