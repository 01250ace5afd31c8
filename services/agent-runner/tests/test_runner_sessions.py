"""Sessions in the runner's use cases, over in-memory ports: a run's end reaches its client before the run leaves
its session, and the next turn still sees it (under either busy policy, across a crash between the two, with the
store down meanwhile); people who look at the session right after a turn ended see that turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest
from agentbus.agent_runner import sessions
from agentbus.agent_runner.memory import MemoryStoreSpec
from agentbus.agent_runner.ports import (
    MemoryUnavailableError,
    OutboxItem,
    RevisionConflictError,
    SessionExistsError,
)
from agentbus.agent_runner.service import RunnerMetrics, RunnerService, run_key
from agentbus.agent_runner.session_coordinator import SessionCoordinator
from agentbus.agent_runner.sessions import SessionKey, SessionRecord
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import BuiltinToolbox
from agentbus.contracts.common import utc_now
from agentbus.contracts.llm import ChatMessage, LlmRequest, LlmResult
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.sessions import SessionDeleteRequest, SessionShowRequest
from agentbus.contracts.tasks import TaskSubmitted
from agentbus.runtime.errors import DependencyUnavailableError
from fakes import CrashError, FakeBudgetGate, FakePublisher, FakeRunStore
from prometheus_client import CollectorRegistry

AGENT = AgentSpec(name="chat", model="scripted", system_prompt="Help.", max_steps=1, memory="conversations")
KEY = SessionKey("conversations", "acme", "ada", "s1")

Hook = Callable[[], Awaitable[None]]


class FakeSessionStore:
    """One memory store's sessions, compare-and-set; can be down, or die (the runner with it) on a write."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[SessionRecord, int]] = {}
        self._revision = 0
        self.down = False
        self.crash_on_write = False
        self.reads = 0
        self.writes = 0
        self.after_write: Callable[[SessionRecord], Awaitable[None]] | None = None
        """Runs once, right after the next write: what other runners do meanwhile."""
        self.before_write: Callable[[SessionRecord], Awaitable[None]] | None = None
        """Runs before each write reaches the store: that write is in flight meanwhile."""

    async def _in_flight(self, record: SessionRecord) -> None:
        if (hook := self.before_write) is not None:
            await hook(record)

    def _check(self) -> None:
        if self.down:
            raise MemoryUnavailableError("the memory store does not answer")

    async def _write(self, key: SessionKey, record: SessionRecord) -> int:
        if self.crash_on_write:
            raise CrashError
        self.writes += 1
        self._revision += 1
        self.records[key.text] = (record, self._revision)
        revision = self._revision
        if (hook := self.after_write) is not None:
            self.after_write = None
            await hook(record)
        return revision

    async def get(self, key: SessionKey) -> tuple[SessionRecord, int] | None:
        self._check()
        self.reads += 1
        return self.records.get(key.text)

    async def create(self, key: SessionKey, record: SessionRecord) -> int:
        await self._in_flight(record)
        self._check()
        if key.text in self.records:
            raise SessionExistsError(key.text)
        return await self._write(key, record)

    async def update(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        await self._in_flight(record)
        self._check()
        if key.text not in self.records or self.records[key.text][1] != revision:
            raise RevisionConflictError(key.text)
        return await self._write(key, record)

    async def delete(self, key: SessionKey, revision: int) -> bool:
        self._check()
        if key.text not in self.records or self.records[key.text][1] != revision:
            return False
        del self.records[key.text]
        return True

    async def owned(self, tenant: str, submitter: str, limit: int) -> list[SessionRecord]:
        self._check()
        found = [r for r, _ in self.records.values() if (r.tenant, r.submitter) == (tenant, submitter)]
        return found[:limit]

    async def close(self) -> None:
        return None

    def session(self) -> SessionRecord:
        return self.records[KEY.text][0]


class HookedPublisher(FakePublisher):
    """Runs a hook the moment a task's terminal event is out, as a client that acts on it at once would."""

    def __init__(self) -> None:
        super().__init__()
        self.after_end: dict[str, Hook] = {}

    async def publish(self, item: OutboxItem) -> None:
        await super().publish(item)
        if item.msg_id.startswith("event:") and json.loads(item.payload)["kind"] in ("completed", "failed"):
            hook = self.after_end.pop(json.loads(item.payload)["task_id"], None)
            if hook is not None:
                await hook()


def _service(
    runs: FakeRunStore,
    publisher: FakePublisher,
    store: FakeSessionStore,
    on_busy: Literal["queue", "reject"] = "queue",
) -> RunnerService:
    spec = MemoryStoreSpec(name="conversations", on_busy=on_busy)
    return RunnerService(
        runs,
        publisher,
        {"chat": AGENT},
        BuiltinToolbox(),
        RunnerMetrics(CollectorRegistry()),
        FakeBudgetGate(),
        sessions=SessionCoordinator({"conversations": store}, {"conversations": spec}),
    )


def _submission(task_id: str, text: str) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=task_id, tenant="acme", agent="chat", input=text, submitted_by="ada", session_id=KEY.session_id
    )


