"""The agent loop as pure transitions: (run state, input) -> (new run state, events, next LLM request).

No I/O here. The service persists the new state and publishes the outputs; because every input is
checked against the state (is the task running? is this the result we wait for?), applying the same
input twice produces nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from agentbus.agent_runner.guardrails import (
    Classification,
    GuardrailReview,
    classification_request,
    classification_request_id,
    findings_of,
    guardrail_event,
    reason_of,
    review_call_id,
    review_request,
)
from agentbus.agent_runner.memory import MemoryStoreSpec
from agentbus.agent_runner.sessions import (
    SUMMARY_INSTRUCTIONS,
    SUMMARY_PREFIX,
    Admission,
    SessionKey,
    SessionTurn,
    conversation,
    plan_compaction,
    transcript,
)
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
    TaskThrottled,
    ToolCallSummary,
)
from agentbus.contracts.tools import (
    GUARDRAIL_REVIEW_TOOL,
    ToolCallGuardrail,
    ToolCallRequested,
    ToolCallUpdate,
    ToolCallWithdrawn,
)
from agentbus.runtime.guardrails import Guardrails, Verdict
from pydantic import BaseModel, ConfigDict, Field

MAX_FALLBACKS = 3
"""Most fallback models one step tries after its model failed, so a cycle in routing cannot loop."""
REMEMBER = "remember"
RECALL = "recall"
MEMORY_TOOLS = frozenset({REMEMBER, RECALL})
"""Long-term memory tools: the runner carries them out itself, through the retriever (see MemoryCall)."""


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
    SESSION_BUSY = "session_busy"
    SESSION_UNSUPPORTED = "session_unsupported"
    GUARDRAIL_BLOCKED = "guardrail_blocked"
    RATE_LIMITED = "rate_limited"


class PendingToolCall(BaseModel):
    """A tool call of the current step: run in-process (result known at once) or waiting for the tool-executor."""

    model_config = ConfigDict(frozen=True)

    call_id: str
    tool_call_id: str
    name: str
    remote: bool
    memory: bool = Field(default=False, description="A long-term memory tool, carried out by the runner itself.")
    approval_id: str | None = None
    approval_resolved: bool = False
    result: str | None = None


class SessionRef(BaseModel):
    """The session a run belongs to, and whether its agent keeps tool results in the session's history."""

    model_config = ConfigDict(frozen=True)

    store: str
    session_id: str
    submitter: str
    keep_tool_results: bool = False

    def key(self, tenant: str) -> SessionKey:
        return SessionKey(self.store, tenant, self.submitter, self.session_id)


