"""The runner's use cases: apply one input to a run, store the result, then publish its messages.

Each transition is stored together with its outgoing messages (an outbox in the run record) before any
is published, and every later transition first re-publishes a leftover outbox. Publishes carry
deterministic `Nats-Msg-Id`s, so a repeat is dropped by JetStream. A runner killed at any point
therefore neither loses a message nor sends one twice, and the event `seq` stays gap-free.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any, Literal

from agentbus.agent_runner import domain
from agentbus.agent_runner.domain import DIRECT, ErrorCode, Router, RunState, RunStatus, Toolbox, Transition
from agentbus.agent_runner.ports import (
    BudgetGate,
    BudgetUnavailableError,
    OutboxItem,
    Publisher,
    RevisionConflictError,
    RunExistsError,
    RunRecord,
    RunStore,
)
from agentbus.agent_runner.specs import AgentSpec
from agentbus.contracts.budget import BudgetReserveRequest
from agentbus.contracts.common import utc_now
from agentbus.contracts.llm import LlmRequest, LlmResult
from agentbus.contracts.registry import LLM_ABORT, LLM_REQUEST, TASK_EVENT, TOOL_CALL, Service
from agentbus.contracts.tasks import TaskCancelRequested, TaskCompleted, TaskFailed, TaskSubmitted
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate
from agentbus.runtime.errors import RetryableError
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.spans import NullSpanEmitter, SpanAttribute, SpanEmitter
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
        budget: BudgetGate,
        router: Router = DIRECT,
        spans: SpanEmitter | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._agents = agents
        self._toolbox = toolbox
        self._metrics = metrics
        self._budget = budget
        self._router = router
        self._spans = spans or NullSpanEmitter(Service.AGENT_RUNNER)

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
            return domain.start(submission, spec, self._toolbox, self._router)

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
            return domain.apply_llm_result(state, result, self._toolbox, self._router)

        await self._transact(result.task_id, result.tenant, decide, trace)

    async def apply_tool_update(self, update: ToolCallUpdate, trace: TraceContext | None) -> None:
        """Record approval progress or a tool result; the last result of a step asks for the next step."""

        def decide(state: RunState | None) -> Transition | None:
            if state is None or state.tenant != update.tenant:
                _log.warning("tool_update_for_unknown_run", call_id=update.call_id)
                return None
            return domain.apply_tool_update(state, update, self._router)

        await self._transact(update.task_id, update.tenant, decide, trace)

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
            transition = await self._settle_budget(transition)
            if record is not None:
                trace_id, parent_span_id = record.trace_id, record.parent_span_id
            else:
                trace_id = (trace or TraceContext.new()).trace_id
                parent_span_id = trace.span_id if trace is not None else None
            new_record = RunRecord(
                state=transition.state,
                trace_id=trace_id,
                parent_span_id=parent_span_id,
                outbox=self._outbox(transition, trace_id),
            )
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
            self._record_spans(record.state if record is not None else None, transition, new_record)
            if transition.state.terminal and transition.state.step > 0:
                await self._release_budget(transition.state)
            return
        raise RetryableError(f"run {task_id} kept changing under {_MAX_CONFLICT_RETRIES} attempts")

    async def _settle_budget(self, transition: Transition) -> Transition:
        """Reserve every call the transition would make (a denial stops the run), and price a run that ends.

        Reservations are keyed by the call's own id, so deciding again after a conflict or a redelivery
        gets the same verdict rather than reserving twice.
        """
        state = transition.state
        try:
            for reservation in self._reservations(transition):
                verdict = await self._budget.reserve(reservation)
                if not verdict.allowed:
                    transition = domain.deny_budget(transition, verdict)
                    break
            if any(isinstance(event, TaskCompleted | TaskFailed) for event in transition.events):
                cost = await self._budget.task_cost(state.tenant, state.task_id, transition.state.llm_usage_ids)
                transition = domain.with_cost(transition, cost)
        except BudgetUnavailableError as exc:
            raise RetryableError(str(exc)) from exc
        return transition

    def _reservations(self, transition: Transition) -> list[BudgetReserveRequest]:
        state = transition.state

        def reservation(
            reservation_id: str, kind: Literal["llm", "tool"], *, model: str | None = None, tool: str | None = None
        ) -> BudgetReserveRequest:
            request = transition.llm_request if kind == "llm" else None
            return BudgetReserveRequest(
                reservation_id=reservation_id,
                kind=kind,
                tenant=state.tenant,
                task_id=state.task_id,
                agent=state.agent,
                model=model,
                tool=tool,
                estimated_prompt_tokens=_estimated_prompt_tokens(request) if request else 0,
                estimated_completion_tokens=request.max_tokens if request else 0,
                task_budget_usd=state.budget_usd,
                submitted_by=state.submitted_by,
            )

        reservations = []
        if transition.llm_request is not None:
            request = transition.llm_request
            reservations.append(reservation(f"llm:{request.request_id}", "llm", model=request.model))
        reservations.extend(
            reservation(f"tool:{call.call_id}", "tool", tool=call.tool) for call in transition.tool_calls
        )
        return reservations

    async def _release_budget(self, state: RunState) -> None:
        # Best effort: a reservation not released here expires in the accountant.
        try:
            await self._budget.release(state.tenant, state.task_id)
        except BudgetUnavailableError as exc:
            _log.warning("budget_release_failed", error=str(exc))

    def _record_spans(self, before: RunState | None, transition: Transition, record: RunRecord) -> None:
        """The finished agent step and, when the run ended, the task's root span. Off the hot path."""
        state = transition.state
        now = utc_now()
        trace_id = record.trace_id
        task_span = task_span_id(state.task_id)
        step_ended = before is not None and (state.terminal or state.step > before.step)
        if step_ended and before is not None and before.step >= 1 and before.step_started_at is not None:
            self._spans.record(
                name=f"step {before.step}",
                kind="agent_step",
                trace=TraceContext(trace_id, step_span_id(state.task_id, before.step)),
                parent_span_id=task_span,
                start=before.step_started_at,
                end=now,
                task_id=state.task_id,
                tenant=state.tenant,
                attributes={"agentbus.step": before.step, SpanAttribute.AGENT: state.agent},
            )
        if state.terminal and state.started_at is not None and (before is None or not before.terminal):
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
                attributes[SpanAttribute.COST_USD] = final.cost_usd
            user_input = next((m.content for m in state.messages if m.role == "user"), None)
            if user_input is not None:
                attributes[SpanAttribute.INPUT] = user_input
            self._spans.record(
                name=state.agent or "task",
                kind="task",
                trace=TraceContext(trace_id, task_span),
                parent_span_id=record.parent_span_id,
                start=state.started_at,
                end=now,
                task_id=state.task_id,
                tenant=state.tenant,
                status="ok" if state.status is RunStatus.COMPLETED else "error",
                status_message=None if state.status is RunStatus.COMPLETED else state.status.value,
                attributes=attributes,
            )

    def _outbox(self, transition: Transition, trace_id: str) -> list[OutboxItem]:
        state = transition.state
        # The calls of a step are children of its agent_step span, so the worker's generation and the
        # executor's tool spans hang under the step that asked for them.
        step_trace = TraceContext(trace_id, step_span_id(state.task_id, state.step)).traceparent
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
                    traceparent=step_trace,
                )
            )
        items.extend(self._tool_call_item(call, step_trace) for call in transition.tool_calls)
        if transition.abort is not None and transition.abort_model is not None:
            items.append(
                OutboxItem(
                    subject=LLM_ABORT.format(model=transition.abort_model),
                    msg_id=f"abort:{transition.abort.request_id}",
                    payload=transition.abort.model_dump_json(),
                    core=True,
                )
            )
        return items

    @staticmethod
    def _tool_call_item(call: ToolCallRequested, traceparent: str) -> OutboxItem:
        return OutboxItem(
            subject=TOOL_CALL.format(tenant=call.tenant),
            msg_id=f"call:{call.call_id}",
            payload=call.model_dump_json(),
            traceparent=traceparent,
        )

    async def _publish(self, outbox: list[OutboxItem]) -> None:
        # In order: a task's events must enter the stream in seq order.
        for item in outbox:
            await self._publisher.publish(item)

    async def _mark_sent(self, task_id: str, record: RunRecord, revision: int) -> None:
        # On a conflict a newer transition was stored; it re-published (deduplicated) what it found pending.
        with contextlib.suppress(RevisionConflictError):
            await self._store.update(task_id, record.model_copy(update={"outbox": []}), revision)


def task_span_id(task_id: str) -> str:
    """The id of a task's root span: derived from the task id, so every transition names the same parent."""
    return hashlib.sha256(f"{task_id}:task".encode()).hexdigest()[:16]


def step_span_id(task_id: str, step: int) -> str:
    """The id of a step's agent_step span: derived, so redelivered transitions point at the same span."""
    return hashlib.sha256(f"{task_id}:step:{step}".encode()).hexdigest()[:16]


def _estimated_prompt_tokens(request: LlmRequest) -> int:
    # About four characters per token for English text: an estimate to reserve against, settled later.
    characters = sum(len(m.content) for m in request.messages) + sum(len(str(t.parameters)) for t in request.tools)
    return characters // 4 + 1