def _request(publisher: FakePublisher, task_id: str) -> LlmRequest | None:
    prefix = f"llm:acme.{task_id}."
    found = [p for p in publisher.published if p.msg_id.startswith(prefix)]
    return LlmRequest.model_validate_json(found[-1].payload) if found else None


def _answer(publisher: FakePublisher, task_id: str, text: str) -> LlmResult:
    request = _request(publisher, task_id)
    assert request is not None, f"{task_id} asked for no step"
    return LlmResult(
        request_id=request.request_id,
        task_id=task_id,
        tenant="acme",
        model="scripted",
        step=request.step,
        message=ChatMessage(role="assistant", content=text),
        usage_id=f"llm:{request.request_id}",
    )


def _events(publisher: FakePublisher, task_id: str) -> list[dict[str, object]]:
    prefix = f"event:acme.{task_id}:"
    return [json.loads(p.payload) for p in publisher.published if p.msg_id.startswith(prefix)]


def _turn_signal(publisher: FakePublisher, task_id: str) -> RunTimer:
    [item] = [p for p in publisher.published if p.msg_id == f"session-turn:{run_key('acme', task_id)}"]
    return RunTimer.model_validate_json(item.payload)


def _seen(request: LlmRequest | None) -> list[tuple[str, str]]:
    assert request is not None
    return [(m.role, m.content) for m in request.messages if m.role != "system"]


async def _crash_before_leaving(service: RunnerService, store: FakeSessionStore, answer: LlmResult) -> None:
    """The run ends (its end goes out), then its runner dies writing the session leave; the store then works."""
    store.crash_on_write = True
    with pytest.raises(CrashError):
        await service.advance(answer, None)
    store.crash_on_write = False


async def _next_turn_the_moment_the_last_one_ended(
    on_busy: Literal["queue", "reject"], *, leave_lands_first: bool
) -> tuple[RunnerService, HookedPublisher, FakeSessionStore]:
    """Turn t1 ends and its client sends turn t2 the moment it hears that end. `leave_lands_first`: t1's leave,
    sent with the end, lands while the end's acknowledgement comes back, before t2 arrives; else t2 joins
    while the leave is still in flight (it lands once t2 has joined)."""
    runs, publisher, store = FakeRunStore(), HookedPublisher(), FakeSessionStore()
    service = _service(runs, publisher, store, on_busy)
    await service.submit(_submission("t1", "I am Grace"), None)
    running_at_the_end: list[str | None] = []

    async def next_turn() -> None:
        running_at_the_end.append(store.session().running)
        joined = asyncio.Event()

        async def leave_in_flight(record: SessionRecord) -> None:
            if "t1" in record.closed:
                await joined.wait()

        if leave_lands_first:
            for _ in range(100):
                if store.session().running is None:
                    break
                await asyncio.sleep(0)
        else:
            store.before_write = leave_in_flight
        await service.submit(_submission("t2", "who am I?"), None)
        joined.set()

    publisher.after_end["t1"] = next_turn
    await service.advance(_answer(publisher, "t1", "Hello Grace"), None)
    assert running_at_the_end == ["t1"], "the client heard the end before the run left its session"
    assert _events(publisher, "t2")[0]["kind"] == "accepted", _events(publisher, "t2")
    return service, publisher, store