class SummaryPlan(BaseModel):
    """A summary the run waits for before its first step: of which turns, and what follows it."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The summarizing model (routing name).")
    folded: list[str] = Field(description="Tasks whose turns the summary replaces.")
    transcript: str = Field(description="What the model summarizes.")
    context: list[ChatMessage] = Field(description="The turns kept verbatim and the task's input, after the summary.")
    max_tokens: int = 512


class Compaction(BaseModel):
    """A summary this run made: it replaces the folded turns in the session when the run leaves it."""

    model_config = ConfigDict(frozen=True)

    summary: str
    folded: list[str]


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
    output_checked: bool = Field(
        default=False, description="The agent's guardrails check the model's output: it is neither streamed nor traced."
    )
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
    memory_store: str | None = Field(default=None, description="The agent's memory store (memory tools, sessions).")
    session: SessionRef | None = None
    session_waiting: bool = Field(default=False, description="Accepted, waiting for its session's turn.")
    turn_start: int = Field(default=0, description="Index in `messages` of the task's own input (after its history).")
    summarizing: SummaryPlan | None = Field(default=None, description="The summary the run waits for, if any.")
    throttled: bool = Field(
        default=False,
        description="The awaited request was held back by a rate limit: it is reserved and sent at the next wake-up.",
    )
    compaction: Compaction | None = None
    review: GuardrailReview | None = Field(
        default=None, description="An input or answer a guardrail holds for an approver (see agent_runner.guardrails)."
    )
    classifying: Classification | None = Field(
        default=None, description="An input or answer that waits for the agent's classifier models."
    )

    @property
    def terminal(self) -> bool:
        return self.status is not RunStatus.RUNNING


class Toolbox(Protocol):
    """The tools a run may offer: pure built-ins run in-process, the rest go to the tool-executor."""

    def specs(self, names: list[str]) -> list[ToolSpec]: ...

    def is_local(self, name: str) -> bool: ...

    def execute(self, call: ToolCall, allowed: list[str]) -> str: ...


class MemoryCall(BaseModel):
    """A call of a memory tool (remember, recall): the runner carries it out through the retriever, in the
    tenant's memory collection, and feeds its result back like any tool's. Idempotent on `call_id`."""

    model_config = ConfigDict(frozen=True)

    call_id: str
    tool_call_id: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    task_id: str
    tenant: str
    submitted_by: str | None = None
    store: str
    session_id: str | None = None
    step: int


class SessionLeave(BaseModel):
    """A run ended: it leaves its session, with its turn when it completed and the summary it made."""

    model_config = ConfigDict(frozen=True)

    store: str
    tenant: str
    submitter: str
    session_id: str
    task_id: str
    turn: SessionTurn | None = None
    compaction: Compaction | None = None

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.store, self.tenant, self.submitter, self.session_id)


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
    """Above 0, `llm_request`, `tool_calls` and `memory_calls` are what the run already waits for, sent again."""
    memory_calls: list[MemoryCall] = field(default_factory=list)
    session_leave: SessionLeave | None = None
    """The run ended: it leaves its session (with its turn), which goes to the next task waiting for it."""


def request_id(tenant: str, task_id: str, step: int) -> str:
    """The id of a run's n-th LLM request: deterministic, so a repeated publish is deduplicated, and scoped
    to the tenant, since task ids are the tenants' own (every id derived from it, usage and reservation
    ids included, is then unique across tenants too)."""
    return f"{tenant}.{task_id}.step-{step}"


def summary_request_id(tenant: str, task_id: str) -> str:
    """The id of the request that summarizes a run's session history before its first step."""
    return f"{tenant}.{task_id}.summary"


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
    memory: MemoryStoreSpec | None = None,
    admission: Admission | None = None,
    guardrails: Guardrails | None = None,
) -> Transition:
    """Accept a valid submission, arm its deadline and ask the model for the first step.

    The agent's `guardrails` check the input first: a finding is a `guardrail` event; `block` ends the task
    `guardrail_blocked`, `redact` gives the model (and everything after) the masked input, `require_approval`
    holds it for an approver before the first step.

    A task of a session (`admission`: what joining the session in the agent's `memory` store gave it) starts
    after the session's history (summarized first when it is past the store's threshold), or is accepted and
    waits for its turn, or is rejected `session_busy` by the store's policy.
    """
    now = now or utc_now()
    if admission is not None and admission.status == "busy":
        return reject(
            submission.task_id,
            submission.tenant,
            ErrorCode.SESSION_BUSY,
            f"session {submission.session_id!r} is running another task, and memory store "
            f"{memory.name if memory else '?'!r} refuses a session's tasks while one runs (on_busy: reject)",
        )
    deadline_seconds = submission.deadline_seconds or spec.timeout_seconds or timing.default_deadline_seconds
    messages = [
        ChatMessage(role="system", content=spec.system_prompt),
        ChatMessage(role="user", content=submission.input),
    ]
    budget = submission.budget_usd if submission.budget_usd is not None else spec.budget_usd
    output_checked = guardrails.checks_model_output() if guardrails else False
    session = None
    if submission.session_id is not None and memory is not None:
        session = SessionRef(
            store=memory.name,
            session_id=submission.session_id,
            submitter=submission.submitted_by or ANONYMOUS,
            keep_tool_results=spec.session_tool_results,
        )
    waiting = admission is not None and admission.status == "waiting"
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
        # What guardrails must check first is never streamed past them.
        stream_tokens=spec.stream_tokens and not output_checked,
        output_checked=output_checked,
        pinned_model=router.pinned_deployment(submission.metadata),
        started_at=now,
        deadline_at=now + timedelta(seconds=deadline_seconds),
        memory_store=spec.memory,
        session=session,
        session_waiting=waiting,
    )
    accepted = TaskAccepted(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        agent=spec.name,
        model=spec.model,
        max_steps=spec.max_steps,
        budget_usd=budget,
        session_id=session.session_id if session is not None else None,
        queued=waiting,
    )
    state = state.model_copy(update={"next_seq": state.next_seq + 1})
    events: list[TaskEvent] = [accepted]
    verdict = guardrails.check_text("input", submission.input, mask_blocked=True) if guardrails else None
    if verdict is not None and verdict.findings:
        events.append(guardrail_event(state.task_id, state.tenant, state.next_seq, "input", findings_of(verdict), 0))
        masked = verdict.text if verdict.text is not None else submission.input
        user = ChatMessage(role="user", content=masked)
        state = state.model_copy(update={"next_seq": state.next_seq + 1, "messages": [messages[0], user]})
        if verdict.blocked:
            return _blocked(state, events, verdict, "the task's input")
        if verdict.needs_approval:
            rid = review_call_id(state.tenant, state.task_id, "input", 0)
            review = GuardrailReview(call_id=rid, stage="input", step=0, reason=reason_of(verdict), text=masked)
            state = state.model_copy(update={"review": review})
    classifiers = guardrails.model_checks("input") if guardrails else []
    if classifiers:
        # The classifiers judge the input first (as the pattern checks left it); a hold waits for them.
        held = state.review.reason if state.review is not None else None
        plan = Classification(stage="input", step=0, text=state.messages[-1].content, checks=classifiers, held=held)
        state = state.model_copy(update={"classifying": plan, "review": None})
    if waiting:
        return Transition(state, events, wake=_next_wake(state, now, timing))
    begun = _begin(state, admission, memory, router, events)
    return replace(begun, wake=_next_wake(begun.state, now, timing))


