"""The runner's use cases: apply one input to a run, store the result, then carry out its outbox.

Each transition is stored together with everything it must do (an outbox in the run record) before any of
it is done, and every later transition first carries out a leftover outbox. Publishes carry deterministic
`Nats-Msg-Id`s, so a repeat is dropped by JetStream; budget reservations are idempotent on the call's id. A
runner killed at any point therefore neither loses a message nor sends one twice, and the event `seq`
stays gap-free.

A dependency that is down is waited for, never a reason to give up: while the cost-accountant does not
answer, the input is redelivered with backoff (`DependencyUnavailableError`). The run's id is taken, and its
`accepted` event out, as soon as the first transition is stored; the call that needs a reservation waits
in the outbox behind it. Only what ends a run (its deadline, a cancellation, a message given up on) goes
ahead without the accountant: the waiting call is then dropped, since it will never be made.

A task of a session joins it before its first transition is decided (the session's history is part of the
run's first request, and a busy session may refuse it); a run leaves its session right behind its terminal
event, without waiting for that event's acknowledgement, and its client does not wait for the leave. The next
task of the session still sees the turn: while the session names the ended run as running, the next task waits
for the leave, which hands it the session (a store that refuses a busy session's tasks lets it wait too: that
run has ended), and people reading the session carry the leave out themselves. A memory store that is down is
waited for like the accountant; a run that ends meanwhile sends its terminal event anyway, and leaves the
session when the store is back. Memory tool calls (remember, recall) are carried out last, by the runner
itself: their results are applied to the run in a transition stored in place of the outbox, like a budget
denial's ending.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from agentbus.agent_runner import domain
from agentbus.agent_runner import sessions as session_views
from agentbus.agent_runner.domain import (
    ANONYMOUS,
    DEFAULT_TIMING,
    DIRECT,
    ErrorCode,
    MemoryCall,
    Router,
    RunState,
    RunStatus,
    RunTiming,
    SessionLeave,
    Toolbox,
    Transition,
)
from agentbus.agent_runner.memory import MemoryStoreSpec
from agentbus.agent_runner.ports import (
    BudgetGate,
    BudgetRefusedError,
    BudgetTaskClosedError,
    BudgetUnavailableError,
    EventLog,
    LongTermMemory,
    MemoryOutcome,
    MemoryUnavailableError,
    OutboxItem,
    Publisher,
    RevisionConflictError,
    RunExistsError,
    RunRecord,
    RunStore,
    TaskCost,
)
from agentbus.agent_runner.session_coordinator import SessionBusyError, SessionCoordinator
from agentbus.agent_runner.sessions import Admission, SessionKey, SessionRecord
from agentbus.agent_runner.specs import AgentSpec
from agentbus.contracts.budget import BudgetErrorCode, BudgetReserveRequest
from agentbus.contracts.common import ErrorInfo, utc_now
from agentbus.contracts.llm import LlmRequest, LlmResult
from agentbus.contracts.registry import (
    LLM_ABORT,
    LLM_REQUEST,
    RUN_SCHEDULE,
    RUN_TIMER,
    SPAN,
    TASK_EVENT,
    TOOL_CALL,
    TOOL_WITHDRAW,
    Header,
    Service,
)
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.sessions import (
    SessionDeleteReply,
    SessionDeleteRequest,
    SessionShowReply,
    SessionShowRequest,
    SessionsListReply,
    SessionsListRequest,
)
from agentbus.contracts.spans import SpanRecorded
from agentbus.contracts.tasks import (
    TASK_EVENT_ADAPTER,
    TERMINAL_EVENT_KINDS,
    TaskCancelRequested,
    TaskCompleted,
    TaskGuardrail,
    TaskReplayReply,
    TaskReplayRequest,
    TaskSubmitted,
)
from agentbus.contracts.tools import ToolCallUpdate
from agentbus.runtime.errors import DependencyUnavailableError, RetryableError
from agentbus.runtime.guardrails import Guardrails
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.spans import NullSpanEmitter, SpanAttribute, SpanEmitter, span_msg_id
from agentbus.runtime.tracing import TraceContext
from prometheus_client import CollectorRegistry, Counter

_log = get_logger(__name__)

_MAX_CONFLICT_RETRIES = 20
_ENDED_REMEMBERED = 50_000
"""Runs this runner ended (their terminal record stored and carried out) that it remembers: a timer of one
of them, which fires after the run ended as a rule (every step arms one), is passed over without a read."""
USAGE_PATIENCE = timedelta(minutes=10)
"""How long a finished run's terminal event waits for a usage record it named to reach the ledger."""

Decide = Callable[[RunState | None], Transition | None]
Current = tuple[RunRecord, int] | None
_UNREAD = object()
"""`_transact`'s first read, when the caller has not read the run already."""


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "agentbus_task_events_total", "Task events published, by kind.", ["kind"], registry=registry
        )
        self.guardrail_findings = Counter(
            "agentbus_guardrail_findings_total",
            "What guardrail checks found, by policy, detector, action and stage.",
            ["policy", "detector", "action", "stage"],
            registry=registry,
        )
        self.redrives = Counter(
            "agentbus_run_redrives_total",
            "Steps re-driven because the run still waited at a wake-up.",
            registry=registry,
        )


def run_key(tenant: str, task_id: str) -> str:
    """The key of a run's record: a task id is its tenant's, so two tenants never share a run."""
    return f"{tenant}.{task_id}"


