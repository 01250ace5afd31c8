"""A workflow run as pure transitions: (run state, input) -> (new run state, events, tasks to submit or cancel).

No I/O here. The service persists the new state and carries out the rest; because every input is checked
against the state (is the run going? is this the current attempt's task?), applying the same input twice
produces nothing the second time.

The run: it is accepted (after a slot, when its workflow limits how many run at once), then every step whose
dependencies all completed starts as an ordinary agent task, independent steps at once. A completed task's
answer gives the step its named outputs; a failed one is retried while the step has attempts left, then the
workflow's `onStepFailure` decides: `fail` (and `retry`, once the retries are spent) ends the run failed and
cancels what still runs; `continue` marks the step failed, skips the steps that depend on it and goes on. When
no step runs or waits any more, the outputs are assembled and the run completes. Its deadline, a cancellation
or a newer run replacing it end it early, with its running steps' tasks cancelled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from agentbus.contracts.common import ErrorInfo, TokenUsage, utc_now
from agentbus.contracts.tasks import (
    TaskApprovalPending,
    TaskBudgetExceeded,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskEvent,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
)
from agentbus.contracts.workflows import (
    WorkflowAccepted,
    WorkflowCancelled,
    WorkflowCancelRequested,
    WorkflowCompleted,
    WorkflowEventKind,
    WorkflowFailed,
    WorkflowQueued,
    WorkflowRejected,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepSkipped,
    WorkflowStepStarted,
    WorkflowStepWaiting,
    WorkflowSubmitted,
    WorkflowTimer,
)
from agentbus.workflow_orchestrator.specs import WorkflowSpec, resolve_input
from agentbus.workflow_orchestrator.templates import Context, TemplateError, extract, render, split_path, task_input
from pydantic import BaseModel, ConfigDict, Field

MAX_TASK_INPUT_CHARS = 100_000
"""What a task's input may hold (the task contract's limit)."""
TASK_DEADLINE_GRACE_SECONDS = 30.0
"""A step task's own deadline outlasts its run's by this much: the run's deadline ends both (and cancels the
task), while the task's own is the backstop should no orchestrator be there to do it."""
MAX_OUTPUTS_CHARS = 256 * 1024
"""What one step's extracted outputs may weigh as JSON: the run's record must stay well under NATS's 1 MiB."""
STEP_TASK_PREFIX = "wf-"

METADATA_RUN_ID = "workflow_run_id"
METADATA_WORKFLOW = "workflow"
METADATA_STEP = "workflow_step"
METADATA_ATTEMPT = "workflow_attempt"


