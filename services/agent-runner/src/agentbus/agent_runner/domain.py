"""The agent loop as pure transitions: (run state, input) -> (new run state, events, next LLM request).

No I/O here. The service persists the new state and publishes the outputs; because every input is
checked against the state (is the task running? is this the result we wait for?), applying the same
input twice produces nothing the second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from agentbus.agent_runner.specs import AgentSpec
from agentbus.contracts.budget import BudgetReserveReply
from agentbus.contracts.common import ErrorInfo, TokenUsage, utc_now
from agentbus.contracts.llm import ChatMessage, LlmAbort, LlmRequest, LlmResult, ToolCall, ToolSpec
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.tasks import (
    TaskAccepted,
    TaskApprovalPending,
    TaskApprovalResolved,
    TaskBudgetExceeded,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskEvent,
    TaskFailed,
    TaskRejected,
    TaskStep,
    TaskSubmitted,
    ToolCallSummary,
)
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate, ToolCallWithdrawn
from pydantic import BaseModel, ConfigDict, Field

MAX_FALLBACKS = 3
"""Most fallback models one step tries after its model failed, so a cycle in routing cannot loop."""


@dataclass(frozen=True)
class RunTiming:
    """How long runs may take, and how soon a run that waits is re-driven.

    Every run has a deadline (the submission's `deadline_seconds`, else the agent's `timeout_seconds`, else
    `default_deadline_seconds`). A run that still waits on the same step at its next wake-up has what it
    waits for published again (idempotently), first after `redrive_seconds`, then at doubling intervals up
    to `max_redrive_seconds`: nothing depends on a redelivery arriving.
    """

    default_deadline_seconds: float = 3600.0
    redrive_seconds: float = 60.0
    max_redrive_seconds: float = 3600.0

    def redrive_after(self, redrives: int) -> timedelta:
        return timedelta(seconds=min(self.max_redrive_seconds, self.redrive_seconds * 2 ** min(redrives, 30)))


DEFAULT_TIMING = RunTiming()


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    BUDGET_EXCEEDED = "budget_exceeded"


class ErrorCode(StrEnum):
    """Codes of `rejected` and `failed` events: part of the public contract."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    TENANT_MISMATCH = "tenant_mismatch"
    UNKNOWN_AGENT = "unknown_agent"
    IDENTITY_MISMATCH = "identity_mismatch"
    STEP_LIMIT = "step_limit_exceeded"
    LLM_ERROR = "llm_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL_ERROR = "internal_error"


class PendingToolCall(BaseModel):
    """A tool call of the current step: run in-process (result known at once) or waiting for the tool-executor."""

    model_config = ConfigDict(frozen=True)

    call_id: str
    tool_call_id: str
    name: str
    remote: bool
    approval_id: str | None = None
    approval_resolved: bool = False
    result: str | None = None


class RunState(BaseModel):
    """Everything needed to continue a run after any restart. Stored per task, written compare-and-set."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    tenant: str
    status: RunStatus
    agent: str = ""
    model: str = ""
    max_steps: int = 1
    budget_usd: float | None = None
    submitted_by: str | None = None
    step: int = Field(default=0, description="LLM steps requested so far.")
    awaiting_request_id: str | None = Field(default=None, description="The LLM result the run waits for.")
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[ToolSpec] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    next_seq: int = Field(default=1, description="seq of the task's next public event.")
    stream_tokens: bool = False
    pinned_model: str | None = Field(default=None, description="A deployment the submission asked for.")
    requested_model: str | None = Field(default=None, description="Deployment the awaited request went to.")
    attempt_model: str | None = Field(
        default=None, description="Model of the awaited request: the agent's or a fallback."
    )
    fallbacks: int = Field(default=0, description="Fallback models tried for the current step.")
    started_at: datetime | None = None
    step_started_at: datetime | None = None
    pending_message: ChatMessage | None = Field(default=None, description="Assistant message whose tools run.")
    pending_calls: list[PendingToolCall] = Field(default_factory=list)
    citations: list[RetrievedChunk] = Field(default_factory=list)
    usage_ids: list[str] = Field(
        default_factory=list, description="Usage records the run caused (LLM steps, tools): its cost waits for them."
    )
    deadline_at: datetime | None = Field(default=None, description="When the run fails with deadline_exceeded.")
    redrives: int = Field(default=0, description="Times the current step was re-driven at a wake-up.")

    @property
    def terminal(self) -> bool:
        return self.status is not RunStatus.RUNNING


class Toolbox(Protocol):
    """The tools a run may offer: pure built-ins run in-process, the rest go to the tool-executor."""

    def specs(self, names: list[str]) -> list[ToolSpec]: ...

    def is_local(self, name: str) -> bool: ...

    def execute(self, call: ToolCall, allowed: list[str]) -> str: ...


class Router(Protocol):
    """Picks the deployment (subject token) of a model for a request, and a model's fallback."""

    def choose(self, model: str, request_id: str, pinned: str | None = None) -> str: ...

    def fallback(self, model: str) -> str | None: ...

    def pinned_deployment(self, metadata: Mapping[str, Any]) -> str | None: ...


