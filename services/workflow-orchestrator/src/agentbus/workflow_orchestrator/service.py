"""The orchestrator's use cases: apply one input to a run, store the result, then carry out its outbox.

The same discipline as the agent-runner's. Each transition is stored together with everything it must do (an
outbox in the run record) before any of it is done, and every later transition first carries out a leftover
outbox. Publishes carry deterministic `Nats-Msg-Id`s and step tasks deterministic task ids, so a repeat is
dropped by JetStream or by the runner; the step index and the concurrency slots are written idempotently. An
orchestrator killed at any point therefore neither loses a message nor sends one twice, every step's task is
submitted once, and the event `seq` stays gap-free.

A dependency that is down (NATS, its KV bucket) is waited for: its errors reach the consumer runtime, which
redelivers the input with backoff, never dead-letters it for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from agentbus.contracts.common import ErrorInfo, utc_now
from agentbus.contracts.registry import (
    SPAN,
    TASK_CANCEL,
    TASK_SUBMIT,
    WORKFLOW_ADMISSION,
    WORKFLOW_EVENT,
    WORKFLOW_SCHEDULE,
    WORKFLOW_TIMER,
    Header,
    Service,
)
from agentbus.contracts.spans import SpanRecorded
from agentbus.contracts.tasks import TaskEvent
from agentbus.contracts.workflows import (
    WORKFLOW_TERMINAL_EVENT_KINDS,
    WorkflowAdmission,
    WorkflowCancelRequested,
    WorkflowReplayReply,
    WorkflowReplayRequest,
    WorkflowsListReply,
    WorkflowsListRequest,
    WorkflowSubmitted,
    WorkflowTimer,
)
from agentbus.runtime.errors import RetryableError
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.spans import SpanAttribute, span_msg_id
from agentbus.runtime.tracing import TraceContext
from agentbus.workflow_orchestrator import admission, domain
from agentbus.workflow_orchestrator.admission import Outcome, SlotsState, SlotsTransition
from agentbus.workflow_orchestrator.domain import (
    METADATA_STEP,
    ErrorCode,
    RunState,
    RunStatus,
    StepPhase,
    Transition,
)
from agentbus.workflow_orchestrator.ports import (
    EventLog,
    OutboxItem,
    Publisher,
    RecordExistsError,
    RecordStore,
    RevisionConflictError,
    RunRecord,
    SlotsRecord,
    StepIndex,
)
from agentbus.workflow_orchestrator.specs import WorkflowSpec
from prometheus_client import CollectorRegistry, Counter

_log = get_logger(__name__)

_MAX_CONFLICT_RETRIES = 20

Decide = Callable[[RunState | None], Transition | None]


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "agentbus_workflow_events_total", "Workflow run events published, by kind.", ["kind"], registry=registry
        )
        self.step_tasks = Counter(
            "agentbus_workflow_step_tasks_total", "Step tasks submitted, by workflow.", ["workflow"], registry=registry
        )


def run_key(tenant: str, run_id: str) -> str:
    """The key of a run's record: a run id is its tenant's, so two tenants never share a run."""
    return f"run.{tenant}.{run_id}"


def slots_key(tenant: str, workflow: str) -> str:
    """The key of a workflow's concurrency slots in one tenant."""
    return f"slots.{tenant}.{workflow}"


def run_span_id(tenant: str, run_id: str) -> str:
    """The id of a run's root span: derived from the run, so every transition names the same parent."""
    return hashlib.sha256(f"{run_key(tenant, run_id)}:workflow".encode()).hexdigest()[:16]


def step_span_id(tenant: str, run_id: str, step: str) -> str:
    """The id of a step's span, the parent of each of its tasks' traces."""
    return hashlib.sha256(f"{run_key(tenant, run_id)}:step:{step}".encode()).hexdigest()[:16]