class RunStatus(StrEnum):
    PENDING = "pending"
    """Its workflow limits how many run at once: waiting for the limit's answer (a moment)."""
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class StepPhase(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class ErrorCode(StrEnum):
    """Codes of `rejected`, `step_failed` and `failed` events: part of the public contract."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    TENANT_MISMATCH = "tenant_mismatch"
    IDENTITY_MISMATCH = "identity_mismatch"
    UNKNOWN_WORKFLOW = "unknown_workflow"
    INVALID_INPUT = "invalid_input"
    CONCURRENCY_LIMIT = "concurrency_limit"
    STEP_FAILED = "step_failed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INPUT_ERROR = "input_error"
    """A step's input could not be built from its templates (a value not in an upstream output)."""
    OUTPUT_MISSING = "output_missing"
    """A step's answer has nothing at one of its output paths (retried: a model may answer better)."""
    OUTPUT_TOO_LARGE = "output_too_large"
    TASK_FAILED = "task_failed"
    TASK_REJECTED = "task_rejected"
    TASK_CANCELLED = "task_cancelled"
    BUDGET_EXCEEDED = "budget_exceeded"


class StepState(BaseModel):
    """One step of a run: its current attempt, and what it produced."""

    model_config = ConfigDict(frozen=True)

    name: str
    phase: StepPhase = StepPhase.PENDING
    attempt: int = 0
    task_id: str | None = Field(default=None, description="The current attempt's task.")
    task_ids: list[str] = Field(default_factory=list, description="Every attempt's task, in order.")
    started_at: datetime | None = None
    completed_at: datetime | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    cost_usd: float = Field(default=0.0, description="Cost of every attempt that ended.")
    usage: TokenUsage = Field(default_factory=TokenUsage)
    budget_usd: float | None = Field(default=None, description="The current attempt's share of the run's budget.")
    approval_id: str | None = Field(default=None, description="The approval the current attempt waits for.")


class RunState(BaseModel):
    """Everything needed to continue a run after any restart. Stored per run, written compare-and-set."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    tenant: str
    status: RunStatus
    spec: WorkflowSpec | None = Field(default=None, description="The workflow as it was when the run started.")
    submitted_by: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    nonce: str = Field(default="", description="Makes the steps' task ids unpredictable to other identities.")
    steps: list[StepState] = Field(default_factory=list)
    next_seq: int = Field(default=1, description="seq of the run's next public event.")
    budget_usd: float | None = None
    accepted_at: datetime | None = None
    deadline_at: datetime | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.REJECTED)

    @property
    def limited(self) -> bool:
        """The run takes one of its workflow's concurrency slots (or waits for one)."""
        return self.spec is not None and self.spec.concurrency is not None

    @property
    def cost_usd(self) -> float:
        return sum(step.cost_usd for step in self.steps)

    @property
    def usage(self) -> TokenUsage:
        total = TokenUsage()
        for step in self.steps:
            total = total + step.usage
        return total

    def step(self, name: str) -> StepState:
        return next(step for step in self.steps if step.name == name)

    def step_of_task(self, task_id: str) -> StepState | None:
        """The step whose current attempt is this task, while it runs."""
        return next((s for s in self.steps if s.task_id == task_id and s.phase is StepPhase.RUNNING), None)


@dataclass(frozen=True)
class TaskCancel:
    """A step's task to cancel, and as whom (the subject's submitter token)."""

    request: TaskCancelRequested
    by: str


@dataclass(frozen=True)
class Transition:
    """What applying one input did: the state to store, and what to do, in order."""

    state: RunState
    events: list[WorkflowEventKind] = field(default_factory=list)
    tasks: list[TaskSubmitted] = field(default_factory=list)
    """Step tasks to submit, as the run's submitter."""
    cancels: list[TaskCancel] = field(default_factory=list)
    acquire: bool = False
    """Ask the workflow's concurrency limit for a slot; its answer is the next transition."""
    release: bool = False
    """The run ended: give its slot (or its place in the queue) back."""
    wake: WorkflowTimer | None = None
    ended_steps: list[str] = field(default_factory=list)
    """Steps that ended in this transition: their spans are recorded."""
    ended: bool = False
    """The run ended after it was accepted: its root span is recorded."""


def step_task_id(tenant: str, run_id: str, nonce: str, step: str, attempt: int) -> str:
    """The task id of a step's attempt: deterministic, so a repeated submission is the same task, and derived
    from the run's secret nonce, so no other identity can take the id before the orchestrator submits it."""
    digest = hashlib.sha256(f"{tenant}\x00{run_id}\x00{nonce}\x00{step}\x00{attempt}".encode()).hexdigest()
    return f"{STEP_TASK_PREFIX}{digest[:40]}"


class _Emitter:
    """Collects a transition's events, numbering them from the state's next seq."""

    def __init__(self, state: RunState) -> None:
        self.first_seq = state.next_seq
        self.events: list[WorkflowEventKind] = []

    @property
    def seq(self) -> int:
        return self.first_seq + len(self.events)

    def add(self, event: WorkflowEventKind) -> None:
        self.events.append(event)


@dataclass
class _Draft:
    """A transition being built: the evolving state and everything it will do."""

    state: RunState
    now: datetime
    emitter: _Emitter
    initial: RunStatus
    tasks: list[TaskSubmitted] = field(default_factory=list)
    cancels: list[TaskCancel] = field(default_factory=list)
    ended_steps: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, state: RunState, now: datetime, initial: RunStatus | None = None) -> _Draft:
        return cls(state, now, _Emitter(state), initial or state.status)

    @property
    def spec(self) -> WorkflowSpec:
        assert self.state.spec is not None
        return self.state.spec

    def set_step(self, step: StepState) -> None:
        steps = [step if s.name == step.name else s for s in self.state.steps]
        self.state = self.state.model_copy(update={"steps": steps})

    def finish(self, wake: WorkflowTimer | None = None) -> Transition:
        """The transition; a run that ended here gives its slot back, and one that had been accepted gets its span."""
        state = self.state.model_copy(update={"next_seq": self.emitter.seq})
        ended = state.terminal and self.initial in (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)
        return Transition(
            state,
            self.emitter.events,
            tasks=self.tasks,
            cancels=self.cancels,
            release=ended and state.limited,
            wake=wake,
            ended_steps=self.ended_steps,
            ended=ended and self.initial is not RunStatus.PENDING,
        )

    def base(self) -> dict[str, Any]:
        return {"run_id": self.state.run_id, "tenant": self.state.tenant, "seq": self.emitter.seq}