class DirectRouter:
    """Every model is its own deployment, with no fallback."""

    def choose(self, model: str, request_id: str, pinned: str | None = None) -> str:
        return model

    def fallback(self, model: str) -> str | None:
        return None

    def pinned_deployment(self, metadata: Mapping[str, Any]) -> str | None:
        return None


DIRECT = DirectRouter()


@dataclass(frozen=True)
class Transition:
    """What applying one input did: the state to store, and the messages to publish, in order."""

    state: RunState
    events: list[TaskEvent] = field(default_factory=list)
    llm_request: LlmRequest | None = None
    tool_calls: list[ToolCallRequested] = field(default_factory=list)
    abort: LlmAbort | None = None
    abort_model: str | None = None  # the deployment whose workers must drop `abort`
    withdrawals: list[ToolCallWithdrawn] = field(default_factory=list)
    """Calls of a run that ended: the executor must never run them, and expires their pending approvals."""
    close_budget: bool = False
    """The run ended: release its reservations and refuse any later ones."""
    wake: RunTimer | None = None
    """The run's next wake-up (it replaces the previous one)."""
    redrive: int = 0
    """Above 0, `llm_request` and `tool_calls` are what the run already waits for, sent again."""


def request_id(tenant: str, task_id: str, step: int) -> str:
    """The id of a run's n-th LLM request: deterministic, so a repeated publish is deduplicated, and scoped
    to the tenant, since task ids are the tenants' own (every id derived from it, usage and reservation
    ids included, is then unique across tenants too)."""
    return f"{tenant}.{task_id}.step-{step}"


def call_id(tenant: str, task_id: str, step: int, index: int) -> str:
    """The id of the index-th tool call of a step: the tool-executor's exactly-once key, tenant-scoped."""
    return f"{tenant}.{task_id}.{step}.{index}"


def reject(task_id: str, tenant: str, code: ErrorCode, message: str) -> Transition:
    """A submission that cannot run. The task id is taken, so a retry of the same id is ignored too."""
    state = RunState(task_id=task_id, tenant=tenant, status=RunStatus.REJECTED, next_seq=2)
    event = TaskRejected(task_id=task_id, tenant=tenant, seq=1, error=ErrorInfo(code=code, message=message))
    return Transition(state, [event])