class OrchestratorService:
    def __init__(
        self,
        runs: RecordStore[RunRecord],
        slots: RecordStore[SlotsRecord],
        index: StepIndex,
        publisher: Publisher,
        workflows: dict[str, WorkflowSpec],
        metrics: OrchestratorMetrics,
        *,
        events: EventLog | None = None,
        clock: Callable[[], datetime] = utc_now,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self._runs = runs
        self._slots = slots
        self._index = index
        self._publisher = publisher
        self._workflows = workflows
        self._metrics = metrics
        self._events = events
        self._clock = clock
        self._nonce = nonce

    # --- inputs ------------------------------------------------------------------------------------

    async def submit(self, submission: WorkflowSubmitted, trace: TraceContext | None) -> None:
        """Start a run; a run id seen before in the tenant (running, ended or rejected) starts nothing."""
        spec = self._workflows.get(submission.workflow)
        nonce = self._nonce()

        def decide(state: RunState | None) -> Transition | None:
            if state is not None:
                return None
            if spec is None:
                return domain.reject(
                    submission.run_id,
                    submission.tenant,
                    ErrorCode.UNKNOWN_WORKFLOW,
                    f"no workflow named {submission.workflow!r}; known workflows: {sorted(self._workflows)}",
                )
            return domain.start(submission, spec, nonce, now=self._clock())

        await self._transact(submission.tenant, submission.run_id, decide, trace)

    async def reject(self, run_id: str, tenant: str, code: ErrorCode, message: str, trace: TraceContext | None) -> None:
        """Refuse a submission that failed validation: a `rejected` event, unless the id is taken."""

        def decide(state: RunState | None) -> Transition | None:
            return None if state is not None else domain.reject(run_id, tenant, code, message)

        await self._transact(tenant, run_id, decide, trace)

    async def cancel(self, request: WorkflowCancelRequested, by: str, trace: TraceContext | None) -> None:
        """Cancel a run and its running steps; a cancellation that arrives first keeps the run from starting."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return domain.cancel_before_start(request, by)
            return domain.cancel(state, request, by)

        await self._transact(request.tenant, request.run_id, decide, trace)

    async def task_event(self, tenant: str, event: TaskEvent) -> None:
        """Advance the run a step's task belongs to; events of other tasks change nothing."""
        run_id = await self._index.run_of(tenant, event.task_id)
        if run_id is None:
            return
        now = self._clock()

        def decide(state: RunState | None) -> Transition | None:
            return domain.apply_task_event(state, event, now) if state is not None else None

        await self._transact(tenant, run_id, decide, None)

    async def wake(self, timer: WorkflowTimer) -> None:
        """A run's deadline came: the run ends failed if it still goes."""
        now = self._clock()

        def decide(state: RunState | None) -> Transition | None:
            return domain.wake(state, timer, now) if state is not None else None

        await self._transact(timer.tenant, timer.run_id, decide, None)

    async def admission(self, message: WorkflowAdmission) -> None:
        """A queued run got a slot, or a running one was replaced by a newer run."""
        now = self._clock()

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return None
            if message.decision == "admitted":
                return domain.admitted(state, now)
            return domain.replaced(state, message.by_run_id)

        await self._transact(message.tenant, message.run_id, decide, None)

    async def replay(self, tenant: str, run_id: str, request: WorkflowReplayRequest) -> WorkflowReplayReply:
        """A run's stored events from `request.from_seq`, for identities that may not read the stream."""
        if self._events is None:
            error = ErrorInfo(code="unavailable", message="this orchestrator does not serve replays")
            return WorkflowReplayReply(run_id=run_id, tenant=tenant, error=error)
        events, more = await self._events.events(tenant, run_id, request.from_seq, request.limit)
        return WorkflowReplayReply(
            run_id=run_id,
            tenant=tenant,
            events=events,
            complete=bool(events) and events[-1].kind in WORKFLOW_TERMINAL_EVENT_KINDS,
            more=more,
            next_seq=events[-1].seq + 1 if events else request.from_seq,
        )

    def workflows_list(self, request: WorkflowsListRequest) -> WorkflowsListReply:
        """The workflows this orchestrator runs (or the one named), as loaded at start-up."""
        names = sorted(self._workflows) if request.name is None else [request.name]
        if request.name is not None and request.name not in self._workflows:
            error = ErrorInfo(code=ErrorCode.UNKNOWN_WORKFLOW, message=f"no workflow named {request.name!r}")
            return WorkflowsListReply(error=error)
        return WorkflowsListReply(workflows=[self._workflows[name].info() for name in names])

    # --- the run's transaction ---------------------------------------------------------------------

    async def _transact(self, tenant: str, run_id: str, decide: Decide, trace: TraceContext | None) -> None:
        """Apply `decide` to the run, then carry out what it stored."""
        bind_message_context(run_id=run_id, tenant=tenant)
        key = run_key(tenant, run_id)
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = await self._runs.get(key)
            record, revision = current if current is not None else (None, 0)
            if record is not None and record.outbox:
                try:
                    record, revision = await self._carry_out(key, record, revision)
                except RevisionConflictError:
                    continue
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
                    revision = await self._runs.create(key, new_record)
                else:
                    revision = await self._runs.update(key, new_record, revision)
            except (RecordExistsError, RevisionConflictError):
                continue
            self._stored(transition)
            # A newer transition stored meanwhile carried out (idempotently) what it found here.
            with contextlib.suppress(RevisionConflictError):
                await self._carry_out(key, new_record, revision)
            return
        raise RetryableError(f"run {key} kept changing under {_MAX_CONFLICT_RETRIES} attempts")

    def _stored(self, transition: Transition) -> None:
        for event in transition.events:
            self._metrics.events.labels(event.kind).inc()
        if transition.tasks and transition.state.spec is not None:
            self._metrics.step_tasks.labels(transition.state.spec.name).inc(len(transition.tasks))

    async def _carry_out(self, key: str, record: RunRecord, revision: int) -> tuple[RunRecord, int]:
        """Do the record's outbox in order, then mark it done (compare-and-set). The answer of an `acquire`
        is the run's next transition: it is stored in place of the rest of the outbox and carried out in turn.
        Raises RevisionConflictError when a newer record was stored meanwhile."""
        state = record.state
        for position, item in enumerate(record.outbox):
            if item.kind == "index":
                await self._index.put(state.tenant, item.msg_id, state.run_id)
            elif item.kind == "acquire":
                outcome = await self._acquire(state)
                answer = {"admitted": domain.admitted, "queued": domain.queued}.get(outcome)
                transition = answer(state, self._clock()) if answer is not None else domain.refused(state)
                if transition is not None:
                    return await self._replace_outbox(key, record, revision, transition, position + 1)
            elif item.kind == "release":
                await self._release(state)
            else:
                await self._publisher.publish(item)
        cleared = record.model_copy(update={"outbox": []})
        return cleared, await self._runs.update(key, cleared, revision)

    async def _replace_outbox(
        self, key: str, record: RunRecord, revision: int, transition: Transition, rest: int
    ) -> tuple[RunRecord, int]:
        following = RunRecord(
            state=transition.state,
            trace_id=record.trace_id,
            parent_span_id=record.parent_span_id,
            outbox=[*self._outbox(transition, record.trace_id, record.parent_span_id), *record.outbox[rest:]],
        )
        revision = await self._runs.update(key, following, revision)
        self._stored(transition)
        return await self._carry_out(key, following, revision)

    # --- the concurrency slots ---------------------------------------------------------------------

    async def _acquire(self, state: RunState) -> Outcome:
        spec = state.spec
        assert spec is not None
        assert spec.concurrency is not None
        limit, policy = spec.concurrency.max_concurrent, spec.concurrency.policy

        def decide(slots: SlotsState | None) -> SlotsTransition:
            return admission.acquire(slots, state.tenant, spec.name, state.run_id, limit, policy)

        outcome = (await self._transact_slots(state.tenant, spec.name, decide)).outcome
        assert outcome is not None
        return outcome

    async def _release(self, state: RunState) -> None:
        spec = state.spec
        assert spec is not None
        assert spec.concurrency is not None
        limit = spec.concurrency.max_concurrent
        await self._transact_slots(state.tenant, spec.name, lambda slots: admission.release(slots, state.run_id, limit))

    async def _transact_slots(
        self, tenant: str, workflow: str, decide: Callable[[SlotsState | None], SlotsTransition | None]
    ) -> SlotsTransition:
        key = slots_key(tenant, workflow)
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = await self._slots.get(key)
            record, revision = current if current is not None else (None, 0)
            if record is not None and record.outbox:
                try:
                    record, revision = await self._carry_out_slots(key, record, revision)
                except RevisionConflictError:
                    continue
            transition = decide(record.state if record is not None else None)
            if transition is None or not transition.changed:
                return transition or SlotsTransition(SlotsState(tenant=tenant, workflow=workflow))
            new_record = SlotsRecord(state=transition.state, outbox=self._admissions(transition))
            try:
                if record is None:
                    revision = await self._slots.create(key, new_record)
                else:
                    revision = await self._slots.update(key, new_record, revision)
            except (RecordExistsError, RevisionConflictError):
                continue
            with contextlib.suppress(RevisionConflictError):
                await self._carry_out_slots(key, new_record, revision)
            return transition
        raise RetryableError(f"slots {key} kept changing under {_MAX_CONFLICT_RETRIES} attempts")

    async def _carry_out_slots(self, key: str, record: SlotsRecord, revision: int) -> tuple[SlotsRecord, int]:
        for item in record.outbox:
            await self._publisher.publish(item)
        cleared = record.model_copy(update={"outbox": []})
        return cleared, await self._slots.update(key, cleared, revision)

    @staticmethod
    def _admissions(transition: SlotsTransition) -> list[OutboxItem]:
        tenant = transition.state.tenant
        messages = [WorkflowAdmission(run_id=run_id, tenant=tenant, decision="admitted") for run_id in transition.admit]
        messages += [
            WorkflowAdmission(run_id=run_id, tenant=tenant, decision="replaced", by_run_id=by)
            for run_id, by in transition.replace
        ]
        return [
            OutboxItem(
                subject=WORKFLOW_ADMISSION.format(tenant=tenant),
                msg_id=f"{message.decision}:{tenant}.{message.run_id}",
                payload=message.model_dump_json(),
            )
            for message in messages
        ]

    # --- the outbox --------------------------------------------------------------------------------

    def _outbox(self, transition: Transition, trace_id: str, parent_span_id: str | None) -> list[OutboxItem]:
        state = transition.state
        tenant, run_id = state.tenant, state.run_id
        items: list[OutboxItem] = []
        if transition.acquire:
            items.append(OutboxItem(kind="acquire"))
        for task in transition.tasks:
            assert task.submitted_by is not None, "a run's steps are submitted as its submitter"
            step = str(task.metadata[METADATA_STEP])
            items.append(OutboxItem(kind="index", msg_id=task.task_id))
            items.append(
                OutboxItem(
                    subject=TASK_SUBMIT.format(tenant=tenant, submitter=task.submitted_by),
                    msg_id=task.task_id,
                    payload=task.model_dump_json(),
                    # The task's own trace hangs under its step's span, in the run's trace.
                    traceparent=TraceContext(trace_id, step_span_id(tenant, run_id, step)).traceparent,
                )
            )
        if transition.release:
            # Before the terminal event: whoever hears the run ended finds its slot free.
            items.append(OutboxItem(kind="release"))
        items.extend(
            OutboxItem(
                subject=WORKFLOW_EVENT.format(tenant=tenant, run_id=run_id),
                msg_id=f"wfevent:{tenant}.{run_id}:{event.seq}",
                payload=event.model_dump_json(),
                traceparent=TraceContext(trace_id, run_span_id(tenant, run_id)).traceparent,
            )
            for event in transition.events
        )
        if transition.wake is not None:
            items.append(self._wake_item(transition.wake))
        items.extend(
            OutboxItem(
                subject=TASK_CANCEL.format(tenant=tenant, submitter=cancel.by),
                msg_id=f"wfcancel:{tenant}.{cancel.request.task_id}",
                payload=cancel.request.model_dump_json(),
            )
            for cancel in transition.cancels
        )
        items.extend(self._step_span(state, name, trace_id) for name in transition.ended_steps)
        if transition.ended:
            items.append(self._run_span(transition, trace_id, parent_span_id))
        return items

    @staticmethod
    def _wake_item(timer: WorkflowTimer) -> OutboxItem:
        due = timer.due_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return OutboxItem(
            subject=WORKFLOW_SCHEDULE.format(tenant=timer.tenant, run_id=timer.run_id),
            msg_id=f"wfwake:{timer.tenant}.{timer.run_id}:{due}",
            payload=timer.model_dump_json(),
            headers={
                Header.SCHEDULE.value: f"@at {due}",
                Header.SCHEDULE_TARGET.value: WORKFLOW_TIMER.format(tenant=timer.tenant),
            },
        )

    def _span_item(self, span: SpanRecorded) -> OutboxItem:
        return OutboxItem(
            subject=SPAN.format(service=Service.WORKFLOW_ORCHESTRATOR.value),
            msg_id=span_msg_id(span.span_id),
            payload=span.model_dump_json(fallback=str),
            traceparent=TraceContext(span.trace_id, span.span_id).traceparent,
        )

    def _step_span(self, state: RunState, name: str, trace_id: str) -> OutboxItem:
        """A step's span, from its first attempt's start to its end; its tasks' traces hang beneath it."""
        step = state.step(name)
        assert state.spec is not None
        now = self._clock()
        attributes: dict[str, Any] = {
            SpanAttribute.AGENT: state.spec.step(name).agent,
            "agentbus.workflow": state.spec.name,
            "agentbus.workflow.step": name,
            "agentbus.workflow.attempts": step.attempt,
            "agentbus.workflow.task_ids": step.task_ids,
            SpanAttribute.COST_USD: step.cost_usd,
        }
        if step.phase is StepPhase.SUCCEEDED:
            attributes[SpanAttribute.OUTPUT] = json.dumps(step.outputs, ensure_ascii=False)
        span = SpanRecorded(
            trace_id=trace_id,
            span_id=step_span_id(state.tenant, state.run_id, name),
            parent_span_id=run_span_id(state.tenant, state.run_id),
            name=f"step {name}",
            kind="agent_step",
            service=Service.WORKFLOW_ORCHESTRATOR.value,
            task_id=state.run_id,
            tenant=state.tenant,
            start=step.started_at or now,
            end=step.completed_at or now,
            status="ok" if step.phase is StepPhase.SUCCEEDED else "error",
            status_message=None if step.phase is StepPhase.SUCCEEDED else step.phase.value,
            attributes=attributes,
        )
        return self._span_item(span)

    def _run_span(self, transition: Transition, trace_id: str, parent_span_id: str | None) -> OutboxItem:
        """The run's root span: one trace per run, with each step's span (and its tasks' traces) beneath it."""
        state = transition.state
        assert state.spec is not None
        final = transition.events[-1] if transition.events else None
        attributes: dict[str, Any] = {
            SpanAttribute.AGENT: f"workflow {state.spec.name}",
            "agentbus.workflow": state.spec.name,
            "agentbus.status": state.status.value,
            SpanAttribute.INPUT: json.dumps(state.input, ensure_ascii=False),
            SpanAttribute.COST_USD: state.cost_usd,
            SpanAttribute.INPUT_TOKENS: state.usage.prompt_tokens,
            SpanAttribute.OUTPUT_TOKENS: state.usage.completion_tokens,
        }
        if state.submitted_by:
            attributes[SpanAttribute.USER] = state.submitted_by
        completed = state.status is RunStatus.COMPLETED
        if completed:
            attributes[SpanAttribute.OUTPUT] = json.dumps(state.outputs, ensure_ascii=False)
        span = SpanRecorded(
            trace_id=trace_id,
            span_id=run_span_id(state.tenant, state.run_id),
            parent_span_id=parent_span_id,
            name=f"workflow {state.spec.name}",
            kind="task",
            service=Service.WORKFLOW_ORCHESTRATOR.value,
            task_id=state.run_id,
            tenant=state.tenant,
            start=state.accepted_at or self._clock(),
            end=final.at if final is not None else self._clock(),
            status="ok" if completed else "error",
            status_message=None if completed else state.status.value,
            attributes=attributes,
        )
        return self._span_item(span)
