"""The public workflow contract: runs of a multi-agent workflow (a DAG of agent tasks), their events, replays,
and the list of workflows a suite knows.

A run is submitted on `agentbus.workflows.submit.<tenant>.<submitter>` and followed on
`agentbus.workflows.events.<tenant>.<run_id>`: `accepted` (or `rejected`), then per step `step_started`,
`step_waiting` (its task waits for an approval), `step_completed` or `step_failed` (with `will_retry`), or
`step_skipped`, and one terminal event: `completed`, `failed` or `cancelled`. `seq` is 1, 2, 3... with no
gaps. Each step is an ordinary agent task, submitted as the run's submitter, with the run id and step name in
its metadata; `task_id` in the step events names it, so its own events can be followed too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier, TokenUsage, utc_now
from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter

InputType = Literal["string", "number", "integer", "boolean", "object", "array"]
StepFailurePolicy = Literal["retry", "fail", "continue"]
ConcurrencyPolicy = Literal["queue", "reject", "replace"]


class WorkflowSubmitted(BusMessage):
    """A request to run a workflow on an input. Published by any client; `Nats-Msg-Id` = run_id."""

    run_id: Identifier = Field(description="Caller-chosen id; submitting the same id again runs nothing new.")
    tenant: Identifier = Field(description="Owning tenant; must equal the tenant token of the subject.")
    workflow: Identifier = Field(description="Name of a workflow the orchestrator knows (`workflows/*.yaml`).")
    input: dict[str, Any] = Field(
        default_factory=dict, description="The workflow's inputs by name, checked against its declared inputs."
    )
    budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="Spending cap of the whole run (the workflow's `budgetUsd` when absent): the sum of its steps' "
        "costs stays within it, each step's task getting a share of what is left as its own budget.",
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="Seconds the run may take from acceptance (the workflow's `timeout` when absent); then it "
        "fails with `deadline_exceeded` and its running steps are cancelled.",
    )
    submitted_by: Identifier | None = Field(
        default=None,
        description="Who submitted. Taken from the submitter token of the subject; a body value that differs is "
        "rejected with `identity_mismatch`. Every step's task is submitted as this submitter.",
    )


class WorkflowCancelRequested(BusMessage):
    """A request to stop a run and its running steps. Has no effect on a run that already ended."""

    run_id: Identifier = Field(description="The run to cancel.")
    tenant: Identifier = Field(description="Owning tenant; must equal the tenant token of the subject.")
    reason: str | None = Field(default=None, max_length=1000, description="Why, for the audit trail.")


class WorkflowStepInfo(BaseModel):
    """A step of a workflow, as shown to people: which agent runs it and what it waits for."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    agent: str
    depends_on: list[str] = Field(default_factory=list)
    timeout_seconds: float | None = Field(default=None, description="Deadline of each of the step's tasks.")
    retries: int = Field(default=0, ge=0, description="Further attempts after a failed one.")


class _WorkflowEventBase(BusMessage):
    run_id: Identifier = Field(description="The run this event belongs to.")
    tenant: Identifier = Field(description="Owning tenant.")
    seq: int = Field(ge=1, description="Position in the run's event stream: 1, 2, 3, ... with no gaps.")
    at: datetime = Field(default_factory=utc_now, description="When the event happened (UTC).")


class WorkflowAccepted(_WorkflowEventBase):
    """The orchestrator validated the submission and started (or queued) the run."""

    kind: Literal["accepted"] = "accepted"
    workflow: Identifier
    input: dict[str, Any] = Field(default_factory=dict, description="The inputs, with their defaults filled in.")
    steps: list[WorkflowStepInfo] = Field(default_factory=list)
    budget_usd: float | None = Field(default=None, ge=0, description="The run's budget, if any.")
    deadline_at: datetime = Field(description="When the run fails with `deadline_exceeded` if it has not ended.")


class WorkflowRejected(_WorkflowEventBase):
    """The submission was invalid or refused by the workflow's concurrency limit; nothing ran. Terminal."""

    kind: Literal["rejected"] = "rejected"
    error: ErrorInfo


class WorkflowQueued(_WorkflowEventBase):
    """The workflow already runs its `maxConcurrent` runs in this tenant: this one waits for a slot."""

    kind: Literal["queued"] = "queued"
    max_concurrent: int = Field(ge=1)


class WorkflowStepStarted(_WorkflowEventBase):
    """A step's task was submitted (again, on a retry: `attempt` counts from 1)."""

    kind: Literal["step_started"] = "step_started"
    step: str
    attempt: int = Field(ge=1)
    task_id: Identifier = Field(description="The step's agent task: follow it on agentbus.tasks.events.<tenant>.<id>.")
    agent: Identifier
    budget_usd: float | None = Field(default=None, ge=0, description="The task's share of the run's budget.")


class WorkflowStepWaiting(_WorkflowEventBase):
    """A step's task waits for a human to approve a tool call: the run waits with it."""

    kind: Literal["step_waiting"] = "step_waiting"
    step: str
    attempt: int = Field(ge=1)
    task_id: Identifier
    approval_id: Identifier
    tool: str


class WorkflowStepCompleted(_WorkflowEventBase):
    """A step's task completed and its named outputs were extracted."""

    kind: Literal["step_completed"] = "step_completed"
    step: str
    attempt: int = Field(ge=1)
    task_id: Identifier
    outputs: dict[str, Any] = Field(default_factory=dict)
    cost_usd: float = Field(default=0.0, ge=0, description="Cost of the step's tasks, every attempt included.")
    usage: TokenUsage = Field(default_factory=TokenUsage)