def start(
    submission: TaskSubmitted,
    spec: AgentSpec,
    toolbox: Toolbox,
    router: Router = DIRECT,
    *,
    now: datetime | None = None,
    timing: RunTiming = DEFAULT_TIMING,
) -> Transition:
    """Accept a valid submission, arm its deadline and ask the model for the first step."""
    now = now or utc_now()
    deadline_seconds = submission.deadline_seconds or spec.timeout_seconds or timing.default_deadline_seconds
    messages = [
        ChatMessage(role="system", content=spec.system_prompt),
        ChatMessage(role="user", content=submission.input),
    ]
    budget = submission.budget_usd if submission.budget_usd is not None else spec.budget_usd
    state = RunState(
        task_id=submission.task_id,
        tenant=submission.tenant,
        status=RunStatus.RUNNING,
        agent=spec.name,
        model=spec.model,
        max_steps=spec.max_steps,
        budget_usd=budget,
        submitted_by=submission.submitted_by,
        messages=messages,
        tools=toolbox.specs(spec.tools),
        stream_tokens=spec.stream_tokens,
        pinned_model=router.pinned_deployment(submission.metadata),
        started_at=now,
        deadline_at=now + timedelta(seconds=deadline_seconds),
    )
    accepted = TaskAccepted(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        agent=spec.name,
        model=spec.model,
        max_steps=spec.max_steps,
        budget_usd=budget,
    )
    requested = _request_next_step(state.model_copy(update={"next_seq": state.next_seq + 1}), [accepted], router)
    return replace(requested, wake=_next_wake(requested.state, now, timing))


def _next_wake(state: RunState, now: datetime, timing: RunTiming) -> RunTimer:
    """The run's next wake-up: its deadline, or sooner to re-drive the current step if it still waits then."""
    assert state.deadline_at is not None
    redrive_at = now + timing.redrive_after(state.redrives)
    if state.deadline_at <= redrive_at:
        return RunTimer(task_id=state.task_id, tenant=state.tenant, due_at=state.deadline_at, kind="deadline")
    return RunTimer(task_id=state.task_id, tenant=state.tenant, due_at=redrive_at, kind="step", step=state.step)


def _request_next_step(state: RunState, events: list[TaskEvent], router: Router) -> Transition:
    step = state.step + 1
    rid = request_id(state.tenant, state.task_id, step)
    deployment = router.choose(state.model, rid, state.pinned_model)
    advanced = state.model_copy(
        update={"step": step, "fallbacks": 0, "attempt_model": state.model, "step_started_at": utc_now()}
    )
    return _request(advanced, rid, deployment, events)


def _request(state: RunState, rid: str, deployment: str, events: list[TaskEvent]) -> Transition:
    request = LlmRequest(
        request_id=rid,
        task_id=state.task_id,
        tenant=state.tenant,
        agent=state.agent,
        model=deployment,
        requested_model=state.model,
        step=state.step,
        messages=state.messages,
        tools=state.tools,
        stream=state.stream_tokens,
        event_seq=max(state.next_seq - 1, 1),
    )
    waiting = state.model_copy(update={"awaiting_request_id": rid, "requested_model": deployment})
    return Transition(waiting, events, request)