def _blocked(state: RunState, events: list[TaskEvent], verdict: Verdict | str, what: str) -> Transition:
    """A guardrail blocks the run: it fails `guardrail_blocked` after `events` (counted in `state.next_seq`)."""
    reason = verdict if isinstance(verdict, str) else verdict.reason()
    failed = TaskFailed(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        error=ErrorInfo(code=ErrorCode.GUARDRAIL_BLOCKED, message=f"{what} was blocked: {reason}"),
        usage=state.usage,
    )
    ended = _end(state, RunStatus.FAILED, state.usage, [failed])
    return replace(ended, events=[*events, failed])


def _hold_input(state: RunState, admission: Admission | None, events: list[TaskEvent]) -> Transition:
    """The input waits for an approver before the first step; the session's history is kept for then."""
    review = state.review
    assert review is not None
    if admission is not None and admission.status == "running":
        review = review.model_copy(update={"history_summary": admission.summary, "history": list(admission.turns)})
    review = review.model_copy(update={"requested": True})
    held = state.model_copy(
        update={
            "review": review,
            "session_waiting": False,
            "pending_calls": [_review_call(review)],
        }
    )
    return Transition(held, events, tool_calls=[_review_request(held)])


def _complete(state: RunState, events: list[TaskEvent], text: str) -> Transition:
    """A held answer is released: the run completes with it after `events` (counted in `state.next_seq`)."""
    completed = TaskCompleted(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        output=text,
        usage=state.usage,
        cost_usd=0.0,
        steps=state.step,
        citations=state.citations,
    )
    answer = ChatMessage(role="assistant", content=text)
    ended = _end(state, RunStatus.COMPLETED, state.usage, [completed], answer=answer)
    return replace(ended, events=[*events, completed])


def _classify(state: RunState, events: list[TaskEvent], router: Router) -> Transition:
    """Ask the current classifier of the held input or answer."""
    plan = state.classifying
    assert plan is not None
    rid = classification_request_id(state.tenant, state.task_id, plan)
    asking = state.model_copy(
        update={"classifying": plan.model_copy(update={"requested": True}), "step_started_at": utc_now()}
    )
    return _classification(asking, rid, router.choose(plan.check.model, rid), events)


def _classification(state: RunState, rid: str, deployment: str, events: list[TaskEvent]) -> Transition:
    plan = state.classifying
    assert plan is not None
    request = classification_request(
        plan,
        request_id=rid,
        deployment=deployment,
        task_id=state.task_id,
        tenant=state.tenant,
        agent=state.agent,
        event_seq=max(state.next_seq - 1, 1),
    )
    waiting = state.model_copy(
        update={"awaiting_request_id": rid, "requested_model": deployment, "attempt_model": plan.check.model}
    )
    return Transition(waiting, events, request)