class WorkflowStepFailed(_WorkflowEventBase):
    """An attempt of a step failed. With `will_retry` the next attempt follows; otherwise the step failed."""

    kind: Literal["step_failed"] = "step_failed"
    step: str
    attempt: int = Field(ge=1)
    task_id: Identifier | None = Field(default=None, description="None when the task could not be built.")
    error: ErrorInfo
    will_retry: bool
    cost_usd: float = Field(default=0.0, ge=0, description="Cost of the step's tasks so far.")


class WorkflowStepSkipped(_WorkflowEventBase):
    """A step did not run because a step it depends on failed (`onStepFailure: continue`)."""

    kind: Literal["step_skipped"] = "step_skipped"
    step: str
    reason: str


class WorkflowCompleted(_WorkflowEventBase):
    """Every step ended and the outputs were assembled. Terminal."""

    kind: Literal["completed"] = "completed"
    outputs: dict[str, Any] = Field(default_factory=dict)
    cost_usd: float = Field(ge=0, description="The sum of the costs of every step's tasks.")
    usage: TokenUsage = Field(default_factory=TokenUsage)
    failed_steps: list[str] = Field(default_factory=list, description="Steps that failed (`continue`).")
    skipped_steps: list[str] = Field(default_factory=list, description="Steps skipped after an upstream failure.")


class WorkflowFailed(_WorkflowEventBase):
    """The run stopped: a step failed for good, or the deadline passed. Running steps were cancelled. Terminal."""

    kind: Literal["failed"] = "failed"
    error: ErrorInfo
    cost_usd: float = Field(default=0.0, ge=0)
    usage: TokenUsage = Field(default_factory=TokenUsage)


class WorkflowCancelled(_WorkflowEventBase):
    """The run was cancelled on request, or replaced by a newer run (`policy: replace`). Terminal."""

    kind: Literal["cancelled"] = "cancelled"
    reason: str | None = None
    by: Identifier | None = Field(default=None, description="The submitter who cancelled (the subject's token).")
    cost_usd: float = Field(default=0.0, ge=0)
    usage: TokenUsage = Field(default_factory=TokenUsage)


WorkflowEventKind = Annotated[
    WorkflowAccepted
    | WorkflowRejected
    | WorkflowQueued
    | WorkflowStepStarted
    | WorkflowStepWaiting
    | WorkflowStepCompleted
    | WorkflowStepFailed
    | WorkflowStepSkipped
    | WorkflowCompleted
    | WorkflowFailed
    | WorkflowCancelled,
    Field(discriminator="kind"),
]
"""Any event on `agentbus.workflows.events.<tenant>.<run_id>`, told apart by `kind`."""


class WorkflowEvent(RootModel[WorkflowEventKind]):
    """A run's event: one of the kinds above (the payload is the event itself, not wrapped)."""


WORKFLOW_EVENT_ADAPTER: TypeAdapter[WorkflowEventKind] = TypeAdapter(WorkflowEventKind)

WORKFLOW_TERMINAL_EVENT_KINDS: frozenset[str] = frozenset({"rejected", "completed", "failed", "cancelled"})
"""After one of these a run's event stream has no further events."""


class WorkflowReplayRequest(BusMessage):
    """Ask for a run's stored events (request/reply on `agentbus.workflows.replay.<tenant>.<run_id>`)."""

    from_seq: int = Field(default=1, ge=1, description="Replay events whose `seq` is at least this.")
    limit: int = Field(default=1000, ge=1, le=10_000, description="Most events in one reply.")


class WorkflowReplayReply(BusMessage):
    """A page of a run's stored events, in order."""

    run_id: str
    tenant: str
    events: list[WorkflowEventKind] = Field(default_factory=list)
    complete: bool = Field(default=False, description="The page ends with the run's terminal event.")
    more: bool = Field(default=False, description="More stored events follow: ask again from `next_seq`.")
    next_seq: int = Field(default=1, ge=1, description="`from_seq` of the next page.")
    error: ErrorInfo | None = None


class WorkflowInputInfo(BaseModel):
    """A declared input of a workflow."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    type: InputType = "string"
    required: bool = False
    default: Any = None
    enum: list[Any] | None = None
    description: str = ""


class WorkflowInfo(BaseModel):
    """A workflow as the orchestrator loaded it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    display_name: str = ""
    description: str = ""
    inputs: list[WorkflowInputInfo] = Field(default_factory=list)
    steps: list[WorkflowStepInfo] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list, description="Names of the run's assembled outputs.")
    timeout_seconds: float = Field(description="Deadline of a run from acceptance.")
    on_step_failure: StepFailurePolicy = "fail"
    max_concurrent: int | None = Field(default=None, description="Runs at once per tenant, if limited.")
    concurrency_policy: ConcurrencyPolicy | None = None
    budget_usd: float | None = None


class WorkflowsListRequest(BusMessage):
    """Ask which workflows the orchestrator knows (request/reply on `agentbus.workflows.list.<tenant>`)."""

    name: Identifier | None = Field(default=None, description="Only this workflow.")


class WorkflowsListReply(BusMessage):
    workflows: list[WorkflowInfo] = Field(default_factory=list)
    error: ErrorInfo | None = None


class WorkflowTimer(BusMessage):
    """Wake the orchestrator for one run at `due_at`, its deadline. Published by a message schedule."""

    run_id: Identifier
    tenant: Identifier
    due_at: datetime = Field(description="When the timer fires (UTC).")


class WorkflowAdmission(BusMessage):
    """The concurrency limit of a workflow decided about a run that waited in its queue or held a slot."""

    run_id: Identifier
    tenant: Identifier
    decision: Literal["admitted", "replaced"] = Field(
        description="admitted: a slot freed up, the queued run starts; replaced: a newer run took its slot."
    )
    by_run_id: Identifier | None = Field(default=None, description="replaced: the run that took the slot.")
