"""The public task contract: submissions, cancellations and the per-task event stream."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier, TokenUsage, utc_now
from agentbus.contracts.rag import RetrievedChunk
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class TaskSubmitted(BusMessage):
    """A request to run an agent on an input. Published by any client; `Nats-Msg-Id` = task_id."""

    task_id: Identifier = Field(description="Caller-chosen id; submitting the same id again runs nothing new.")
    tenant: Identifier = Field(description="Owning tenant; must equal the tenant token of the subject.")
    agent: Identifier = Field(description="Name of an agent spec known to the runner.")
    input: str = Field(min_length=1, max_length=100_000, description="The task, in natural language.")
    budget_usd: float | None = Field(
        default=None, ge=0, description="Spending cap for this task; the agent's default when absent."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Opaque caller data, echoed nowhere.")
    submitted_by: Identifier | None = Field(
        default=None,
        description="Who submitted. Taken from the submitter token of the subject (which nats-server binds to "
        "the submitter's user); a body value that differs is rejected with `identity_mismatch`.",
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="Seconds the task may take from acceptance; after that it fails with `deadline_exceeded`. "
        "The agent's `timeout_seconds` (or the suite's default) when absent.",
    )
    session_id: Identifier | None = Field(
        default=None,
        description="A conversation this task continues: it sees the session's history (earlier inputs and "
        "answers) before its own input, and runs after the session's running task ends (or is rejected "
        "`session_busy`, by the memory store's policy). A session belongs to its tenant and its submitter: "
        "the same id under another tenant or submitter is another session. The agent needs a memory store "
        "(else `session_unsupported`).",
    )


class TaskCancelRequested(BusMessage):
    """A request to stop a running task. Has no effect on a task that already ended."""

    task_id: Identifier = Field(description="The task to cancel.")
    tenant: Identifier = Field(description="Owning tenant; must equal the tenant token of the subject.")
    reason: str | None = Field(default=None, max_length=1000, description="Why, for the audit trail.")


class _TaskEventBase(BusMessage):
    task_id: Identifier = Field(description="The task this event belongs to.")
    tenant: Identifier = Field(description="Owning tenant.")
    seq: int = Field(
        ge=1, description="Position in the task's event stream: 1, 2, 3, ... with no gaps (token events excepted)."
    )
    at: datetime = Field(default_factory=utc_now, description="When the event happened (UTC).")


class TaskAccepted(_TaskEventBase):
    """The runner validated the submission and started the run."""

    kind: Literal["accepted"] = "accepted"
    agent: Identifier = Field(description="Agent that runs the task.")
    model: str = Field(description="Model the agent uses.")
    max_steps: int = Field(ge=1, description="Most LLM steps this run may take.")
    budget_usd: float | None = Field(default=None, ge=0, description="Effective budget for the task.")
    session_id: Identifier | None = Field(default=None, description="The session the task continues, if any.")
    queued: bool = Field(
        default=False,
        description="The session runs another task: this one starts when that one has ended (it may wait for "
        "several, first come first served).",
    )


class TaskRejected(_TaskEventBase):
    """The submission was invalid; nothing ran."""

    kind: Literal["rejected"] = "rejected"
    error: ErrorInfo


class ToolCallSummary(BaseModel):
    """A tool call the model asked for in a step, as shown to people following the task."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(description="Tool-call id, unique within the task.")
    name: str = Field(description="Tool name.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Arguments the model passed.")


class TaskStep(_TaskEventBase):
    """One LLM step finished: what the model asked for and what it cost."""

    kind: Literal["step"] = "step"
    step: int = Field(ge=1, description="1-based index of the LLM step within the run.")
    tool_calls: list[ToolCallSummary] = Field(default_factory=list, description="Tools called in this step.")
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Tokens of this step.")


class TaskToken(_TaskEventBase):
    """A chunk of generated text, streamed by the inference-worker while a step runs.

    Token events are published beside the runner's events, so they do not take part in the gap-free
    numbering: `seq` repeats the seq of the last event before the step began and `chunk` counts from 1
    within the step. The step's `step` event, which follows, carries the whole text.
    """

    kind: Literal["token"] = "token"
    step: int = Field(ge=1, description="The LLM step the text belongs to.")
    chunk: int = Field(default=1, ge=1, description="Position of this chunk within the step: 1, 2, 3, ...")
    text: str = Field(description="The chunk of text (several tokens).")


class TaskApprovalPending(_TaskEventBase):
    """The run waits for a human to approve a tool call."""

    kind: Literal["approval_pending"] = "approval_pending"
    approval_id: Identifier
    tool: str
    expires_at: datetime | None = None


class TaskApprovalResolved(_TaskEventBase):
    """A pending approval was approved, denied or expired."""

    kind: Literal["approval_resolved"] = "approval_resolved"
    approval_id: Identifier
    outcome: Literal["approved", "denied", "expired"]
    by: Identifier | None = None


class TaskCompleted(_TaskEventBase):
    """The agent answered. Terminal."""

    kind: Literal["completed"] = "completed"
    output: str = Field(description="The agent's final answer.")
    usage: TokenUsage = Field(description="Tokens of the whole run.")
    cost_usd: float = Field(ge=0, description="Cost of the whole run in US dollars.")
    steps: int = Field(ge=1, description="LLM steps the run took.")
    citations: list[RetrievedChunk] = Field(
        default_factory=list, description="Knowledge-base chunks the run retrieved, as sources of the output."
    )


