"""The agent loop as pure transitions: (run state, input) -> (new run state, events, next LLM request).

No I/O here. The service persists the new state and publishes the outputs; because every input is
checked against the state (is the task running? is this the result we wait for?), applying the same
input twice produces nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from agentbus.agent_runner.specs import AgentSpec
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest, LlmResult, ToolCall, ToolSpec
from agentbus.contracts.tasks import (
    TaskAccepted,
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
from pydantic import BaseModel, ConfigDict, Field


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class ErrorCode(StrEnum):
    """Codes of `rejected` and `failed` events: part of the public contract."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    TENANT_MISMATCH = "tenant_mismatch"
    UNKNOWN_AGENT = "unknown_agent"
    STEP_LIMIT = "step_limit_exceeded"
    LLM_ERROR = "llm_error"


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

    @property
    def terminal(self) -> bool:
        return self.status is not RunStatus.RUNNING


class Toolbox(Protocol):
    """The tools a run may execute in-process (pure functions only)."""

    def specs(self, names: list[str]) -> list[ToolSpec]: ...

    def execute(self, call: ToolCall, allowed: list[str]) -> str: ...


@dataclass(frozen=True)
class Transition:
    """What applying one input did: the state to store, and the messages to publish, in order."""

    state: RunState
    events: list[TaskEvent] = field(default_factory=list)
    llm_request: LlmRequest | None = None


def request_id(task_id: str, step: int) -> str:
    """The id of a run's n-th LLM request: deterministic, so a repeated publish is deduplicated."""
    return f"{task_id}.step-{step}"


def reject(task_id: str, tenant: str, code: ErrorCode, message: str) -> Transition:
    """A submission that cannot run. The task id is taken, so a retry of the same id is ignored too."""
    state = RunState(task_id=task_id, tenant=tenant, status=RunStatus.REJECTED, next_seq=2)
    event = TaskRejected(task_id=task_id, tenant=tenant, seq=1, error=ErrorInfo(code=code, message=message))
    return Transition(state, [event])


def start(submission: TaskSubmitted, spec: AgentSpec, toolbox: Toolbox) -> Transition:
    """Accept a valid submission and ask the model for the first step."""
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
    return _request_next_step(state.model_copy(update={"next_seq": state.next_seq + 1}), [accepted])


def _request_next_step(state: RunState, events: list[TaskEvent]) -> Transition:
    step = state.step + 1
    rid = request_id(state.task_id, step)
    request = LlmRequest(
        request_id=rid,
        task_id=state.task_id,
        tenant=state.tenant,
        agent=state.agent,
        model=state.model,
        step=step,
        messages=state.messages,
        tools=state.tools,
    )
    return Transition(state.model_copy(update={"step": step, "awaiting_request_id": rid}), events, request)


def apply_llm_result(state: RunState, result: LlmResult, toolbox: Toolbox) -> Transition | None:
    """Advance the run with a generated step; None if the result is stale, repeated or the run ended."""
    if state.terminal or result.request_id != state.awaiting_request_id:
        return None
    usage = state.usage + result.usage
    seq = state.next_seq
    if result.error is not None or result.message is None:
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
    tool_messages = [
        ChatMessage(role="tool", content=toolbox.execute(call, allowed), tool_call_id=call.id, name=call.name)
        for call in message.tool_calls
    ]
    advanced = state.model_copy(
        update={"messages": [*state.messages, message, *tool_messages], "usage": usage, "next_seq": seq}
    )
    return _request_next_step(advanced, [step_event])


def cancel(state: RunState, request: TaskCancelRequested) -> Transition | None:
    """Stop a running task; None if it already ended. A late LLM result is then ignored."""
    if state.terminal:
        return None
    cancelled = TaskCancelled(task_id=state.task_id, tenant=state.tenant, seq=state.next_seq, reason=request.reason)
    return _end(state, RunStatus.CANCELLED, state.usage, [cancelled])


def cancel_before_start(request: TaskCancelRequested) -> Transition:
    """A cancellation that overtook its submission: the task id ends cancelled and never runs."""
    state = RunState(task_id=request.task_id, tenant=request.tenant, status=RunStatus.CANCELLED, next_seq=2)
    event = TaskCancelled(task_id=request.task_id, tenant=request.tenant, seq=1, reason=request.reason)
    return Transition(state, [event])


def _end(state: RunState, status: RunStatus, usage: TokenUsage, events: list[TaskEvent]) -> Transition:
    ended = state.model_copy(
        update={
            "status": status,
            "usage": usage,
            "awaiting_request_id": None,
            "next_seq": state.next_seq + len(events),
        }
    )
    return Transition(ended, events)