def apply_llm_result(
    state: RunState, result: LlmResult, toolbox: Toolbox, router: Router = DIRECT
) -> Transition | None:
    """Advance the run with a generated step; None if the result is stale, repeated or the run ended."""
    if state.terminal or result.request_id != state.awaiting_request_id:
        return None
    usage = state.usage + result.usage
    seq = state.next_seq
    if result.usage_id is not None:
        # The worker published the usage record before the result: the run's cost waits for it.
        state = state.model_copy(update={"usage_ids": [*state.usage_ids, result.usage_id]})
    if result.error is not None or result.message is None:
        fallback = router.fallback(state.attempt_model or state.model)
        if fallback is not None and state.fallbacks < MAX_FALLBACKS:
            # The step is asked again of the fallback model, under its own request id (its own usage record).
            retried = state.model_copy(
                update={"usage": usage, "fallbacks": state.fallbacks + 1, "attempt_model": fallback}
            )
            rid = f"{request_id(state.tenant, state.task_id, state.step)}.fallback-{retried.fallbacks}"
            return _request(retried, rid, router.choose(fallback, rid), [])
        error = result.error or ErrorInfo(code=ErrorCode.LLM_ERROR, message="the model returned no message")
        failed = TaskFailed(
            task_id=state.task_id,
            tenant=state.tenant,
            seq=seq,
            error=ErrorInfo(code=ErrorCode.LLM_ERROR, message=f"{error.code}: {error.message}"),
            usage=usage,
        )
        return _end(state, RunStatus.FAILED, usage, [failed])

    message = result.message
    step_event = TaskStep(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=seq,
        step=result.step,
        tool_calls=[ToolCallSummary(id=c.id, name=c.name, arguments=c.arguments) for c in message.tool_calls],
        usage=result.usage,
    )
    seq += 1
    if not message.tool_calls:
        completed = TaskCompleted(
            task_id=state.task_id,
            tenant=state.tenant,
            seq=seq,
            output=message.content,
            usage=usage,
            cost_usd=0.0,
            steps=state.step,
            citations=state.citations,
        )
        return _end(state, RunStatus.COMPLETED, usage, [step_event, completed])
    if state.step >= state.max_steps:
        failed = TaskFailed(
            task_id=state.task_id,
            tenant=state.tenant,
            seq=seq,
            error=ErrorInfo(
                code=ErrorCode.STEP_LIMIT,
                message=f"the model still called tools after {state.max_steps} steps (the agent's max_steps)",
            ),
            usage=usage,
        )
        return _end(state, RunStatus.FAILED, usage, [step_event, failed])

    allowed = [tool.name for tool in state.tools]
    calls: list[PendingToolCall] = []
    requests: list[ToolCallRequested] = []
    for index, call in enumerate(message.tool_calls):
        cid = call_id(state.tenant, state.task_id, state.step, index)
        if call.name in allowed and not toolbox.is_local(call.name):
            calls.append(PendingToolCall(call_id=cid, tool_call_id=call.id, name=call.name, remote=True))
            requests.append(
                ToolCallRequested(
                    call_id=cid,
                    tool_call_id=call.id,
                    task_id=state.task_id,
                    tenant=state.tenant,
                    agent=state.agent,
                    tool=call.name,
                    arguments=call.arguments,
                    step=state.step,
                    submitted_by=state.submitted_by,
                )
            )
        else:
            output = toolbox.execute(call, allowed)
            calls.append(
                PendingToolCall(call_id=cid, tool_call_id=call.id, name=call.name, remote=False, result=output)
            )
    advanced = state.model_copy(
        update={
            "usage": usage,
            "next_seq": seq,
            "awaiting_request_id": None,
            "pending_message": message,
            "pending_calls": calls,
        }
    )
    if requests:
        return Transition(advanced, [step_event], tool_calls=requests)
    return _continue_after_tools(advanced, [step_event], router)


def _continue_after_tools(state: RunState, events: list[TaskEvent], router: Router) -> Transition:
    """Every tool call of the step has its result: give them to the model and ask for the next step."""
    assert state.pending_message is not None
    tool_messages = [
        ChatMessage(role="tool", content=call.result or "", tool_call_id=call.tool_call_id, name=call.name)
        for call in state.pending_calls
    ]
    advanced = state.model_copy(
        update={
            "messages": [*state.messages, state.pending_message, *tool_messages],
            "pending_message": None,
            "pending_calls": [],
        }
    )
    return _request_next_step(advanced, events, router)