# --- starting ---------------------------------------------------------------------------------------


def reject(run_id: str, tenant: str, code: ErrorCode, message: str) -> Transition:
    """A submission that cannot run. The run id is taken, so a retry of the same id is ignored too."""
    state = RunState(run_id=run_id, tenant=tenant, status=RunStatus.REJECTED, next_seq=2)
    event = WorkflowRejected(run_id=run_id, tenant=tenant, seq=1, error=ErrorInfo(code=code, message=message))
    return Transition(state, [event])


def start(
    submission: WorkflowSubmitted,
    spec: WorkflowSpec,
    nonce: str,
    *,
    now: datetime | None = None,
) -> Transition:
    """Accept a valid submission: begin it at once, or first ask its workflow's concurrency limit."""
    now = now or utc_now()
    try:
        run_input = resolve_input(spec, submission.input)
    except ValueError as exc:
        return reject(submission.run_id, submission.tenant, ErrorCode.INVALID_INPUT, str(exc))
    deadline_seconds = submission.deadline_seconds or spec.timeout
    state = RunState(
        run_id=submission.run_id,
        tenant=submission.tenant,
        status=RunStatus.PENDING,
        spec=spec,
        submitted_by=submission.submitted_by,
        input=run_input,
        nonce=nonce,
        steps=[StepState(name=step.name) for step in spec.steps],
        budget_usd=submission.budget_usd if submission.budget_usd is not None else spec.budget_usd,
        accepted_at=now,
        deadline_at=now + timedelta(seconds=deadline_seconds),
    )
    if spec.concurrency is not None:
        return Transition(state, acquire=True)
    return _begin(state, now)


def admitted(state: RunState, now: datetime | None = None) -> Transition | None:
    """The run has a slot: it begins (a queued run had its `accepted` event already)."""
    if state.status not in (RunStatus.PENDING, RunStatus.QUEUED):
        return None
    return _begin(state, now or utc_now())


def queued(state: RunState, now: datetime | None = None) -> Transition | None:
    """Every slot is taken and the policy queues: the run is accepted and waits for one."""
    if state.status is not RunStatus.PENDING:
        return None
    draft = _Draft.of(state.model_copy(update={"status": RunStatus.QUEUED}), now or utc_now(), state.status)
    _accept(draft)
    assert state.spec is not None
    assert state.spec.concurrency is not None
    draft.emitter.add(WorkflowQueued(**draft.base(), max_concurrent=state.spec.concurrency.max_concurrent))
    return draft.finish(wake=_wake(state))


def refused(state: RunState) -> Transition | None:
    """Every slot is taken and the policy rejects: the run ends `rejected` and never ran."""
    if state.status is not RunStatus.PENDING:
        return None
    assert state.spec is not None
    assert state.spec.concurrency is not None
    limit = state.spec.concurrency.max_concurrent
    event = WorkflowRejected(
        run_id=state.run_id,
        tenant=state.tenant,
        seq=state.next_seq,
        error=ErrorInfo(
            code=ErrorCode.CONCURRENCY_LIMIT,
            message=f"workflow {state.spec.name!r} already runs {limit} run(s) in this tenant (policy: reject)",
        ),
    )
    ended = state.model_copy(update={"status": RunStatus.REJECTED, "next_seq": state.next_seq + 1})
    return Transition(ended, [event])