def _classified(state: RunState, result: LlmResult, router: Router, memory: MemoryStoreSpec | None) -> Transition:
    """A classifier answered: ask the next one, or act on what they all found (a `guardrail` event of their own;
    block ends the task, require_approval holds the text for review, else the run goes on with it)."""
    plan = state.classifying
    assert plan is not None
    answer = result.message.content if result.error is None and result.message is not None else None
    plan = plan.answered(answer)
    if not plan.done:
        return _classify(state.model_copy(update={"classifying": plan, "awaiting_request_id": None}), [], router)
    events: list[TaskEvent] = []
    cleared = state.model_copy(update={"classifying": None, "awaiting_request_id": None})
    if plan.flags:
        findings = [flag.finding for flag in plan.flags]
        events.append(guardrail_event(state.task_id, state.tenant, cleared.next_seq, plan.stage, findings, plan.step))
        cleared = cleared.model_copy(update={"next_seq": cleared.next_seq + 1})
    action = plan.action()
    what = "the task's input" if plan.stage == "input" else "the model's output"
    if action == "block":
        return _blocked(cleared, events, plan.reason("block"), what)
    reasons = [plan.held, plan.reason("require_approval") if action == "require_approval" else None]
    held = "; ".join(reason for reason in reasons if reason)
    review = None
    if held:
        rid = review_call_id(state.tenant, state.task_id, plan.stage, plan.step)
        review = GuardrailReview(call_id=rid, stage=plan.stage, step=plan.step, reason=held, text=plan.text)
    if plan.stage == "input":
        admission = None
        if plan.history or plan.history_summary:
            admission = Admission(status="running", summary=plan.history_summary, turns=tuple(plan.history))
        return _begin(cleared.model_copy(update={"review": review}), admission, memory, router, events)
    if review is not None:
        return _hold_output(cleared, review, events)
    return _complete(cleared, events, plan.text)


def _hold_output(state: RunState, review: GuardrailReview, events: list[TaskEvent]) -> Transition:
    """The final answer waits for an approver."""
    requested = review.model_copy(update={"requested": True})
    held = state.model_copy(
        update={"awaiting_request_id": None, "review": requested, "pending_calls": [_review_call(requested)]}
    )
    return Transition(held, events, tool_calls=[_review_request(held)])


def _review_call(review: GuardrailReview) -> PendingToolCall:
    return PendingToolCall(call_id=review.call_id, tool_call_id=review.call_id, name=GUARDRAIL_REVIEW_TOOL, remote=True)


def _review_request(state: RunState) -> ToolCallRequested:
    assert state.review is not None
    return review_request(
        state.review, task_id=state.task_id, tenant=state.tenant, agent=state.agent, submitted_by=state.submitted_by
    )


def _reviewed(
    state: RunState,
    update: ToolCallUpdate,
    events: list[TaskEvent],
    router: Router,
    memory: MemoryStoreSpec | None,
) -> Transition:
    """The approver released the held input or answer (the run goes on with it), or did not (it fails)."""
    review = state.review
    assert review is not None
    cleared = state.model_copy(update={"review": None, "pending_calls": []})
    if update.ok:
        if review.stage == "input":
            admission = None
            if review.history or review.history_summary:
                admission = Admission(status="running", summary=review.history_summary, turns=tuple(review.history))
            return _begin(cleared, admission, memory, router, events)
        return _complete(cleared, events, review.text)
    what = "the task's input" if review.stage == "input" else "the model's output"
    outcome = update.outcome or "refused"
    by = f" by {update.by}" if update.by else ""
    failed = TaskFailed(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=cleared.next_seq,
        error=ErrorInfo(
            code=ErrorCode.GUARDRAIL_BLOCKED,
            message=f"{what}, held for review ({review.reason}), was {outcome}{by}",
        ),
        usage=state.usage,
    )
    ended = _end(cleared, RunStatus.FAILED, state.usage, [failed])
    return replace(ended, events=[*events, failed])


ANONYMOUS = "anonymous"
"""The owner of a session whose submission named no submitter (only where identities are not enforced)."""


def admit(
    state: RunState,
    admission: Admission,
    memory: MemoryStoreSpec | None,
    router: Router = DIRECT,
    *,
    now: datetime,
    timing: RunTiming = DEFAULT_TIMING,
) -> Transition | None:
    """A run that waits for its session got its turn: it starts after the history, as `start` would have.
    None if it does not wait (any more) or its turn has not come."""
    if state.terminal or not state.session_waiting or admission.status != "running":
        return None
    if (expired := expire(state, now)) is not None:
        return expired
    begun = _begin(state.model_copy(update={"redrives": 0}), admission, memory, router, [])
    return replace(begun, wake=_next_wake(begun.state, now, timing))


