"""The runner's use cases: apply one input to a run, store the result, then publish its messages.

Each transition is stored together with its outgoing messages (an outbox in the run record) before any
is published, and every later transition first re-publishes a leftover outbox. Publishes carry
deterministic `Nats-Msg-Id`s, so a repeat is dropped by JetStream. A runner killed at any point
therefore neither loses a message nor sends one twice, and the event `seq` stays gap-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from agentbus.agent_runner import domain
from agentbus.agent_runner.domain import ErrorCode, RunState, Toolbox, Transition
from agentbus.agent_runner.ports import (
    OutboxItem,
    Publisher,
    RevisionConflictError,
    RunExistsError,
    RunRecord,
    RunStore,
)
from agentbus.agent_runner.specs import AgentSpec
from agentbus.contracts.llm import LlmResult
from agentbus.contracts.registry import LLM_REQUEST, TASK_EVENT
from agentbus.contracts.tasks import TaskCancelRequested, TaskSubmitted
from agentbus.runtime.errors import RetryableError
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.tracing import TraceContext
from prometheus_client import CollectorRegistry, Counter

_log = get_logger(__name__)

_MAX_CONFLICT_RETRIES = 20

Decide = Callable[[RunState | None], Transition | None]


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "agentbus_task_events_total", "Task events published, by kind.", ["kind"], registry=registry
        )


class RunnerService:
    def __init__(
        self,
        store: RunStore,
        publisher: Publisher,
        agents: dict[str, AgentSpec],
        toolbox: Toolbox,
        metrics: RunnerMetrics,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._agents = agents
        self._toolbox = toolbox
        self._metrics = metrics

    async def submit(self, submission: TaskSubmitted, trace: TraceContext | None) -> None:
        """Start a run; a task id seen before (running, ended or rejected) starts nothing."""
        spec = self._agents.get(submission.agent)

        def decide(state: RunState | None) -> Transition | None:
            if state is not None:
                return None
            if spec is None:
                return domain.reject(
                    submission.task_id,
                    submission.tenant,
                    ErrorCode.UNKNOWN_AGENT,
                    f"no agent named {submission.agent!r}; known agents: {sorted(self._agents)}",
                )
            return domain.start(submission, spec, self._toolbox)

        await self._transact(submission.task_id, submission.tenant, decide, trace)

    async def reject(
        self, task_id: str, tenant: str, code: ErrorCode, message: str, trace: TraceContext | None
    ) -> None:
        """Refuse a submission that failed validation: a `rejected` event, unless the id is taken."""

        def decide(state: RunState | None) -> Transition | None:
            return None if state is not None else domain.reject(task_id, tenant, code, message)

        await self._transact(task_id, tenant, decide, trace)

    async def cancel(self, request: TaskCancelRequested, trace: TraceContext | None) -> None:
        """Cancel a run of the same tenant; a cancellation that arrives first keeps the task from starting."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None:
                return domain.cancel_before_start(request)
            if state.tenant != request.tenant:
                _log.warning("cancel_refused_other_tenant", owner=state.tenant)
                return None
            return domain.cancel(state, request)

        await self._transact(request.task_id, request.tenant, decide, trace)

    async def advance(self, result: LlmResult, trace: TraceContext | None) -> None:
        """Continue a run with a generated step; stale and repeated results change nothing."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None or state.tenant != result.tenant:
                _log.warning("llm_result_for_unknown_run", request_id=result.request_id)
                return None
            return domain.apply_llm_result(state, result, self._toolbox)

        await self._transact(result.task_id, result.tenant, decide, trace)

    async def _transact(self, task_id: str, tenant: str, decide: Decide, trace: TraceContext | None) -> None:
        bind_message_context(task_id=task_id, tenant=tenant)
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = await self._store.get(task_id)
            record, revision = current if current is not None else (None, 0)
            if record is not None and record.outbox:
                await self._publish(record.outbox)
            transition = decide(record.state if record is not None else None)
            if transition is None:
                if record is not None and record.outbox:
                    await self._mark_sent(task_id, record, revision)
                return
            trace_id = record.trace_id if record is not None else (trace or TraceContext.new()).trace_id
            new_record = RunRecord(state=transition.state, trace_id=trace_id, outbox=self._outbox(transition, trace_id))
            try:
                if record is None:
                    revision = await self._store.create(task_id, new_record)
                else:
                    revision = await self._store.update(task_id, new_record, revision)
            except (RunExistsError, RevisionConflictError):
                continue
            await self._publish(new_record.outbox)
            for event in transition.events:
                self._metrics.events.labels(event.kind).inc()
            await self._mark_sent(task_id, new_record, revision)
            return
        raise RetryableError(f"run {task_id} kept changing under {_MAX_CONFLICT_RETRIES} attempts")

    def _outbox(self, transition: Transition, trace_id: str) -> list[OutboxItem]:
        state = transition.state
        items = [
            OutboxItem(
                subject=TASK_EVENT.format(tenant=state.tenant, task_id=state.task_id),
                msg_id=f"event:{state.task_id}:{event.seq}",
                payload=event.model_dump_json(),
                traceparent=TraceContext.in_trace(trace_id).traceparent,
            )
            for event in transition.events
        ]
        if transition.llm_request is not None:
            request = transition.llm_request
            items.append(
                OutboxItem(
                    subject=LLM_REQUEST.format(model=request.model),
                    msg_id=f"llm:{request.request_id}",
                    payload=request.model_dump_json(),
                    traceparent=TraceContext.in_trace(trace_id).traceparent,
                )
            )
        return items

    async def _publish(self, outbox: list[OutboxItem]) -> None:
        # In order: a task's events must enter the stream in seq order.
        for item in outbox:
            await self._publisher.publish(item)

    async def _mark_sent(self, task_id: str, record: RunRecord, revision: int) -> None:
        # On a conflict a newer transition was stored; it re-published (deduplicated) what it found pending.
        with contextlib.suppress(RevisionConflictError):
            await self._store.update(task_id, record.model_copy(update={"outbox": []}), revision)