def _wake(state: RunState) -> WorkflowTimer:
    assert state.deadline_at is not None
    return WorkflowTimer(run_id=state.run_id, tenant=state.tenant, due_at=state.deadline_at)


def _accept(draft: _Draft) -> None:
    state = draft.state
    spec = draft.spec
    assert state.deadline_at is not None
    draft.emitter.add(
        WorkflowAccepted(
            **draft.base(),
            workflow=spec.name,
            input=state.input,
            steps=spec.info().steps,
            budget_usd=state.budget_usd,
            deadline_at=state.deadline_at,
        )
    )


def _begin(state: RunState, now: datetime) -> Transition:
    accepting = state.status is RunStatus.PENDING
    # Accepted here: the span of a run that ends within this very transition is recorded all the same.
    draft = _Draft.of(state.model_copy(update={"status": RunStatus.RUNNING}), now, RunStatus.RUNNING)
    if accepting:
        _accept(draft)
    return _advance(draft, wake=_wake(state) if accepting else None)


# --- the graph --------------------------------------------------------------------------------------


def _advance(draft: _Draft, wake: WorkflowTimer | None = None) -> Transition:
    """Skip what can no longer run, start what is ready, and complete the run when nothing is left."""
    spec = draft.spec
    progressed = True
    while progressed and _going(draft):
        progressed = False
        for step_spec in spec.steps:
            if not _going(draft):
                break
            step = draft.state.step(step_spec.name)
            if step.phase is not StepPhase.PENDING:
                continue
            phases = {name: draft.state.step(name).phase for name in step_spec.depends_on}
            blocked = [name for name, phase in phases.items() if phase in (StepPhase.FAILED, StepPhase.SKIPPED)]
            if blocked:
                draft.set_step(step.model_copy(update={"phase": StepPhase.SKIPPED, "completed_at": draft.now}))
                draft.emitter.add(
                    WorkflowStepSkipped(**draft.base(), step=step.name, reason=f"step {blocked[0]!r} did not complete")
                )
                progressed = True
            elif all(phase is StepPhase.SUCCEEDED for phase in phases.values()):
                _start_step(draft, step.name)
                progressed = True
    if draft.state.terminal or any(s.phase in (StepPhase.PENDING, StepPhase.RUNNING) for s in draft.state.steps):
        return draft.finish(wake)
    return _complete(draft, wake)


def _going(draft: _Draft) -> bool:
    """Whether the run still goes: starting a step can end it (a step that fails for good with `fail`)."""
    return not draft.state.terminal


def _context(state: RunState) -> Context:
    outputs = {step.name: step.outputs for step in state.steps if step.phase is StepPhase.SUCCEEDED}
    return Context(state.input, outputs)


def _share(state: RunState, starting: str) -> float | None:
    """The budget a step's next task gets: an equal share of what is neither spent nor handed to running
    steps, among the steps still to start (this one included). What a finished task did not spend returns
    to the pool, so the run's steps together never get more than the run's budget."""
    if state.budget_usd is None:
        return None
    handed = sum(
        step.budget_usd or 0.0 for step in state.steps if step.phase is StepPhase.RUNNING and step.name != starting
    )
    left = state.budget_usd - state.cost_usd - handed
    waiting = sum(1 for step in state.steps if step.phase is StepPhase.PENDING and step.name != starting) + 1
    return max(0.0, left / waiting)