class TaskFailed(_TaskEventBase):
    """The run stopped on an error (step limit, model error, ...). Terminal."""

    kind: Literal["failed"] = "failed"
    error: ErrorInfo
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Tokens spent before failing.")
    cost_usd: float = Field(default=0.0, ge=0, description="Cost spent before failing.")


class TaskCancelled(_TaskEventBase):
    """The run was cancelled on request. Terminal."""

    kind: Literal["cancelled"] = "cancelled"
    reason: str | None = None
    by: Identifier | None = Field(default=None, description="The submitter who cancelled (the subject's token).")


class GuardrailFinding(BaseModel):
    """One thing a guardrail check found: where and what kind, never the matched text itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    policy: str = Field(description="The guardrail policy (`config/guardrails.yaml`) whose check found it.")
    check: str = Field(description="The check's name (its detector's, unless the policy names it).")
    detector: str = Field(description="secrets, personal_data, deny_list, max_length.")
    action: Literal["block", "redact", "require_approval"] = Field(description="What the check does with it.")
    kind: str = Field(description="What was found, e.g. 'aws_access_key', 'email', 'card', 'pattern 0', 'too_long'.")
    field: str | None = Field(default=None, description="tool_arguments: the argument's path, e.g. 'body'.")
    tool: str | None = Field(default=None, description="tool_arguments: the tool called.")


class TaskGuardrail(_TaskEventBase):
    """Guardrail checks found something in one stage of the task: its input, a step's tool-call arguments, or
    the model's output. `action` is what was done: `block` (the task fails `guardrail_blocked`, or the tool call
    returns an error the model reads), `redact` (the text went on masked), `require_approval` (the step waits
    in the approval inbox). The matched text is never in the event."""

    kind: Literal["guardrail"] = "guardrail"
    stage: Literal["input", "tool_arguments", "output"] = Field(description="Where the text was checked.")
    action: Literal["block", "redact", "require_approval"] = Field(description="The strongest action of the findings.")
    step: int = Field(default=0, ge=0, description="The LLM step of a tool call or output; 0 for the input.")
    findings: list[GuardrailFinding] = Field(description="Everything the checks found in this stage.")


class TaskBudgetExceeded(_TaskEventBase):
    """The run was stopped because a budget would be exceeded. Terminal."""

    kind: Literal["budget_exceeded"] = "budget_exceeded"
    budget: str = Field(description="Which budget: e.g. 'task:<id>', 'agent:<name>', 'tenant:<tenant>'.")
    limit_usd: float = Field(ge=0, description="The budget's hard limit.")
    spent_usd: float = Field(ge=0, description="What the budget had spent and held reserved before the call.")
    requested_usd: float | None = Field(
        default=None, ge=0, description="The estimated cost of the call that was refused: what it needed."
    )


class TaskThrottled(_TaskEventBase):
    """A step waits for a rate limit (requests or tokens per minute, concurrent tasks): it is made once the
    limit allows, never failed for it. Not terminal; a step may be throttled more than once."""

    kind: Literal["throttled"] = "throttled"
    limit: str = Field(description="The limit that holds the step back, e.g. 'tenant:acme:requests_per_minute'.")
    wait_seconds: float = Field(ge=0, description="How long the step waits before it asks again.")
    step: int = Field(default=0, ge=0, description="The LLM step that waits.")


TaskEvent = Annotated[
    TaskAccepted
    | TaskRejected
    | TaskStep
    | TaskToken
    | TaskApprovalPending
    | TaskApprovalResolved
    | TaskGuardrail
    | TaskCompleted
    | TaskFailed
    | TaskCancelled
    | TaskBudgetExceeded
    | TaskThrottled,
    Field(discriminator="kind"),
]
"""Any event on `agentbus.tasks.events.<tenant>.<task_id>`, told apart by `kind`."""

TASK_EVENT_ADAPTER: TypeAdapter[TaskEvent] = TypeAdapter(TaskEvent)

TERMINAL_EVENT_KINDS: frozenset[str] = frozenset({"rejected", "completed", "failed", "cancelled", "budget_exceeded"})
"""After one of these a task's event stream has no further events."""


class TaskReplayRequest(BusMessage):
    """Ask for a task's stored events (request/reply on `agentbus.tasks.replay.<tenant>.<task_id>`).

    Identities that may not create JetStream consumers read a task's history this way: the subject names
    the tenant, so nats-server decides who may ask.
    """

    from_seq: int = Field(default=1, ge=1, description="Replay events whose `seq` is at least this.")
    limit: int = Field(default=1000, ge=1, le=10_000, description="Most events in one reply.")


class TaskReplayReply(BusMessage):
    """A page of a task's stored events, in the order they were published (token events included)."""

    task_id: str
    tenant: str
    events: list[TaskEvent] = Field(default_factory=list)
    complete: bool = Field(default=False, description="The page ends with the task's terminal event.")
    more: bool = Field(default=False, description="More stored events follow: ask again from `next_seq`.")
    next_seq: int = Field(default=1, ge=1, description="`from_seq` of the next page.")
    error: ErrorInfo | None = None