def _begin(
    state: RunState,
    admission: Admission | None,
    memory: MemoryStoreSpec | None,
    router: Router,
    events: list[TaskEvent],
) -> Transition:
    """The run's first request: the step itself, or first a summary of the history's oldest turns (or first the
    input's review, when a guardrail holds it)."""
    judged = state.classifying
    if judged is not None and judged.stage == "input" and not judged.requested:
        if admission is not None and admission.status == "running":
            history = {"history_summary": admission.summary, "history": list(admission.turns)}
            judged = judged.model_copy(update=history)
        return _classify(state.model_copy(update={"classifying": judged, "session_waiting": False}), events, router)
    if state.review is not None and state.review.stage == "input" and not state.review.requested:
        return _hold_input(state, admission, events)
    system_prompt, user_input = state.messages[0].content, state.messages[-1].content
    summary: str | None = None
    turns: tuple[SessionTurn, ...] = ()
    if admission is not None and admission.status == "running":
        summary, turns = admission.summary, admission.turns
    plan = plan_compaction(turns, memory) if memory is not None and turns else None
    compression = memory.active_compression if memory is not None else None
    if plan is not None and compression is not None:
        summarizing = SummaryPlan(
            model=compression.model,
            folded=[turn.task_id for turn in plan.folded],
            transcript=transcript(summary, plan.folded),
            context=conversation(system_prompt, None, plan.kept, user_input)[1:],
            max_tokens=compression.max_summary_tokens,
        )
        waiting = state.model_copy(
            update={"summarizing": summarizing, "session_waiting": False, "step_started_at": utc_now()}
        )
        rid = summary_request_id(state.tenant, state.task_id)
        return _summary_request(waiting, rid, router.choose(compression.model, rid), events)
    messages = conversation(system_prompt, summary, turns, user_input)
    begun = state.model_copy(update={"messages": messages, "turn_start": len(messages) - 1, "session_waiting": False})
    return _request_next_step(begun, events, router)


def _summary_request(state: RunState, rid: str, deployment: str, events: list[TaskEvent]) -> Transition:
    plan = state.summarizing
    assert plan is not None
    request = LlmRequest(
        request_id=rid,
        task_id=state.task_id,
        tenant=state.tenant,
        agent=state.agent,
        model=deployment,
        requested_model=plan.model,
        step=1,
        messages=[
            ChatMessage(role="system", content=SUMMARY_INSTRUCTIONS),
            ChatMessage(role="user", content=plan.transcript),
        ],
        max_tokens=plan.max_tokens,
        purpose="summary",
        event_seq=max(state.next_seq - 1, 1),
    )
    waiting = state.model_copy(
        update={"awaiting_request_id": rid, "requested_model": deployment, "attempt_model": plan.model}
    )
    return Transition(waiting, events, request)


def _summarized(state: RunState, result: LlmResult, router: Router) -> Transition:
    """The summary came back: the run's conversation is its agent's prompt, the summary, the turns kept
    verbatim and its input; the session takes the summary when the run leaves it. A summary that failed
    leaves the history as it was (given to the model as text), and the session unchanged."""
    plan = state.summarizing
    assert plan is not None
    content = result.message.content.strip() if result.error is None and result.message is not None else ""
    if content:
        context = ChatMessage(role="system", content=SUMMARY_PREFIX + content)
        compaction: Compaction | None = Compaction(summary=content, folded=plan.folded)
    else:
        context = ChatMessage(role="system", content="The earlier conversation:\n" + plan.transcript)
        compaction = None
    messages = [state.messages[0], context, *plan.context]
    begun = state.model_copy(
        update={
            "messages": messages,
            "turn_start": len(messages) - 1,
            "summarizing": None,
            "compaction": compaction,
            "awaiting_request_id": None,
        }
    )
    return _request_next_step(begun, [], router)


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
        output_checked=state.output_checked,
        event_seq=max(state.next_seq - 1, 1),
    )
    waiting = state.model_copy(update={"awaiting_request_id": rid, "requested_model": deployment})
    return Transition(waiting, events, request)