def _start_step(draft: _Draft, name: str) -> None:
    """Submit the step's next attempt; a step whose input cannot be built fails without retries."""
    state = draft.state
    step = state.step(name)
    spec_step = draft.spec.step(name)
    attempt = step.attempt + 1
    try:
        rendered = render(spec_step.input, _context(state))
    except TemplateError as exc:
        failed = step.model_copy(update={"attempt": attempt, "started_at": step.started_at or draft.now})
        draft.set_step(failed)
        _attempt_failed(draft, name, ErrorInfo(code=ErrorCode.INPUT_ERROR, message=str(exc)), retryable=False)
        return
    text = task_input(rendered)
    if len(text) > MAX_TASK_INPUT_CHARS:
        too_long = step.model_copy(update={"attempt": attempt, "started_at": step.started_at or draft.now})
        draft.set_step(too_long)
        error = ErrorInfo(
            code=ErrorCode.INPUT_ERROR,
            message=f"the step's input is {len(text)} characters; a task takes at most {MAX_TASK_INPUT_CHARS}",
        )
        _attempt_failed(draft, name, error, retryable=False)
        return
    task_id = step_task_id(state.tenant, state.run_id, state.nonce, name, attempt)
    budget = _share(state, name)
    assert state.deadline_at is not None
    remaining = max((state.deadline_at - draft.now).total_seconds(), 0.0) + TASK_DEADLINE_GRACE_SECONDS
    deadline = min(spec_step.timeout, remaining) if spec_step.timeout is not None else remaining
    draft.set_step(
        step.model_copy(
            update={
                "phase": StepPhase.RUNNING,
                "attempt": attempt,
                "task_id": task_id,
                "task_ids": [*step.task_ids, task_id],
                "started_at": step.started_at or draft.now,
                "budget_usd": budget,
                "approval_id": None,
                "error": None,
            }
        )
    )
    draft.tasks.append(
        TaskSubmitted(
            task_id=task_id,
            tenant=state.tenant,
            agent=spec_step.agent,
            input=text or "(no input)",
            budget_usd=budget,
            deadline_seconds=min(deadline, 30 * 86400),
            submitted_by=state.submitted_by,
            metadata={
                METADATA_RUN_ID: state.run_id,
                METADATA_WORKFLOW: draft.spec.name,
                METADATA_STEP: name,
                METADATA_ATTEMPT: attempt,
            },
        )
    )
    draft.emitter.add(
        WorkflowStepStarted(
            **draft.base(), step=name, attempt=attempt, task_id=task_id, agent=spec_step.agent, budget_usd=budget
        )
    )


def _attempt_failed(
    draft: _Draft,
    name: str,
    error: ErrorInfo,
    *,
    retryable: bool,
    cost_usd: float = 0.0,
    usage: TokenUsage | None = None,
) -> None:
    """An attempt failed: retry while attempts are left, else the workflow's policy decides."""
    step = draft.state.step(name)
    step = step.model_copy(
        update={
            "cost_usd": step.cost_usd + cost_usd,
            "usage": step.usage + (usage or TokenUsage()),
            "budget_usd": None,
            "approval_id": None,
            "error": error,
        }
    )
    will_retry = retryable and step.attempt <= draft.spec.retries_of(draft.spec.step(name))
    draft.emitter.add(
        WorkflowStepFailed(
            **draft.base(),
            step=name,
            attempt=step.attempt,
            task_id=step.task_id,
            error=error,
            will_retry=will_retry,
            cost_usd=step.cost_usd,
        )
    )
    if will_retry:
        draft.set_step(step)
        _start_step(draft, name)
        return
    draft.set_step(step.model_copy(update={"phase": StepPhase.FAILED, "completed_at": draft.now}))
    draft.ended_steps.append(name)
    if draft.spec.error_handling.on_step_failure != "continue":
        attempts = f"{step.attempt} attempt{'s' if step.attempt != 1 else ''}"
        failure = ErrorInfo(
            code=ErrorCode.STEP_FAILED,
            message=f"step {name!r} failed after {attempts}: {error.code}: {error.message}"[:2000],
        )
        _fail(draft, failure)