@pytest.mark.parametrize("on_busy", ["queue", "reject"])
async def test_the_next_turn_submitted_the_moment_the_last_one_ended_runs_at_once_and_sees_it(
    on_busy: Literal["queue", "reject"],
) -> None:
    _, publisher, store = await _next_turn_the_moment_the_last_one_ended(on_busy, leave_lands_first=True)
    assert _events(publisher, "t2")[0]["queued"] is False, "the leave went out with the end: t2 found it landed"
    assert _seen(_request(publisher, "t2")) == [
        ("user", "I am Grace"),
        ("assistant", "Hello Grace"),
        ("user", "who am I?"),
    ]
    assert store.session().running == "t2"


@pytest.mark.parametrize("on_busy", ["queue", "reject"])
async def test_the_next_turn_that_joins_before_the_leave_lands_waits_for_it_and_sees_it(
    on_busy: Literal["queue", "reject"],
) -> None:
    service, publisher, store = await _next_turn_the_moment_the_last_one_ended(on_busy, leave_lands_first=False)
    assert _events(publisher, "t2")[0]["queued"] is True
    assert _request(publisher, "t2") is None, "t2 waits for the leave"
    await service.wake(_turn_signal(publisher, "t2"))
    assert _seen(_request(publisher, "t2")) == [
        ("user", "I am Grace"),
        ("assistant", "Hello Grace"),
        ("user", "who am I?"),
    ]
    assert store.session().running == "t2"


async def test_a_strict_session_refuses_the_next_turn_while_the_last_one_runs() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store, "reject")
    await service.submit(_submission("t1", "I am Grace"), None)
    await service.submit(_submission("t2", "who am I?"), None)
    rejected = _events(publisher, "t2")[-1]
    assert rejected["kind"] == "rejected"
    error = rejected["error"]
    assert isinstance(error, dict)
    assert error["code"] == "session_busy"
    assert (store.session().running, store.session().waiting) == ("t1", [])


async def test_a_crash_between_the_end_and_the_leave_still_leaves_once_on_the_redelivery() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    await _service(runs, publisher, store).submit(_submission("t1", "I am Grace"), None)
    answer = _answer(publisher, "t1", "Hello Grace")
    await _crash_before_leaving(_service(runs, publisher, store), store, answer)
    assert [e["kind"] for e in _events(publisher, "t1")][-1] == "completed", "the client heard the end"
    assert store.session().running == "t1"
    assert store.session().turns == []

    restarted = _service(runs, publisher, store)
    await restarted.advance(answer, None)  # the redelivery, to a restarted runner
    await restarted.advance(answer, None)  # and a late repeat of it
    session = store.session()
    assert session.running is None
    assert [turn.task_id for turn in session.turns] == ["t1"]
    assert session.closed == ["t1"]
    assert [e["kind"] for e in _events(publisher, "t1")].count("completed") == 1
    assert runs.records[run_key("acme", "t1")][0].outbox == []


async def test_a_waiting_turn_never_evicts_a_task_whose_leave_is_on_its_way() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store)
    await service.submit(_submission("t1", "I am Grace"), None)
    await service.submit(_submission("t2", "who am I?"), None)
    answer = _answer(publisher, "t1", "Hello Grace")
    await _crash_before_leaving(service, store, answer)

    restarted = _service(runs, publisher, store)
    await restarted.wake(RunTimer(task_id="t2", tenant="acme", due_at=utc_now(), kind="session"))
    assert (store.session().running, store.session().waiting) == ("t1", ["t2"])
    assert _request(publisher, "t2") is None

    await restarted.advance(answer, None)  # the redelivery leaves, handing the session to t2
    await restarted.wake(_turn_signal(publisher, "t2"))
    assert ("assistant", "Hello Grace") in _seen(_request(publisher, "t2"))