def apply_tool_update(state: RunState, update: ToolCallUpdate, router: Router = DIRECT) -> Transition | None:
    """Record an approval's progress or a tool's result; None if stale, repeated or the run ended.

    Updates of one call may be handled out of order (they share a work queue), so each kind catches up on
    what it implies: a resolution first announces the approval if that was missed, and a result first
    records the resolution it carries.
    """
    if state.terminal:
        return None
    index = next((i for i, c in enumerate(state.pending_calls) if c.call_id == update.call_id and c.remote), None)
    if index is None:
        return None
    call = state.pending_calls[index]
    events: list[TaskEvent] = []

    def next_seq() -> int:
        return state.next_seq + len(events)

    def announce_pending(expires_at: datetime | None) -> None:
        assert update.approval_id is not None
        events.append(
            TaskApprovalPending(
                task_id=state.task_id,
                tenant=state.tenant,
                seq=next_seq(),
                approval_id=update.approval_id,
                tool=call.name,
                expires_at=expires_at,
            )
        )

    if update.kind == "approval_pending":
        if call.approval_id is not None or update.approval_id is None:
            return None
        announce_pending(update.expires_at)
        call = call.model_copy(update={"approval_id": update.approval_id})
    elif update.kind in ("approval_resolved", "result") and update.approval_id and update.outcome:
        if not call.approval_resolved:
            if call.approval_id is None:
                announce_pending(update.expires_at)
            events.append(
                TaskApprovalResolved(
                    task_id=state.task_id,
                    tenant=state.tenant,
                    seq=next_seq(),
                    approval_id=update.approval_id,
                    outcome=update.outcome,
                    by=update.by,
                )
            )
            call = call.model_copy(update={"approval_id": update.approval_id, "approval_resolved": True})
        elif update.kind == "approval_resolved":
            return None
    elif update.kind == "approval_resolved":
        return None
    citations = state.citations
    usage_ids = state.usage_ids
    if update.kind == "result":
        if call.result is not None:
            return None
        call = call.model_copy(update={"result": update.content})
        citations = [*citations, *update.citations]
        usage_ids = [*usage_ids, *(u for u in update.usage_ids if u not in usage_ids)]
    calls = [*state.pending_calls]
    calls[index] = call
    advanced = state.model_copy(
        update={
            "pending_calls": calls,
            "citations": citations,
            "usage_ids": usage_ids,
            "next_seq": state.next_seq + len(events),
        }
    )
    if all(c.result is not None for c in calls):
        return _continue_after_tools(advanced, events, router)
    return Transition(advanced, events)


def cancel(state: RunState, request: TaskCancelRequested, by: str | None = None) -> Transition | None:
    """Stop a running task; None if it already ended. A late LLM result is then ignored.

    A step being generated is aborted in the engine (best effort); its tool calls are withdrawn: the
    executor never runs one that has not started, and expires one waiting for approval.
    """
    if state.terminal:
        return None
    cancelled = TaskCancelled(
        task_id=state.task_id, tenant=state.tenant, seq=state.next_seq, reason=request.reason, by=by
    )
    return _end(state, RunStatus.CANCELLED, state.usage, [cancelled], interrupted=True)


def expire(state: RunState, now: datetime) -> Transition | None:
    """End a run whose deadline passed; None if it ended already or the deadline is still ahead."""
    if state.terminal or state.deadline_at is None or now < state.deadline_at:
        return None
    failed = TaskFailed(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        error=ErrorInfo(
            code=ErrorCode.DEADLINE_EXCEEDED,
            message=f"the task did not finish by its deadline {state.deadline_at.isoformat()}",
        ),
        usage=state.usage,
    )
    return _end(state, RunStatus.FAILED, state.usage, [failed], interrupted=True)


def fail_internal(state: RunState, reason: str) -> Transition | None:
    """End a run because a message it waited on was given up on (dead-lettered); None if it ended already."""
    if state.terminal:
        return None
    failed = TaskFailed(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        error=ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message=reason),
        usage=state.usage,
    )
    return _end(state, RunStatus.FAILED, state.usage, [failed], interrupted=True)


def wake(state: RunState, timer: RunTimer, now: datetime, timing: RunTiming = DEFAULT_TIMING) -> Transition | None:
    """A run's timer fired: end it at its deadline, or re-drive a step that still waits, then sleep again.

    Re-driving publishes again what the run waits for (the LLM request, the tool calls without a result)
    under new message ids: the worker bills a request once per request id and the executor runs a call
    once per call id, so a re-drive can only help a message that was lost, never repeat an effect.
    """
    if state.terminal:
        return None
    if (expired := expire(state, now)) is not None:
        return expired
    if timer.kind != "step" or timer.step != state.step:
        # The run moved on since this wake-up was set (or it was set for the deadline): sleep again.
        return Transition(state, wake=_next_wake(state, now, timing))
    redrives = state.redrives + 1
    waiting = state.model_copy(update={"redrives": redrives})
    request = None
    if state.awaiting_request_id is not None and state.requested_model is not None:
        request = _request(state, state.awaiting_request_id, state.requested_model, []).llm_request
    calls = _unfinished_calls(state)
    return Transition(
        waiting,
        llm_request=request,
        tool_calls=calls,
        wake=_next_wake(waiting, now, timing),
        redrive=redrives,
    )