def _complete(draft: _Draft, wake: WorkflowTimer | None) -> Transition:
    state = draft.state
    outputs = render(draft.spec.output, _context(state), missing_as_null=True)
    draft.state = state.model_copy(update={"status": RunStatus.COMPLETED, "outputs": outputs})
    draft.emitter.add(
        WorkflowCompleted(
            **draft.base(),
            outputs=outputs,
            cost_usd=state.cost_usd,
            usage=state.usage,
            failed_steps=[s.name for s in state.steps if s.phase is StepPhase.FAILED],
            skipped_steps=[s.name for s in state.steps if s.phase is StepPhase.SKIPPED],
        )
    )
    return draft.finish(wake)


def _stop_running(draft: _Draft, reason: str, by: str | None) -> None:
    """Cancel every running step's task, as `by` (else as the run's submitter)."""
    who = by or draft.state.submitted_by
    for step in draft.state.steps:
        if step.phase is not StepPhase.RUNNING:
            continue
        if step.task_id is not None and who is not None:
            request = TaskCancelRequested(task_id=step.task_id, tenant=draft.state.tenant, reason=reason[:1000])
            draft.cancels.append(TaskCancel(request, who))
        draft.set_step(step.model_copy(update={"phase": StepPhase.CANCELLED, "completed_at": draft.now}))
        draft.ended_steps.append(step.name)


def _fail(draft: _Draft, error: ErrorInfo) -> None:
    _stop_running(draft, f"workflow run {draft.state.run_id} failed: {error.code}", None)
    state = draft.state
    draft.emitter.add(WorkflowFailed(**draft.base(), error=error, cost_usd=state.cost_usd, usage=state.usage))
    draft.state = state.model_copy(update={"status": RunStatus.FAILED})


# --- inputs while it runs ---------------------------------------------------------------------------


def apply_task_event(state: RunState, event: TaskEvent, now: datetime | None = None) -> Transition | None:
    """Advance the run with an event of one of its steps' tasks; None if stale, repeated or uninteresting."""
    if state.status is not RunStatus.RUNNING:
        return None
    step = state.step_of_task(event.task_id)
    if step is None:
        return None
    draft = _Draft.of(state, now or utc_now())
    if isinstance(event, TaskApprovalPending):
        if step.approval_id == event.approval_id:
            return None
        draft.set_step(step.model_copy(update={"approval_id": event.approval_id}))
        assert step.task_id is not None
        draft.emitter.add(
            WorkflowStepWaiting(
                **draft.base(),
                step=step.name,
                attempt=step.attempt,
                task_id=step.task_id,
                approval_id=event.approval_id,
                tool=event.tool,
            )
        )
        return draft.finish()
    if isinstance(event, TaskCompleted):
        _step_completed(draft, step, event)
    elif isinstance(event, TaskFailed):
        error = ErrorInfo(code=ErrorCode.TASK_FAILED, message=f"{event.error.code}: {event.error.message}")
        _attempt_failed(draft, step.name, error, retryable=True, cost_usd=event.cost_usd, usage=event.usage)
    elif isinstance(event, TaskBudgetExceeded):
        message = f"budget {event.budget}: ${event.spent_usd:.6f} spent or held of ${event.limit_usd:.6f}"
        _attempt_failed(draft, step.name, ErrorInfo(code=ErrorCode.BUDGET_EXCEEDED, message=message), retryable=False)
    elif isinstance(event, TaskCancelled):
        by = f" by {event.by}" if event.by else ""
        message = f"the step's task was cancelled{by}: {event.reason or 'no reason given'}"
        _attempt_failed(draft, step.name, ErrorInfo(code=ErrorCode.TASK_CANCELLED, message=message), retryable=False)
    elif isinstance(event, TaskRejected):
        error = ErrorInfo(code=ErrorCode.TASK_REJECTED, message=f"{event.error.code}: {event.error.message}")
        _attempt_failed(draft, step.name, error, retryable=False)
    else:
        return None
    return _advance(draft)