def apply_llm_result(
    state: RunState,
    result: LlmResult,
    toolbox: Toolbox,
    router: Router = DIRECT,
    guardrails: Guardrails | None = None,
    memory: MemoryStoreSpec | None = None,
) -> Transition | None:
    """Advance the run with a generated step (or a classifier's answer); None if the result is stale, repeated
    or the run ended.

    The agent's `guardrails` check the model's text (the output stage) and each tool call's arguments before
    anything of the step goes further: findings are `guardrail` events after the `step` event; redacted text
    and arguments are masked in the events, the conversation and the calls. A blocked output fails the task;
    an answer held for approval waits for an approver (text beside tool calls is masked or blocked, not held).
    A blocked tool call, or one held for approval, goes to the executor with the verdict; an in-process or
    memory tool cannot wait for an approver, so there a hold blocks the call too.
    """
    if state.terminal or result.request_id != state.awaiting_request_id:
        return None
    usage = state.usage + result.usage
    seq = state.next_seq
    if result.usage_id is not None:
        # The worker published the usage record before the result: the run's cost waits for it.
        state = state.model_copy(update={"usage_ids": [*state.usage_ids, result.usage_id]})
    if state.summarizing is not None:
        return _summarized(state.model_copy(update={"usage": usage}), result, router)
    if state.classifying is not None:
        return _classified(state.model_copy(update={"usage": usage}), result, router, memory)
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
    output_verdict: Verdict | None = None
    argument_verdicts: dict[str, Verdict] = {}
    if guardrails:
        message, output_verdict, argument_verdicts = _checked(message, guardrails)
    step_event = TaskStep(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=seq,
        step=result.step,
        tool_calls=[ToolCallSummary(id=c.id, name=c.name, arguments=c.arguments) for c in message.tool_calls],
        usage=result.usage,
    )
    seq += 1
    checked: list[TaskEvent] = []
    if output_verdict is not None and output_verdict.findings:
        checked.append(
            guardrail_event(state.task_id, state.tenant, seq, "output", findings_of(output_verdict), result.step)
        )
        seq += 1
    argument_findings = [
        finding
        for call in message.tool_calls
        if call.id in argument_verdicts
        for finding in findings_of(argument_verdicts[call.id], call.name)
    ]
    if argument_findings:
        checked.append(
            guardrail_event(state.task_id, state.tenant, seq, "tool_arguments", argument_findings, result.step)
        )
        seq += 1
    if output_verdict is not None and output_verdict.blocked:
        counted = state.model_copy(update={"usage": usage, "next_seq": seq})
        return _blocked(counted, [step_event, *checked], output_verdict, "the model's output")
    if not message.tool_calls:
        # The final answer: the classifiers judge it, and an approver may have to release it, before it is out.
        classifiers = guardrails.model_checks("output") if guardrails and message.content else []
        held = reason_of(output_verdict) if output_verdict is not None and output_verdict.needs_approval else None
        counted = state.model_copy(update={"usage": usage, "next_seq": seq, "awaiting_request_id": None})
        if classifiers:
            plan = Classification(stage="output", step=state.step, text=message.content, checks=classifiers, held=held)
            return _classify(counted.model_copy(update={"classifying": plan}), [step_event, *checked], router)
        if held is not None:
            rid = review_call_id(state.tenant, state.task_id, "output", state.step)
            review = GuardrailReview(call_id=rid, stage="output", step=state.step, reason=held, text=message.content)
            return _hold_output(counted, review, [step_event, *checked])
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
        return _end(state, RunStatus.COMPLETED, usage, [step_event, *checked, completed], answer=message)
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
        return _end(state, RunStatus.FAILED, usage, [step_event, *checked, failed])

    allowed = [tool.name for tool in state.tools]
    calls: list[PendingToolCall] = []
    requests: list[ToolCallRequested] = []
    memory_calls: list[MemoryCall] = []
    for index, call in enumerate(message.tool_calls):
        cid = call_id(state.tenant, state.task_id, state.step, index)
        found = argument_verdicts.get(call.id)
        hold = found.action if found is not None and found.action in ("block", "require_approval") else None
        remote = call.name in allowed and not toolbox.is_local(call.name) and call.name not in MEMORY_TOOLS
        if found is not None and hold is not None and not remote:
            why = "" if hold == "block" else " (an in-process tool cannot wait for an approver)"
            refused = f"error: guardrail_blocked: the call was not run{why}: {found.reason()}"
            calls.append(
                PendingToolCall(call_id=cid, tool_call_id=call.id, name=call.name, remote=False, result=refused)
            )
        elif call.name in allowed and call.name in MEMORY_TOOLS and state.memory_store is not None:
            calls.append(PendingToolCall(call_id=cid, tool_call_id=call.id, name=call.name, remote=True, memory=True))
            memory_calls.append(_memory_call(state, cid, call))
        elif call.name in allowed and not toolbox.is_local(call.name):
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
                    guardrail=_call_guardrail(found),
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
    if requests or memory_calls:
        return Transition(advanced, [step_event, *checked], tool_calls=requests, memory_calls=memory_calls)
    return _continue_after_tools(advanced, [step_event, *checked], router)