def _unfinished_calls(state: RunState) -> list[ToolCallRequested]:
    """The tool calls of the current step still waiting for the executor, as they were requested."""
    if state.pending_message is None:
        return []
    by_id = {call.id: call for call in state.pending_message.tool_calls}
    return [
        ToolCallRequested(
            call_id=pending.call_id,
            tool_call_id=pending.tool_call_id,
            task_id=state.task_id,
            tenant=state.tenant,
            agent=state.agent,
            tool=pending.name,
            arguments=by_id[pending.tool_call_id].arguments,
            step=state.step,
            submitted_by=state.submitted_by,
        )
        for pending in state.pending_calls
        if pending.remote and pending.result is None and pending.tool_call_id in by_id
    ]


def deny_budget(state: RunState, verdict: BudgetReserveReply) -> Transition | None:
    """A call the run was about to make was refused by a budget: the run stops before making it."""
    if state.terminal:
        return None
    exceeded = TaskBudgetExceeded(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        budget=verdict.budget or "unknown",
        limit_usd=verdict.limit_usd or 0.0,
        spent_usd=verdict.spent_usd or 0.0,
        requested_usd=verdict.requested_usd,
    )
    return _end(state, RunStatus.BUDGET_EXCEEDED, state.usage, [exceeded], interrupted=True)


def with_cost(event: TaskEvent, cost_usd: float) -> TaskEvent:
    """A terminal event with the run's priced cost."""
    if isinstance(event, TaskCompleted | TaskFailed):
        return event.model_copy(update={"cost_usd": cost_usd})
    return event


def fail_before_start(task_id: str, tenant: str, reason: str) -> Transition:
    """A submission was given up on before it started a run: the task id ends failed, its client hears why."""
    state = RunState(task_id=task_id, tenant=tenant, status=RunStatus.FAILED, next_seq=2)
    event = TaskFailed(
        task_id=task_id, tenant=tenant, seq=1, error=ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message=reason)
    )
    return Transition(state, [event])


def cancel_before_start(request: TaskCancelRequested) -> Transition:
    """A cancellation that overtook its submission: the task id ends cancelled and never runs."""
    state = RunState(task_id=request.task_id, tenant=request.tenant, status=RunStatus.CANCELLED, next_seq=2)
    event = TaskCancelled(task_id=request.task_id, tenant=request.tenant, seq=1, reason=request.reason)
    return Transition(state, [event])


def _end(
    state: RunState, status: RunStatus, usage: TokenUsage, events: list[TaskEvent], *, interrupted: bool = False
) -> Transition:
    """The run ends: its budget is closed and the tool calls still out are withdrawn. `interrupted`: it ended
    while waiting for a step, which is aborted in the engine (best effort)."""
    ended = state.model_copy(
        update={
            "status": status,
            "usage": usage,
            "awaiting_request_id": None,
            "pending_message": None,
            "pending_calls": [],
            "next_seq": state.next_seq + len(events),
        }
    )
    withdrawals = [
        ToolCallWithdrawn(call_id=call.call_id, task_id=state.task_id, tenant=state.tenant, reason=f"task {status}")
        for call in state.pending_calls
        if call.remote and call.result is None
    ]
    abort, abort_model = None, None
    if interrupted and state.awaiting_request_id is not None and state.requested_model is not None:
        abort = LlmAbort(request_id=state.awaiting_request_id, task_id=state.task_id)
        abort_model = state.requested_model
    return Transition(ended, events, abort=abort, abort_model=abort_model, withdrawals=withdrawals, close_budget=True)