def _step_completed(draft: _Draft, step: StepState, event: TaskCompleted) -> None:
    spec_step = draft.spec.step(step.name)
    outputs: dict[str, Any] = {}
    try:
        for output in spec_step.output:
            outputs[output.name] = extract(event.output, split_path(output.path))
    except TemplateError as exc:
        missing = ErrorInfo(code=ErrorCode.OUTPUT_MISSING, message=f"output {output.name!r} ({output.path}): {exc}")
        _attempt_failed(draft, step.name, missing, retryable=True, cost_usd=event.cost_usd, usage=event.usage)
        return
    size = len(json.dumps(outputs, ensure_ascii=False))
    if size > MAX_OUTPUTS_CHARS:
        too_large = ErrorInfo(
            code=ErrorCode.OUTPUT_TOO_LARGE,
            message=f"the step's outputs are {size} characters as JSON; a step may keep {MAX_OUTPUTS_CHARS}",
        )
        _attempt_failed(draft, step.name, too_large, retryable=True, cost_usd=event.cost_usd, usage=event.usage)
        return
    done = step.model_copy(
        update={
            "phase": StepPhase.SUCCEEDED,
            "completed_at": draft.now,
            "outputs": outputs,
            "cost_usd": step.cost_usd + event.cost_usd,
            "usage": step.usage + event.usage,
            "budget_usd": None,
            "approval_id": None,
        }
    )
    draft.set_step(done)
    draft.ended_steps.append(step.name)
    assert done.task_id is not None
    draft.emitter.add(
        WorkflowStepCompleted(
            **draft.base(),
            step=step.name,
            attempt=done.attempt,
            task_id=done.task_id,
            outputs=outputs,
            cost_usd=done.cost_usd,
            usage=done.usage,
        )
    )


def cancel(state: RunState, request: WorkflowCancelRequested, by: str | None) -> Transition | None:
    """Stop a run and its running steps; None if it already ended."""
    if state.terminal:
        return None
    draft = _Draft.of(state, utc_now())
    reason = request.reason or "cancelled"
    _stop_running(draft, f"workflow run {state.run_id} cancelled: {reason}", by)
    draft.state = draft.state.model_copy(update={"status": RunStatus.CANCELLED})
    draft.emitter.add(
        WorkflowCancelled(
            **draft.base(), reason=request.reason, by=by, cost_usd=draft.state.cost_usd, usage=draft.state.usage
        )
    )
    return draft.finish()


def cancel_before_start(request: WorkflowCancelRequested, by: str | None) -> Transition:
    """A cancellation that overtook its submission: the run id ends cancelled and never runs."""
    state = RunState(run_id=request.run_id, tenant=request.tenant, status=RunStatus.CANCELLED, next_seq=2)
    event = WorkflowCancelled(run_id=request.run_id, tenant=request.tenant, seq=1, reason=request.reason, by=by)
    return Transition(state, [event])


def replaced(state: RunState, by_run_id: str | None) -> Transition | None:
    """A newer run took this run's slot (policy `replace`): it ends cancelled, its steps cancelled."""
    if state.terminal:
        return None
    draft = _Draft.of(state, utc_now())
    reason = f"replaced by run {by_run_id} (concurrency policy: replace)"
    _stop_running(draft, f"workflow run {state.run_id} {reason}", None)
    draft.state = draft.state.model_copy(update={"status": RunStatus.CANCELLED})
    draft.emitter.add(
        WorkflowCancelled(**draft.base(), reason=reason, cost_usd=draft.state.cost_usd, usage=draft.state.usage)
    )
    return draft.finish()


def expire(state: RunState, now: datetime) -> Transition | None:
    """End a run whose deadline passed; None if it ended already or the deadline is still ahead."""
    if state.terminal or state.deadline_at is None or now < state.deadline_at:
        return None
    draft = _Draft.of(state, now)
    message = f"the workflow run did not finish by its deadline {state.deadline_at.isoformat()}"
    _fail(draft, ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message=message))
    return draft.finish()


def wake(state: RunState, timer: WorkflowTimer, now: datetime) -> Transition | None:
    """The run's timer fired: end it at its deadline; a timer that fired early is set again."""
    if state.terminal:
        return None
    if (expired := expire(state, now)) is not None:
        return expired
    return Transition(state, wake=_wake(state))