def _checked(message: ChatMessage, guardrails: Guardrails) -> tuple[ChatMessage, Verdict | None, dict[str, Verdict]]:
    """The model's message with redacted text and arguments masked; the output's verdict; each call's, by id."""
    output = guardrails.check_text("output", message.content, mask_blocked=True) if message.content else None
    by_call: dict[str, Verdict] = {}
    calls: list[ToolCall] = []
    for call in message.tool_calls:
        verdict = guardrails.check_arguments(call.arguments, mask_blocked=True)
        if verdict.findings:
            by_call[call.id] = verdict
            call = call.model_copy(update={"arguments": verdict.arguments})
        calls.append(call)
    content = output.text if output is not None and output.text is not None else message.content
    return message.model_copy(update={"content": content, "tool_calls": calls}), output, by_call


def _call_guardrail(verdict: Verdict | None) -> ToolCallGuardrail | None:
    if verdict is None:
        return None
    if verdict.action == "block":
        return ToolCallGuardrail(action="block", reason=reason_of(verdict))
    if verdict.action == "require_approval":
        return ToolCallGuardrail(action="require_approval", reason=reason_of(verdict))
    return None


def _memory_call(state: RunState, cid: str, call: ToolCall) -> MemoryCall:
    assert state.memory_store is not None
    return MemoryCall(
        call_id=cid,
        tool_call_id=call.id,
        tool=call.name,
        arguments=call.arguments,
        task_id=state.task_id,
        tenant=state.tenant,
        submitted_by=state.submitted_by,
        store=state.memory_store,
        session_id=state.session.session_id if state.session is not None else None,
        step=state.step,
    )


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


def apply_tool_update(
    state: RunState, update: ToolCallUpdate, router: Router = DIRECT, memory: MemoryStoreSpec | None = None
) -> Transition | None:
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
    if state.review is not None and call.call_id == state.review.call_id and call.result is not None:
        return _reviewed(advanced, update, events, router, memory)
    if all(c.result is not None for c in calls):
        return _continue_after_tools(advanced, events, router)
    return Transition(advanced, events)


def apply_tool_results(state: RunState, results: list[ToolCallUpdate], router: Router = DIRECT) -> Transition | None:
    """Several results of one step at once (the runner's memory calls): one transition, their events in order;
    None if none of them was awaited."""
    applied: Transition | None = None
    events: list[TaskEvent] = []
    for result in results:
        step = apply_tool_update(applied.state if applied is not None else state, result, router)
        if step is not None:
            events += step.events
            applied = step
    return replace(applied, events=events) if applied is not None else None


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
    if state.terminal or timer.kind == "session":
        return None
    if (expired := expire(state, now)) is not None:
        return expired
    if state.throttled and timer.kind == "step" and timer.step == state.step:
        return _retry_throttled(state, now, timing)
    if timer.kind != "step" or timer.step != state.step:
        # The run moved on since this wake-up was set (or it was set for the deadline): sleep again.
        return Transition(state, wake=_next_wake(state, now, timing))
    redrives = state.redrives + 1
    waiting = state.model_copy(update={"redrives": redrives})
    request = None
    if state.awaiting_request_id is not None and state.requested_model is not None:
        again = _sender(state)
        request = again(state, state.awaiting_request_id, state.requested_model, []).llm_request
    return Transition(
        waiting,
        llm_request=request,
        tool_calls=[*_unfinished_calls(state), *_unfinished_review(state)],
        memory_calls=_unfinished_memory_calls(state),
        wake=_next_wake(waiting, now, timing),
        redrive=redrives,
    )


def _sender(state: RunState) -> Callable[[RunState, str, str, list[TaskEvent]], Transition]:
    """What builds the request the run waits for: a summary, a classification, or a step."""
    if state.summarizing is not None:
        return _summary_request
    if state.classifying is not None:
        return _classification
    return _request


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
        if pending.remote and not pending.memory and pending.result is None and pending.tool_call_id in by_id
    ]


def _unfinished_review(state: RunState) -> list[ToolCallRequested]:
    """The review of a held input or answer, while it waits for its approver."""
    review = state.review
    if review is None or not review.requested:
        return []
    if any(c.call_id == review.call_id and c.result is None for c in state.pending_calls):
        return [_review_request(state)]
    return []