async def test_a_turn_signalled_before_its_run_was_stored_still_gets_its_turn() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store)
    await service.submit(_submission("t1", "I am Grace"), None)
    answer = _answer(publisher, "t1", "Hello Grace")
    await _crash_before_leaving(service, store, answer)

    queued: list[str] = []

    async def t1_leaves_and_its_signal_is_handled_at_once(written: SessionRecord) -> None:
        queued.extend(written.waiting)
        await service.advance(answer, None)  # the redelivery: t1 leaves, handing the session to t2
        await service.wake(_turn_signal(publisher, "t2"))  # no run t2 yet: the signal changes nothing
        assert run_key("acme", "t2") not in runs.records

    store.after_write = t1_leaves_and_its_signal_is_handled_at_once
    await service.submit(_submission("t2", "who am I?"), None)
    assert queued == ["t2"], "t2 was queued behind t1"
    assert ("assistant", "Hello Grace") in _seen(_request(publisher, "t2"))


async def test_a_taken_task_id_submitted_to_another_session_leaves_it_again() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store)
    await service.submit(_submission("t1", "I am Grace"), None)
    await service.advance(_answer(publisher, "t1", "Hello Grace"), None)
    sent = len(publisher.published)
    await service.submit(_submission("t1", "who am I?").model_copy(update={"session_id": "s2"}), None)
    other = store.records[SessionKey("conversations", "acme", "ada", "s2").text][0]
    assert (other.running, other.waiting, other.turns) == (None, [], [])
    assert len(publisher.published) == sent, "the task id stays taken: nothing else happens"


async def test_a_strict_session_held_by_a_run_that_will_never_leave_is_repaired_for_the_next_turn() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store, "reject")
    ghost = _submission("ghost", "hello").model_copy(update={"session_id": None})
    await service.submit(ghost, None)
    await service.advance(_answer(publisher, "ghost", "hi"), None)
    held = sessions.join(None, KEY, "ghost", utc_now(), "reject").record
    assert held is not None
    store.records[KEY.text] = (held, 1)
    await service.submit(_submission("t2", "who am I?"), None)
    assert _events(publisher, "t2")[0]["kind"] == "accepted"
    assert _request(publisher, "t2") is not None, "t2 runs: the run that held the session was evicted"
    assert store.session().running == "t2"


async def test_with_the_store_down_the_end_goes_out_and_the_leave_waits_for_the_store() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store)
    await service.submit(_submission("t1", "I am Grace"), None)
    answer = _answer(publisher, "t1", "Hello Grace")
    store.down = True
    with pytest.raises(DependencyUnavailableError):
        await service.advance(answer, None)
    assert [e["kind"] for e in _events(publisher, "t1")][-1] == "completed"
    assert [item.kind for item in runs.records[run_key("acme", "t1")][0].outbox] == ["session_leave"]

    store.down = False
    await service.advance(answer, None)  # redelivered with backoff
    assert [turn.task_id for turn in store.session().turns] == ["t1"]
    assert store.session().running is None


async def test_right_after_a_turn_ended_its_session_shows_it_and_may_be_deleted() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    await _service(runs, publisher, store).submit(_submission("t1", "I am Grace"), None)
    answer = _answer(publisher, "t1", "Hello Grace")
    await _crash_before_leaving(_service(runs, publisher, store), store, answer)

    people = _service(runs, publisher, store)
    [shown] = (await people.session_show("acme", "ada", SessionShowRequest(session_id="s1"))).sessions
    assert shown.running is None
    assert [turn.task_id for turn in shown.history] == ["t1"]
    deleted = await people.session_delete("acme", "ada", SessionDeleteRequest(session_id="s1"))
    assert deleted.error is None
    assert deleted.deleted == ["conversations"]


async def test_a_turn_of_a_quiet_session_costs_one_write_to_join_and_one_to_leave() -> None:
    runs, publisher, store = FakeRunStore(), FakePublisher(), FakeSessionStore()
    service = _service(runs, publisher, store)
    await service.submit(_submission("t1", "I am Grace"), None)
    await service.advance(_answer(publisher, "t1", "Hello Grace"), None)
    reads, writes = store.reads, store.writes
    await service.submit(_submission("t2", "who am I?"), None)
    await service.advance(_answer(publisher, "t2", "Grace"), None)
    assert (store.reads - reads, store.writes - writes) == (0, 2), "the runner recalls the record it wrote last"