@dataclass(frozen=True)
class _Done:
    """What carrying out an outbox ended with: the record as stored, and its revision."""

    record: RunRecord
    revision: int


class RunnerService:
    def __init__(
        self,
        store: RunStore,
        publisher: Publisher,
        agents: dict[str, AgentSpec],
        toolbox: Toolbox,
        metrics: RunnerMetrics,
        budget: BudgetGate,
        router: Router = DIRECT,
        spans: SpanEmitter | None = None,
        *,
        timing: RunTiming = DEFAULT_TIMING,
        events: EventLog | None = None,
        clock: Callable[[], datetime] = utc_now,
        sessions: SessionCoordinator | None = None,
        memory: LongTermMemory | None = None,
        guardrails: Mapping[str, Guardrails] | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._agents = agents
        self._toolbox = toolbox
        self._metrics = metrics
        self._budget = budget
        self._router = router
        self._spans = spans or NullSpanEmitter(Service.AGENT_RUNNER)
        self._timing = timing
        self._events = events
        self._clock = clock
        self._sessions = sessions
        self._memory = memory
        self._guardrails = dict(guardrails or {})
        self._ended: OrderedDict[str, None] = OrderedDict()

    # --- inputs ------------------------------------------------------------------------------------

    async def submit(self, submission: TaskSubmitted, trace: TraceContext | None) -> None:
        """Start a run; a task id seen before in the tenant (running, ended or rejected) starts nothing.

        A task of a session joins the session first: what that gave it (run now after the history, wait, or be
        refused) is part of the run's first transition.
        """
        spec = self._agents.get(submission.agent)
        store = self._memory_spec(spec.memory if spec is not None else None)
        admission: Admission | None = None
        session_key: SessionKey | None = None
        joined = False
        if spec is not None and store is not None and submission.session_id is not None:
            session_key = SessionKey(
                store.name, submission.tenant, submission.submitted_by or ANONYMOUS, submission.session_id
            )
            # A task id that turns out to be taken has joined for nothing (unless it is this very run, which
            # joined before: that changes nothing), and leaves again below.
            admission, joined = await self._join(session_key, submission.task_id)
        existing: list[RunState] = []

        def decide(state: RunState | None) -> Transition | None:
            existing[:] = [state] if state is not None else []
            if state is not None:
                return None
            if spec is None:
                return domain.reject(
                    submission.task_id,
                    submission.tenant,
                    ErrorCode.UNKNOWN_AGENT,
                    f"no agent named {submission.agent!r}; known agents: {sorted(self._agents)}",
                )
            if submission.session_id is not None and store is None:
                return domain.reject(
                    submission.task_id,
                    submission.tenant,
                    ErrorCode.SESSION_UNSUPPORTED,
                    f"agent {spec.name!r} keeps no sessions: its spec names no memory store (`memory:`)",
                )
            return domain.start(
                submission,
                spec,
                self._toolbox,
                self._router,
                now=self._clock(),
                timing=self._timing,
                memory=store,
                admission=admission,
                guardrails=self._guardrails.get(spec.name),
            )

        # A new task has no run yet: it is created without being read first. A taken task id fails that create
        # (compare-and-set), and the run found is decided again: a repeated submission starts nothing.
        await self._transact(submission.tenant, submission.task_id, decide, trace, current=None)
        if admission is not None and admission.status == "waiting" and not existing:
            # The task before it may have left, and signalled this run, before this run was stored (a signal
            # that finds no run is dropped): now that it is stored, it asks for its turn again.
            timer = RunTimer(task_id=submission.task_id, tenant=submission.tenant, due_at=self._clock(), kind="session")
            await self.wake(timer)
        if joined and session_key is not None and existing:
            # The task id was taken by another submission meanwhile: unless that is this very run of this
            # session, still going, the session must not keep this task in it.
            other = existing[0]
            if other.terminal or other.session is None or other.session.key(submission.tenant) != session_key:
                leave = SessionLeave(
                    store=session_key.store,
                    tenant=session_key.tenant,
                    submitter=session_key.submitter,
                    session_id=session_key.session_id,
                    task_id=submission.task_id,
                )
                await self._signal(submission.tenant, await self._sessions_or_fail().leave(leave))

    def _memory_spec(self, store: str | None) -> MemoryStoreSpec | None:
        if store is None or self._sessions is None:
            return None
        return self._sessions.spec(store)

    def _sessions_or_fail(self) -> SessionCoordinator:
        assert self._sessions is not None
        return self._sessions

    async def _join(self, key: SessionKey, task_id: str, *, repair: bool = False) -> tuple[Admission, bool]:
        """Join a session, waiting for its store while it is down; tell the tasks whose turn came meanwhile."""
        stale = self._stale_in(key) if repair else None
        try:
            admission, wrote, signals = await self._sessions_or_fail().join(key, task_id, stale, self._leaving_in(key))
        except MemoryUnavailableError as exc:
            raise DependencyUnavailableError(str(exc)) from exc
        await self._signal(key.tenant, signals)
        return admission, wrote

    def _stale_in(self, key: SessionKey) -> Callable[[str], Awaitable[bool]]:
        """Whether the task a session names as running ended without leaving it (or is of another session)."""

        async def stale(task_id: str) -> bool:
            current = await self._store.get(run_key(key.tenant, task_id))
            if current is None:
                return False  # it may be starting this very moment
            record, _ = current
            return _done_with(record, key) and _pending_leave(record, key) is None

        return stale

    def _leaving_in(self, key: SessionKey) -> Callable[[str], Awaitable[bool]]:
        """Whether the task a session names as running is about to give it up: its run ended (its terminal event
        goes out before its leave; a run that will never leave is evicted by the next waiting task's repair) or
        is another session's (a taken task id that joined for nothing, and leaves again)."""

        async def leaving(task_id: str) -> bool:
            current = await self._store.get(run_key(key.tenant, task_id))
            return current is not None and _done_with(current[0], key)

        return leaving

    async def _signal(self, tenant: str, task_ids: tuple[str, ...]) -> None:
        """Tell runs waiting for their session that their turn has come: a timer, published at once."""
        for task_id in task_ids:
            timer = RunTimer(task_id=task_id, tenant=tenant, due_at=self._clock(), kind="session")
            await self._publisher.publish(
                OutboxItem(
                    subject=RUN_TIMER.format(tenant=tenant),
                    msg_id=f"session-turn:{run_key(tenant, task_id)}",
                    payload=timer.model_dump_json(),
                )
            )

    async def reject(
        self, task_id: str, tenant: str, code: ErrorCode, message: str, trace: TraceContext | None
    ) -> None:
        """Refuse a submission that failed validation: a `rejected` event, unless the id is taken."""

        def decide(state: RunState | None) -> Transition | None:
            return None if state is not None else domain.reject(task_id, tenant, code, message)

        await self._transact(tenant, task_id, decide, trace)

    async def cancel(self, request: TaskCancelRequested, by: str | None, trace: TraceContext | None) -> None:
        """Cancel a run; a cancellation that arrives first keeps the task from starting."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return domain.cancel_before_start(request)
            return domain.cancel(state, request, by)

        await self._transact(request.tenant, request.task_id, decide, trace, ends_run=True)

    async def advance(self, result: LlmResult, trace: TraceContext | None) -> None:
        """Continue a run with a generated step; stale and repeated results change nothing."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                _log.warning("llm_result_for_unknown_run", request_id=result.request_id)
                return None
            guardrails, memory = self._guardrails.get(state.agent), self._memory_spec(state.memory_store)
            return domain.apply_llm_result(state, result, self._toolbox, self._router, guardrails, memory)

        await self._transact(result.tenant, result.task_id, decide, trace)

    async def apply_tool_update(self, update: ToolCallUpdate, trace: TraceContext | None) -> None:
        """Record approval progress or a tool result; the last result of a step asks for the next step."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                _log.warning("tool_update_for_unknown_run", call_id=update.call_id)
                return None
            return domain.apply_tool_update(state, update, self._router, self._memory_spec(state.memory_store))

        await self._transact(update.tenant, update.task_id, decide, trace)

    async def wake(self, timer: RunTimer) -> None:
        """A run's timer fired: end the run at its deadline, or re-drive a step that still waits. A run that
        waits for its session asks for it again (its turn came, or the task before it ended without a word)."""
        if run_key(timer.tenant, timer.task_id) in self._ended:
            return  # a terminal run never changes again: nothing to end, re-drive or admit
        now = self._clock()
        current: Current | object = _UNREAD
        admission: Admission | None = None
        store: MemoryStoreSpec | None = None
        if self._sessions is not None and timer.kind in ("session", "step"):
            current = await self._store.get(run_key(timer.tenant, timer.task_id))
            state = current[0].state if isinstance(current, tuple) else None
            if state is not None and state.session_waiting and not state.terminal and state.session is not None:
                store = self._memory_spec(state.session.store)
                try:
                    admission, _ = await self._join(state.session.key(timer.tenant), timer.task_id, repair=True)
                except DependencyUnavailableError as exc:
                    # The store is down: the run keeps waiting (and still ends at its deadline).
                    _log.warning("session_unavailable_at_wake", reason=str(exc))

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return None
            if admission is not None:
                admitted = domain.admit(state, admission, store, self._router, now=now, timing=self._timing)
                if admitted is not None:
                    return admitted
            return domain.wake(state, timer, now, self._timing)

        await self._transact(timer.tenant, timer.task_id, decide, None, ends_run=True, current=current)

    async def fail(self, tenant: str, task_id: str, reason: str, *, claim: bool = False) -> None:
        """End a run because a message it depends on was given up on. With `claim`, a task id that has no run
        yet (its submission was given up on) is taken and ends failed too, so its client hears why."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return domain.fail_before_start(task_id, tenant, reason) if claim else None
            return domain.fail_internal(state, reason)

        await self._transact(tenant, task_id, decide, None, ends_run=True)

    async def replay(self, tenant: str, task_id: str, request: TaskReplayRequest) -> TaskReplayReply:
        """A task's stored events from `request.from_seq`, for identities that may not read the stream."""
        if self._events is None:
            error = ErrorInfo(code="unavailable", message="this runner does not serve replays")
            return TaskReplayReply(task_id=task_id, tenant=tenant, error=error)
        events, more = await self._events.events(tenant, task_id, request.from_seq, request.limit)
        return TaskReplayReply(
            task_id=task_id,
            tenant=tenant,
            events=events,
            complete=bool(events) and events[-1].kind in TERMINAL_EVENT_KINDS,
            more=more,
            next_seq=events[-1].seq + 1 if events else request.from_seq,
        )

    # --- people's requests on their sessions ------------------------------------------------------

    async def sessions_list(self, tenant: str, submitter: str, request: SessionsListRequest) -> SessionsListReply:
        """The submitter's sessions in the tenant, most recently changed first."""
        if self._sessions is None:
            return SessionsListReply()
        try:
            found = await self._sessions.owned(tenant, submitter, request.store, request.limit + 1)
            if await self._settle(tenant, found):
                found = await self._sessions.owned(tenant, submitter, request.store, request.limit + 1)
        except MemoryUnavailableError as exc:
            return SessionsListReply(error=ErrorInfo(code="unavailable", message=str(exc)))
        return SessionsListReply(
            sessions=[session_views.info(record) for record in found[: request.limit]],
            more=len(found) > request.limit,
        )

    async def session_show(self, tenant: str, submitter: str, request: SessionShowRequest) -> SessionShowReply:
        """One of the submitter's sessions, with its history and summary, in each store that has it."""
        if self._sessions is None:
            return SessionShowReply()
        try:
            found = await self._sessions.show(tenant, submitter, request.session_id, request.store)
            if await self._settle(tenant, found):
                found = await self._sessions.show(tenant, submitter, request.session_id, request.store)
        except MemoryUnavailableError as exc:
            return SessionShowReply(error=ErrorInfo(code="unavailable", message=str(exc)))
        return SessionShowReply(sessions=[session_views.detail(record) for record in found])

    async def session_delete(self, tenant: str, submitter: str, request: SessionDeleteRequest) -> SessionDeleteReply:
        """Forget one of the submitter's sessions; refused `session_busy` while a task of it runs or waits."""
        if self._sessions is None:
            return SessionDeleteReply()
        try:
            try:
                deleted = await self._sessions.delete(tenant, submitter, request.session_id, request.store)
            except SessionBusyError:
                found = await self._sessions.show(tenant, submitter, request.session_id, request.store)
                if not await self._settle(tenant, found):
                    raise
                deleted = await self._sessions.delete(tenant, submitter, request.session_id, request.store)
        except SessionBusyError as exc:
            return SessionDeleteReply(error=ErrorInfo(code=ErrorCode.SESSION_BUSY, message=str(exc)))
        except MemoryUnavailableError as exc:
            return SessionDeleteReply(error=ErrorInfo(code="unavailable", message=str(exc)))
        return SessionDeleteReply(deleted=deleted)

    async def _settle(self, tenant: str, found: list[SessionRecord]) -> bool:
        """Carry out, on its behalf, the leave of each found session's running task that has ended: its end
        reaches its client before it leaves the session, and a client that heard a turn end must see that
        turn (and may delete the session). Leaving twice changes nothing. True if any session changed."""
        settled = False
        for record in found:
            if record.running is None:
                continue
            current = await self._store.get(run_key(tenant, record.running))
            key = SessionKey(record.store, record.tenant, record.submitter, record.session_id)
            item = _pending_leave(current[0], key) if current is not None else None
            if item is not None:
                await self._leave(item)
                settled = True
        return settled

    # --- the transaction ---------------------------------------------------------------------------

    async def _transact(
        self,
        tenant: str,
        task_id: str,
        decide: Decide,
        trace: TraceContext | None,
        *,
        ends_run: bool = False,
        current: Current | object = _UNREAD,
    ) -> None:
        """Apply `decide` to the run, then carry out what it stored.

        `ends_run`: the input may end the run without the accountant (deadline, cancel, dead letter); if a
        leftover call still waits for its reservation, the run ends without making it. `current`: the run
        as the caller just read it.
        """
        bind_message_context(task_id=task_id, tenant=tenant)
        key = run_key(tenant, task_id)
        for _ in range(_MAX_CONFLICT_RETRIES):
            if current is _UNREAD:
                current = await self._store.get(key)
            assert current is None or isinstance(current, tuple)
            record, revision = current if current is not None else (None, 0)
            current = _UNREAD
            if record is not None and record.outbox:
                try:
                    done = await self._carry_out(key, record, revision)
                except RevisionConflictError:
                    continue
                except (BudgetUnavailableError, MemoryUnavailableError) as exc:
                    transition = decide(record.state) if ends_run else None
                    if transition is None or not transition.state.terminal:
                        raise DependencyUnavailableError(str(exc)) from exc
                    _log.warning("run_ends_without_the_accountant", reason=str(exc))
                else:
                    record, revision = done.record, done.revision
                    self._remember_if_ended(key, record.state)
            transition = decide(record.state if record is not None else None)
            if transition is None:
                return
            if record is not None:
                trace_id, parent_span_id = record.trace_id, record.parent_span_id
            else:
                trace_id = (trace or TraceContext.new()).trace_id
                parent_span_id = trace.span_id if trace is not None else None
            new_record = RunRecord(
                state=transition.state,
                trace_id=trace_id,
                parent_span_id=parent_span_id,
                outbox=self._outbox(transition, trace_id, parent_span_id),
            )
            try:
                if record is None:
                    revision = await self._store.create(key, new_record)
                else:
                    revision = await self._store.update(key, new_record, revision)
            except (RunExistsError, RevisionConflictError):
                continue
            self._stored(record.state if record is not None else None, transition, new_record)
            try:
                done = await self._carry_out(key, new_record, revision)
            except RevisionConflictError:
                pass  # a newer transition was stored: it carried out (idempotently) what it found here
            except (BudgetUnavailableError, MemoryUnavailableError) as exc:
                raise DependencyUnavailableError(str(exc)) from exc
            else:
                self._remember_if_ended(key, done.record.state)
            return
        raise RetryableError(f"run {key} kept changing under {_MAX_CONFLICT_RETRIES} attempts")

    def _remember_if_ended(self, key: str, state: RunState) -> None:
        """Remember a run whose terminal record was carried out (only then: an ending not yet carried out
        must still be found and finished by whatever comes next)."""
        if not state.terminal:
            return
        self._ended[key] = None
        self._ended.move_to_end(key)
        while len(self._ended) > _ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def _stored(self, before: RunState | None, transition: Transition, record: RunRecord) -> None:
        for event in transition.events:
            self._metrics.events.labels(event.kind).inc()
            if isinstance(event, TaskGuardrail):
                self._record_guardrail(event, record)
        if transition.redrive:
            self._metrics.redrives.inc()
            _log.info("step_redriven", step=transition.state.step, redrive=transition.redrive)
        self._record_step_span(before, transition, record)

    async def _carry_out(self, key: str, record: RunRecord, revision: int) -> _Done:
        """Do the record's outbox in order, then mark it done (compare-and-set).

        A reservation that is denied (or refused as invalid) ends the run instead of the calls behind it:
        that ending is stored in place of the rest of the outbox and carried out in turn. Memory tool calls
        come last: their results are applied to the run, and that transition is stored in place of the
        outbox. Raises BudgetUnavailableError while the accountant does not answer, MemoryUnavailableError
        while a memory store or the retriever does not (a session not left yet then stays in the outbox, the
        rest is done), RevisionConflictError when a newer record was stored meanwhile.
        """
        state = record.state
        cost: float | None = None
        deferred: list[OutboxItem] = []
        memory_calls: list[OutboxItem] = []
        # A finished run's terminal event is priced and its budget closed in one request to the accountant.
        closing = any(item.kind == "close_budget" for item in record.outbox)
        closed = False
        # A session's leave goes out with the message before it (the run's end), not after its ack: the next
        # turn, sent the moment its client heard that end, then mostly finds the session handed over.
        sent: asyncio.Future[None] | None = None
        for index, item in enumerate(record.outbox):
            if item.kind == "memory":
                memory_calls.append(item)
            elif item.kind == "session_leave":
                try:
                    await self._leave(item)
                except MemoryUnavailableError as exc:
                    # The run's end goes out now; leaving the session waits for its store.
                    _log.warning("session_leave_deferred", reason=str(exc))
                    deferred.append(item)
                finally:
                    if sent is not None:
                        await sent
                        sent = None
            elif item.kind == "reserve":
                # A run's first reservation comes before its acceptance (see `_outbox`): what is not out yet
                # goes before the ending, unless the ending rejects the task.
                unsent = [later for later in record.outbox[index + 1 :] if _is_event(later)]
                try:
                    ending = await self._reserve_or_end(state, item, can_reject=bool(unsent))
                except BudgetUnavailableError:
                    if unsent:
                        await self._accept_while_away(key, record, revision, index)
                    raise
                if ending is not None:
                    carried = [] if ending.state.status is RunStatus.REJECTED else unsent
                    return await self._replace_outbox(key, record, revision, ending, carried)
            elif item.kind == "close_budget":
                if not closed:
                    await self._budget.close(state.tenant, state.task_id)
            else:
                if item.price is not None:
                    if cost is None:
                        priced = await self._price(state, item, close=closing)
                        cost, closed = priced.cost_usd, priced.closed
                    item = _priced(item, cost)
                publishing = self._publisher.publish(item)
                if _leaves_next(record.outbox, index):
                    sent = asyncio.ensure_future(publishing)
                    # Its message goes out first: one turn of the loop queues it, the next writes it (the
                    # client's flusher task), before the leave's own work.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                else:
                    await publishing
        if deferred:
            await self._store.update(key, record.model_copy(update={"outbox": deferred}), revision)
            raise MemoryUnavailableError(f"the session of {key} is not left yet: its memory store does not answer")
        if memory_calls:
            results = [await self._memory_result(record, item) for item in memory_calls]
            applied = domain.apply_tool_results(state, results, self._router)
            if applied is not None:
                return await self._replace_outbox(key, record, revision, applied)
        cleared = record.model_copy(update={"outbox": []})
        return _Done(cleared, await self._store.update(key, cleared, revision))

    async def _leave(self, item: OutboxItem) -> None:
        leave = SessionLeave.model_validate_json(item.payload)
        if self._sessions is None or self._sessions.spec(leave.store) is None:
            _log.warning("session_store_gone", store=leave.store)
            return
        await self._signal(leave.tenant, await self._sessions.leave(leave))

    async def _memory_result(self, record: RunRecord, item: OutboxItem) -> ToolCallUpdate:
        """Carry out a memory tool call: its outcome, as the tool result the run waits for."""
        call = MemoryCall.model_validate_json(item.payload)
        started = self._clock()
        if self._memory is None:
            outcome = MemoryOutcome("long-term memory is not available on this runner", ok=False)
        else:
            outcome = await self._memory.run(call, item.traceparent)
        self._spans.record(
            name=call.tool,
            kind="tool",
            trace=TraceContext.in_trace(record.trace_id),
            parent_span_id=step_span_id(call.tenant, call.task_id, call.step),
            start=started,
            end=self._clock(),
            task_id=call.task_id,
            tenant=call.tenant,
            status="ok" if outcome.ok else "error",
            attributes={
                SpanAttribute.TOOL: call.tool,
                SpanAttribute.INPUT: call.arguments,
                SpanAttribute.OUTPUT: outcome.content,
            },
        )
        return ToolCallUpdate(
            kind="result",
            call_id=call.call_id,
            tool_call_id=call.tool_call_id,
            task_id=call.task_id,
            tenant=call.tenant,
            tool=call.tool,
            ok=outcome.ok,
            content=outcome.content,
            citations=outcome.citations,
            usage_ids=outcome.usage_ids,
        )

    async def _price(self, state: RunState, item: OutboxItem, *, close: bool) -> TaskCost:
        """The run's cost on every usage record it caused. Each was published before the message that named
        it, so a record not yet in the ledger is on its way (an accountant restarting, a redelivery): the
        terminal event waits for it rather than going out short, for `USAGE_PATIENCE` after the run ended."""
        priced = await self._budget.task_cost(state.tenant, state.task_id, state.usage_ids, close=close)
        if not priced.missing_usage_ids:
            return priced
        ended = TASK_EVENT_ADAPTER.validate_json(item.payload).at if item.price == "event" else self._clock()
        if self._clock() - ended < USAGE_PATIENCE:
            raise BudgetUnavailableError(f"usage records not in the ledger yet: {priced.missing_usage_ids}")
        _log.warning("task_priced_without_usage", missing=priced.missing_usage_ids)
        return priced

    async def _reserve_or_end(self, state: RunState, item: OutboxItem, *, can_reject: bool) -> Transition | None:
        """Reserve what a call needs; None when allowed, else the transition that ends the run without it (or,
        for a rate limit, makes it wait). `can_reject`: the run's acceptance is not out yet."""
        try:
            verdict = await self._budget.reserve(BudgetReserveRequest.model_validate_json(item.payload))
        except BudgetTaskClosedError as exc:
            # The run ended (and closed its budget) since this record was read: read it again.
            raise RevisionConflictError(str(exc)) from exc
        except BudgetRefusedError as exc:
            return domain.fail_internal(state, f"the budget reservation was refused: {exc}")
        if verdict.allowed:
            return None
        if verdict.throttled:
            # A rate limit: the call waits (the run sleeps until the limit allows it), it is never refused.
            return domain.throttle(state, verdict, self._clock(), self._timing)
        if verdict.error is not None and verdict.error.code == BudgetErrorCode.RATE_LIMITED:
            if can_reject:
                return domain.reject_rate_limited(state, verdict)
            # Accepted already (the accountant was away at submission): the task waits instead.
            return domain.throttle(state, verdict, self._clock(), self._timing)
        return domain.deny_budget(state, verdict)

    async def _accept_while_away(self, key: str, record: RunRecord, revision: int, index: int) -> None:
        """The accountant does not answer a run's first reservation: its acceptance and deadline go out now
        (the client hears `accepted`, the run still ends at its deadline), its step waits for the reservation."""
        head = record.outbox[index + 1 :]
        cut = next((n for n, later in enumerate(head) if later.msg_id.startswith("llm:")), len(head))
        for later in head[:cut]:
            await self._publisher.publish(later)
        rest = [record.outbox[index], *head[cut:]]
        await self._store.update(key, record.model_copy(update={"outbox": rest}), revision)

    async def _replace_outbox(
        self, key: str, record: RunRecord, revision: int, ending: Transition, carried: list[OutboxItem] | None = None
    ) -> _Done:
        ended = RunRecord(
            state=ending.state,
            trace_id=record.trace_id,
            parent_span_id=record.parent_span_id,
            outbox=[*(carried or []), *self._outbox(ending, record.trace_id, record.parent_span_id)],
        )
        revision = await self._store.update(key, ended, revision)
        self._stored(record.state, ending, ended)
        return await self._carry_out(key, ended, revision)

    # --- the outbox --------------------------------------------------------------------------------

    def _outbox(self, transition: Transition, trace_id: str, parent_span_id: str | None) -> list[OutboxItem]:
        state = transition.state
        # The calls of a step are children of its agent_step span, so the worker's generation and the
        # executor's tool spans hang under the step that asked for them.
        step_trace = TraceContext(trace_id, step_span_id(state.tenant, state.task_id, state.step)).traceparent
        items = []
        if transition.llm_request is not None and not transition.redrive and _starts(transition):
            # Reserved before the run's acceptance goes out: a rate limit that rejects new tasks then
            # rejects the submission itself.
            request = transition.llm_request
            items.append(self._reservation(state, f"llm:{request.request_id}", "llm", request=request))
        items += [
            OutboxItem(
                subject=TASK_EVENT.format(tenant=state.tenant, task_id=state.task_id),
                msg_id=f"event:{run_key(state.tenant, state.task_id)}:{event.seq}",
                payload=event.model_dump_json(),
                traceparent=TraceContext.in_trace(trace_id).traceparent,
                price="event" if event.kind in {"completed", "failed"} else None,
            )
            for event in transition.events
        ]
        if (leave := transition.session_leave) is not None:
            # Right after the run's end, which its client waits for; the next task of the session waits for
            # this leave instead (see `_leaving_in`), so it still sees this one's turn.
            items.append(
                OutboxItem(
                    kind="session_leave",
                    msg_id=f"leave:{run_key(state.tenant, state.task_id)}",
                    payload=leave.model_dump_json(),
                )
            )
        if transition.wake is not None:
            items.append(self._wake_item(transition.wake))
        suffix = f":redrive-{transition.redrive}" if transition.redrive else ""
        if transition.llm_request is not None:
            request = transition.llm_request
            if not transition.redrive and not _starts(transition):
                items.append(self._reservation(state, f"llm:{request.request_id}", "llm", request=request))
            items.append(
                OutboxItem(
                    subject=LLM_REQUEST.format(model=request.model),
                    msg_id=f"llm:{request.request_id}{suffix}",
                    payload=request.model_dump_json(),
                    traceparent=step_trace,
                )
            )
        for call in transition.tool_calls:
            if not transition.redrive:
                items.append(self._reservation(state, f"tool:{call.call_id}", "tool", tool=call.tool))
            items.append(
                OutboxItem(
                    subject=TOOL_CALL.format(tenant=call.tenant),
                    msg_id=f"call:{call.call_id}{suffix}",
                    payload=call.model_dump_json(),
                    traceparent=step_trace,
                )
            )
        items.extend(
            OutboxItem(
                subject=TOOL_WITHDRAW.format(tenant=withdrawal.tenant),
                msg_id=f"withdraw:{withdrawal.call_id}",
                payload=withdrawal.model_dump_json(),
            )
            for withdrawal in transition.withdrawals
        )
        if transition.abort is not None and transition.abort_model is not None:
            items.append(
                OutboxItem(
                    kind="notice",
                    subject=LLM_ABORT.format(model=transition.abort_model),
                    msg_id=f"abort:{transition.abort.request_id}",
                    payload=transition.abort.model_dump_json(),
                )
            )
        if transition.close_budget:
            items.append(OutboxItem(kind="close_budget", msg_id=f"close:{state.task_id}"))
            if (span := self._task_span(transition, trace_id, parent_span_id)) is not None:
                items.append(span)
        items.extend(
            OutboxItem(
                kind="memory", msg_id=f"memory:{call.call_id}", payload=call.model_dump_json(), traceparent=step_trace
            )
            for call in transition.memory_calls
        )
        return items

    @staticmethod
    def _wake_item(timer: RunTimer) -> OutboxItem:
        due = timer.due_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return OutboxItem(
            subject=RUN_SCHEDULE.format(tenant=timer.tenant, task_id=timer.task_id),
            msg_id=f"wake:{timer.tenant}.{timer.task_id}:{due}",
            payload=timer.model_dump_json(),
            headers={
                Header.SCHEDULE.value: f"@at {due}",
                Header.SCHEDULE_TARGET.value: RUN_TIMER.format(tenant=timer.tenant),
            },
        )

    @staticmethod
    def _reservation(
        state: RunState,
        reservation_id: str,
        kind: Literal["llm", "tool"],
        *,
        request: LlmRequest | None = None,
        tool: str | None = None,
    ) -> OutboxItem:
        reservation = BudgetReserveRequest(
            reservation_id=reservation_id,
            kind=kind,
            tenant=state.tenant,
            task_id=state.task_id,
            agent=state.agent,
            model=request.model if request is not None else None,
            tool=tool,
            estimated_prompt_tokens=_estimated_prompt_tokens(request) if request is not None else 0,
            estimated_completion_tokens=request.max_tokens if request is not None else 0,
            task_budget_usd=state.budget_usd,
            submitted_by=state.submitted_by,
        )
        return OutboxItem(kind="reserve", msg_id=reservation_id, payload=reservation.model_dump_json())

    def _task_span(self, transition: Transition, trace_id: str, parent_span_id: str | None) -> OutboxItem | None:
        """The task's root span, published with the run's end (not through the best-effort emitter), so every
        ended task has its trace. Its cost is filled in when the terminal event is priced."""
        state = transition.state
        if state.started_at is None:
            return None
        final = transition.events[-1] if transition.events else None
        attributes: dict[str, Any] = {
            SpanAttribute.AGENT: state.agent,
            "agentbus.status": state.status.value,
            "agentbus.steps": state.step,
            SpanAttribute.INPUT_TOKENS: state.usage.prompt_tokens,
            SpanAttribute.OUTPUT_TOKENS: state.usage.completion_tokens,
        }
        if state.submitted_by:
            attributes[SpanAttribute.USER] = state.submitted_by
        if isinstance(final, TaskCompleted):
            attributes[SpanAttribute.OUTPUT] = final.output
        user_input = next((m.content for m in state.messages if m.role == "user"), None)
        if user_input is not None:
            attributes[SpanAttribute.INPUT] = user_input
        span_id = task_span_id(state.tenant, state.task_id)
        span = SpanRecorded(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent_span_id,
            name=state.agent or "task",
            kind="task",
            service=Service.AGENT_RUNNER.value,
            task_id=state.task_id,
            tenant=state.tenant,
            start=state.started_at,
            end=final.at if final is not None else self._clock(),
            status="ok" if state.status is RunStatus.COMPLETED else "error",
            status_message=None if state.status is RunStatus.COMPLETED else state.status.value,
            attributes=attributes,
        )
        return OutboxItem(
            subject=SPAN.format(service=Service.AGENT_RUNNER.value),
            msg_id=span_msg_id(span_id),
            payload=span.model_dump_json(fallback=str),
            traceparent=TraceContext(trace_id, span_id).traceparent,
            price="span",
        )

    def _record_guardrail(self, event: TaskGuardrail, record: RunRecord) -> None:
        """A guardrail's findings as metrics, a log line and a span: policies, checks and kinds, never the text."""
        for finding in event.findings:
            self._metrics.guardrail_findings.labels(finding.policy, finding.detector, finding.action, event.stage).inc()
        described = sorted({f"{f.policy}/{f.check}:{f.kind}" for f in event.findings})
        _log.info("guardrail_findings", stage=event.stage, action=event.action, step=event.step, findings=described)
        self._spans.record(
            name=f"guardrail {event.stage}",
            kind="agent_step",
            trace=TraceContext(record.trace_id, _run_span_id(event.tenant, event.task_id, f"guardrail:{event.seq}")),
            parent_span_id=task_span_id(event.tenant, event.task_id),
            start=event.at,
            end=event.at,
            task_id=event.task_id,
            tenant=event.tenant,
            status="error" if event.action == "block" else "ok",
            attributes={
                "agentbus.step": event.step,
                SpanAttribute.GUARDRAIL_STAGE: event.stage,
                SpanAttribute.GUARDRAIL_ACTION: event.action,
                SpanAttribute.GUARDRAIL_POLICIES: sorted({f.policy for f in event.findings}),
                SpanAttribute.GUARDRAIL_FINDINGS: described,
            },
        )

    def _record_step_span(self, before: RunState | None, transition: Transition, record: RunRecord) -> None:
        """The agent step that just finished, through the emitter (off the hot path, best effort)."""
        state = transition.state
        if before is not None and before.summarizing is not None and state.summarizing is None:
            # The session's summary, step 0: the generation that made it hangs under this span.
            self._spans.record(
                name="summarize session",
                kind="agent_step",
                trace=TraceContext(record.trace_id, step_span_id(state.tenant, state.task_id, 0)),
                parent_span_id=task_span_id(state.tenant, state.task_id),
                start=before.step_started_at or self._clock(),
                end=self._clock(),
                task_id=state.task_id,
                tenant=state.tenant,
                attributes={
                    "agentbus.step": 0,
                    SpanAttribute.AGENT: state.agent,
                    "agentbus.summarized_turns": len(before.summarizing.folded),
                },
            )
        step_ended = before is not None and (state.terminal or state.step > before.step)
        if not (step_ended and before is not None and before.step >= 1 and before.step_started_at is not None):
            return
        self._spans.record(
            name=f"step {before.step}",
            kind="agent_step",
            trace=TraceContext(record.trace_id, step_span_id(state.tenant, state.task_id, before.step)),
            parent_span_id=task_span_id(state.tenant, state.task_id),
            start=before.step_started_at,
            end=self._clock(),
            task_id=state.task_id,
            tenant=state.tenant,
            attributes={"agentbus.step": before.step, SpanAttribute.AGENT: state.agent},
        )


def _starts(transition: Transition) -> bool:
    return any(event.kind == "accepted" for event in transition.events)


def _of_session(state: RunState, key: SessionKey) -> bool:
    return state.session is not None and state.session.key(state.tenant) == key


def _done_with(record: RunRecord, key: SessionKey) -> bool:
    """Whether a run that session `key` names as running holds it no more: it ended, or is not of that session."""
    return record.state.terminal or not _of_session(record.state, key)


def _pending_leave(record: RunRecord, key: SessionKey) -> OutboxItem | None:
    """The leave of session `key` that an ended run has still to carry out."""
    if not (record.state.terminal and _of_session(record.state, key)):
        return None
    return next((item for item in record.outbox if item.kind == "session_leave"), None)


def _leaves_next(outbox: list[OutboxItem], index: int) -> bool:
    return index + 1 < len(outbox) and outbox[index + 1].kind == "session_leave"


def _is_event(item: OutboxItem) -> bool:
    return item.msg_id.startswith("event:")


def _priced(item: OutboxItem, cost_usd: float) -> OutboxItem:
    """A terminal event (or the task span) with the run's priced cost."""
    if item.price == "event":
        event = domain.with_cost(TASK_EVENT_ADAPTER.validate_json(item.payload), cost_usd)
        return item.model_copy(update={"payload": event.model_dump_json()})
    span = SpanRecorded.model_validate_json(item.payload)
    priced = span.model_copy(update={"attributes": {**span.attributes, SpanAttribute.COST_USD: cost_usd}})
    return item.model_copy(update={"payload": priced.model_dump_json(fallback=str)})


def _run_span_id(tenant: str, task_id: str, part: str) -> str:
    """A span id derived from the run and what the span is of: a redelivered transition names the same span."""
    return hashlib.sha256(f"{run_key(tenant, task_id)}:{part}".encode()).hexdigest()[:16]


def task_span_id(tenant: str, task_id: str) -> str:
    """The id of a task's root span: derived from the run, so every transition names the same parent."""
    return _run_span_id(tenant, task_id, "task")


def step_span_id(tenant: str, task_id: str, step: int) -> str:
    """The id of a step's agent_step span: derived, so redelivered transitions point at the same span."""
    return _run_span_id(tenant, task_id, f"step:{step}")


def _estimated_prompt_tokens(request: LlmRequest) -> int:
    # About four characters per token for English text: an estimate to reserve against, settled later.
    characters = sum(len(m.content) for m in request.messages) + sum(len(str(t.parameters)) for t in request.tools)
    return characters // 4 + 1