def _unfinished_memory_calls(state: RunState) -> list[MemoryCall]:
    """The memory tool calls of the current step still without a result."""
    if state.pending_message is None:
        return []
    by_id = {call.id: call for call in state.pending_message.tool_calls}
    return [
        _memory_call(state, pending.call_id, by_id[pending.tool_call_id])
        for pending in state.pending_calls
        if pending.memory and pending.result is None and pending.tool_call_id in by_id
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


def throttle(
    state: RunState, verdict: BudgetReserveReply, now: datetime, timing: RunTiming = DEFAULT_TIMING
) -> Transition | None:
    """A rate limit holds the awaited request back: the run says so (`throttled`, with the wait) and sleeps
    until the limit allows it (or its deadline, if sooner); the request is not sent. Never a failure."""
    if state.terminal:
        return None
    wait = verdict.retry_after_seconds if verdict.retry_after_seconds is not None else timing.redrive_seconds
    event = TaskThrottled(
        task_id=state.task_id,
        tenant=state.tenant,
        seq=state.next_seq,
        limit=verdict.limit or "unknown",
        wait_seconds=wait,
        step=state.step,
    )
    waiting = state.model_copy(update={"next_seq": state.next_seq + 1, "throttled": True})
    assert waiting.deadline_at is not None
    due = now + timedelta(seconds=wait)
    if waiting.deadline_at <= due:
        wake = RunTimer(task_id=state.task_id, tenant=state.tenant, due_at=waiting.deadline_at, kind="deadline")
    else:
        wake = RunTimer(task_id=state.task_id, tenant=state.tenant, due_at=due, kind="step", step=state.step)
    return Transition(waiting, [event], wake=wake)


def _retry_throttled(state: RunState, now: datetime, timing: RunTiming) -> Transition:
    """The wait of a throttled request is over: reserve it again and, if allowed, send it."""
    resumed = state.model_copy(update={"throttled": False})
    request = None
    if resumed.awaiting_request_id is not None and resumed.requested_model is not None:
        again = _sender(resumed)
        request = again(resumed, resumed.awaiting_request_id, resumed.requested_model, []).llm_request
    return Transition(resumed, llm_request=request, wake=_next_wake(resumed, now, timing))


def reject_rate_limited(state: RunState, verdict: BudgetReserveReply) -> Transition:
    """A rate limit whose policy is `reject` refused the task's first call: the submission is rejected
    (`rate_limited`) before its acceptance went out, and it leaves its session if it joined one."""
    message = verdict.error.message if verdict.error is not None else f"rate limit {verdict.limit} is reached"
    rejected = reject(state.task_id, state.tenant, ErrorCode.RATE_LIMITED, message)
    return replace(rejected, session_leave=_leave(state, [], None))


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
    state: RunState,
    status: RunStatus,
    usage: TokenUsage,
    events: list[TaskEvent],
    *,
    interrupted: bool = False,
    answer: ChatMessage | None = None,
) -> Transition:
    """The run ends: its budget is closed and the tool calls still out are withdrawn. `interrupted`: it ended
    while waiting for a step, which is aborted in the engine (best effort). A run of a session leaves it; with
    its `answer` (it completed), its turn joins the session's history."""
    ended = state.model_copy(
        update={
            "status": status,
            "usage": usage,
            "awaiting_request_id": None,
            "pending_message": None,
            "pending_calls": [],
            "summarizing": None,
            "review": None,
            "classifying": None,
            "next_seq": state.next_seq + len(events),
        }
    )
    withdrawals = [
        ToolCallWithdrawn(call_id=call.call_id, task_id=state.task_id, tenant=state.tenant, reason=f"task {status}")
        for call in state.pending_calls
        if call.remote and not call.memory and call.result is None
    ]
    abort, abort_model = None, None
    if interrupted and state.awaiting_request_id is not None and state.requested_model is not None:
        abort = LlmAbort(request_id=state.awaiting_request_id, task_id=state.task_id)
        abort_model = state.requested_model
    return Transition(
        ended,
        events,
        abort=abort,
        abort_model=abort_model,
        withdrawals=withdrawals,
        close_budget=True,
        session_leave=_leave(state, events, answer),
    )


def _leave(state: RunState, events: list[TaskEvent], answer: ChatMessage | None) -> SessionLeave | None:
    session = state.session
    if session is None:
        return None
    turn = None
    if answer is not None and not state.session_waiting:
        own = state.messages[state.turn_start :]
        kept = own if session.keep_tool_results else own[:1]
        reply = ChatMessage(role="assistant", content=answer.content)
        turn = SessionTurn(task_id=state.task_id, at=events[-1].at if events else utc_now(), messages=[*kept, reply])
    return SessionLeave(
        store=session.store,
        tenant=state.tenant,
        submitter=session.submitter,
        session_id=session.session_id,
        task_id=state.task_id,
        turn=turn,
        compaction=state.compaction,
    )
