"""THE registry: every stream, subject, message type, durable consumer, KV bucket and header of agentbus.

Nothing else in the code base spells a subject, stream, durable or header name. The bootstrap
(`agentbus streams apply`) creates or updates exactly what is declared here, and deployment manifests
and tests read their names from here too.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from enum import StrEnum

from agentbus.contracts.approvals import (
    ApprovalDecision,
    ApprovalDecisionVerdict,
    ApprovalRequested,
    ApprovalResolved,
    ApprovalsListReply,
    ApprovalsListRequest,
)
from agentbus.contracts.budget import (
    BudgetAlert,
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    RateLimitsReply,
    RateLimitsRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.llm import LlmAbort, LlmRequest, LlmResult
from agentbus.contracts.rag import DocumentsDelete, DocumentsIngest, SearchReply, SearchRequest
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
from agentbus.contracts.tasks import TaskCancelRequested, TaskReplayReply, TaskReplayRequest, TaskSubmitted
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate, ToolCallWithdrawn
from agentbus.contracts.usage import UsageRecorded
from agentbus.contracts.workflows import (
    WorkflowAdmission,
    WorkflowCancelRequested,
    WorkflowEvent,
    WorkflowReplayReply,
    WorkflowReplayRequest,
    WorkflowsListReply,
    WorkflowsListRequest,
    WorkflowSubmitted,
    WorkflowTimer,
)
from pydantic import BaseModel

SUBJECT_ROOT = "agentbus"
_TOKEN = re.compile(r"\{([a-z_]+)\}")
DURABLE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Header(StrEnum):
    """NATS header names agentbus reads or writes."""

    MSG_ID = "Nats-Msg-Id"
    TRACEPARENT = "traceparent"
    SCHEDULE = "Nats-Schedule"
    """A message schedule (`@at <RFC 3339 time>`): the server publishes the message to its target then."""
    SCHEDULE_TARGET = "Nats-Schedule-Target"


class Retention(StrEnum):
    """How a stream keeps messages: until acked once (work queue) or by age and size (limits)."""

    WORK_QUEUE = "workqueue"
    LIMITS = "limits"


@dataclass(frozen=True)
class SubjectSpec:
    """A subject pattern such as `agentbus.tasks.submit.{tenant}`, its payload type and its stream.

    A subject with no stream is core NATS request/reply (`reply` is the answer's type) or a best-effort
    notice: JetStream must not capture it, or the stream's ack would answer the request.
    """

    pattern: str
    message: type[BaseModel] | None
    stream: str | None
    public: bool
    description: str
    reply: type[BaseModel] | None = None

    @property
    def tokens(self) -> tuple[str, ...]:
        """Names of the variable tokens, in order."""
        return tuple(_TOKEN.findall(self.pattern))

    @property
    def wildcard(self) -> str:
        """The pattern with every variable token replaced by `*`: what a subscriber filters on."""
        return _TOKEN.sub("*", self.pattern)

    def format(self, **tokens: str) -> str:
        """The concrete subject. Each token must be a single subject token (no dots, spaces or wildcards)."""
        for name, value in tokens.items():
            if not value or any(c in value for c in ". *>\t\r\n"):
                raise ValueError(f"{name}={value!r} is not a valid subject token")
        return self.pattern.format(**tokens)

    def parse(self, subject: str) -> dict[str, str]:
        """The variable tokens of a concrete subject, or ValueError if it does not match the pattern."""
        parts = subject.split(".")
        pattern_parts = self.pattern.split(".")
        if len(parts) != len(pattern_parts):
            raise ValueError(f"subject {subject!r} does not match {self.pattern!r}")
        tokens: dict[str, str] = {}
        for part, expected in zip(parts, pattern_parts, strict=True):
            match = _TOKEN.fullmatch(expected)
            if match:
                tokens[match.group(1)] = part
            elif part != expected:
                raise ValueError(f"subject {subject!r} does not match {self.pattern!r}")
        return tokens


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream and the limits it keeps messages under."""

    name: str
    subjects: tuple[str, ...]
    retention: Retention
    description: str
    max_age_seconds: float = 0.0
    max_bytes: int = -1
    duplicate_window_seconds: float = 7200.0
    max_msg_size: int = 1024 * 1024
    allow_msg_schedules: bool = False
    """Messages may carry a schedule: stored now, published to their target subject when due."""


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: who reads what, and when a message is given up on.

    Two kinds of failure are told apart. A dependency that is unavailable (the accountant, a database,
    NATS itself) is waited for: the message is redelivered with exponential backoff and jitter between
    `dependency_retry_first_seconds` and `dependency_retry_max_seconds`, for as long as it takes (what
    bounds a task is its deadline, not a delivery count). Any other failure is retried after
    `retry_delay_seconds`, and after `max_deliver` deliveries the message goes to the dead-letter stream.
    The server itself never gives up (its max_deliver is unlimited): the consumer runtime decides.
    """

    durable: str
    stream: str
    filter_subject: str
    service: str
    description: str
    ack_wait_seconds: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000
    backoff_seconds: tuple[float, ...] = field(default=())
    retry_delay_seconds: float = 1.0
    """Delay of the nak that follows a failure that is not a dependency outage."""
    dependency_retry_first_seconds: float = 0.5
    dependency_retry_max_seconds: float = 30.0


@dataclass(frozen=True)
class KeyValueSpec:
    """A JetStream key-value bucket."""

    bucket: str
    description: str
    history: int = 1
    max_value_size: int = 1024 * 1024


class Service(StrEnum):
    """The services of the suite, as named in deployments."""

    AGENT_RUNNER = "agent-runner"
    INFERENCE_WORKER = "inference-worker"
    TOOL_EXECUTOR = "tool-executor"
    RETRIEVER = "retriever"
    COST_ACCOUNTANT = "cost-accountant"
    TRACE_EXPORTER = "trace-exporter"
    GATEWAY = "gateway"
    """The web console and HTTP API: acts on the bus as each logged-in identity's own NATS user."""
    WORKFLOW_ORCHESTRATOR = "workflow-orchestrator"


# --- streams -------------------------------------------------------------------------------------

# Streams that people and applications publish to keep the shortest de-duplication window the server allows:
# JetStream de-duplicates across a whole stream, so a message id one identity can predict would let it drop
# another identity's message. Their consumers are idempotent on the ids inside the messages instead (a task
# id is taken by its first submission; a decision resolves an approval once).
PUBLIC_INPUT_DUPLICATE_WINDOW_SECONDS = 0.1

TASKS = StreamSpec(
    name="AGENTBUS_TASKS",
    subjects=("agentbus.tasks.submit.*.*", "agentbus.tasks.cancel.*.*"),
    retention=Retention.WORK_QUEUE,
    description="Task submissions and cancellations, each consumed once by the agent-runner.",
    max_age_seconds=7 * 86400,
    duplicate_window_seconds=PUBLIC_INPUT_DUPLICATE_WINDOW_SECONDS,
)
TASK_EVENTS = StreamSpec(
    name="AGENTBUS_TASK_EVENTS",
    subjects=("agentbus.tasks.events.*.*",),
    retention=Retention.LIMITS,
    description="Every task's public event stream, replayable from seq 1.",
    max_age_seconds=30 * 86400,
)
APPROVALS = StreamSpec(
    name="AGENTBUS_APPROVALS",
    subjects=("agentbus.approvals.pending.*", "agentbus.approvals.resolved.*"),
    retention=Retention.LIMITS,
    description="Approval requests and outcomes, replayable for approvers who connect late.",
    max_age_seconds=30 * 86400,
)
APPROVAL_DECISIONS = StreamSpec(
    name="AGENTBUS_APPROVAL_DECISIONS",
    subjects=("agentbus.approvals.decisions.*.*",),
    retention=Retention.WORK_QUEUE,
    description="Approvers' decisions, each consumed once by the tool-executor.",
    max_age_seconds=30 * 86400,
    duplicate_window_seconds=PUBLIC_INPUT_DUPLICATE_WINDOW_SECONDS,
)
RAG_INGEST = StreamSpec(
    name="AGENTBUS_RAG_INGEST",
    subjects=("agentbus.rag.ingest.*.*", "agentbus.rag.delete.*.*"),
    retention=Retention.WORK_QUEUE,
    description="Document batches to upsert into, or delete from, a tenant's knowledge base.",
    max_age_seconds=7 * 86400,
    max_msg_size=8 * 1024 * 1024,
    duplicate_window_seconds=PUBLIC_INPUT_DUPLICATE_WINDOW_SECONDS,
)
LLM_REQUESTS = StreamSpec(
    name="AGENTBUS_LLM_REQUESTS",
    subjects=("agentbus.llm.requests.*",),
    retention=Retention.WORK_QUEUE,
    description="One LLM step to generate, on the subject of its model.",
    max_age_seconds=86400,
    max_msg_size=4 * 1024 * 1024,
)
LLM_RESULTS = StreamSpec(
    name="AGENTBUS_LLM_RESULTS",
    subjects=("agentbus.llm.results.*",),
    retention=Retention.WORK_QUEUE,
    description="Generated steps, back to the agent-runner.",
    max_age_seconds=86400,
    max_msg_size=4 * 1024 * 1024,
)
USAGE = StreamSpec(
    name="AGENTBUS_USAGE",
    subjects=("agentbus.usage.*.*",),
    retention=Retention.LIMITS,
    description="Billable usage from every service, for the cost ledger.",
    max_age_seconds=30 * 86400,
)
TOOL_CALLS = StreamSpec(
    name="AGENTBUS_TOOL_CALLS",
    subjects=("agentbus.tools.calls.*", "agentbus.tools.withdrawals.*"),
    retention=Retention.WORK_QUEUE,
    description="Tool calls for the tool-executor, and withdrawals of calls whose task ended.",
    max_age_seconds=30 * 86400,
    max_msg_size=4 * 1024 * 1024,
)
TOOL_UPDATES = StreamSpec(
    name="AGENTBUS_TOOL_UPDATES",
    subjects=("agentbus.tools.updates.*",),
    retention=Retention.WORK_QUEUE,
    description="Approval progress and results of tool calls, back to the agent-runner.",
    max_age_seconds=30 * 86400,
    max_msg_size=4 * 1024 * 1024,
)
RUN_TIMERS = StreamSpec(
    name="AGENTBUS_RUN_TIMERS",
    subjects=("agentbus.runs.timers.*", "agentbus.runs.schedules.*.*"),
    retention=Retention.WORK_QUEUE,
    description=(
        "Run timers. Each run keeps one schedule (its next wake-up: the deadline or a step re-drive); the server "
        "publishes it as a timer when due, and the runner acts on it. A new schedule of a run replaces the last."
    ),
    max_age_seconds=31 * 86400,
    allow_msg_schedules=True,
)
BUDGET_ALERTS = StreamSpec(
    name="AGENTBUS_BUDGET_ALERTS",
    subjects=("agentbus.budget.alerts.*",),
    retention=Retention.LIMITS,
    description="Budgets that crossed their soft limit.",
    max_age_seconds=90 * 86400,
)
SPANS = StreamSpec(
    name="AGENTBUS_SPANS",
    subjects=("agentbus.spans.*",),
    retention=Retention.LIMITS,
    description=(
        "Span events for the trace-exporter. They wait here while the trace backend is down: up to 7 days or "
        "1 GiB, whichever comes first, then the oldest are discarded."
    ),
    max_age_seconds=7 * 86400,
    max_bytes=1024 * 1024 * 1024,
)
DEAD_LETTERS = StreamSpec(
    name="AGENTBUS_DEAD_LETTERS",
    subjects=("agentbus.deadletter.*.*",),
    retention=Retention.LIMITS,
    description="Messages given up on, with their error and origin, kept for inspection and replay.",
    max_age_seconds=30 * 86400,
    max_msg_size=8 * 1024 * 1024 + 64 * 1024,
)
WORKFLOWS = StreamSpec(
    name="AGENTBUS_WORKFLOWS",
    subjects=("agentbus.workflows.submit.*.*", "agentbus.workflows.cancel.*.*"),
    retention=Retention.WORK_QUEUE,
    description="Workflow run submissions and cancellations, each consumed once by the workflow-orchestrator.",
    max_age_seconds=7 * 86400,
    duplicate_window_seconds=PUBLIC_INPUT_DUPLICATE_WINDOW_SECONDS,
)
WORKFLOW_EVENTS = StreamSpec(
    name="AGENTBUS_WORKFLOW_EVENTS",
    subjects=("agentbus.workflows.events.*.*",),
    retention=Retention.LIMITS,
    description="Every workflow run's public event stream, replayable from seq 1.",
    max_age_seconds=30 * 86400,
)
WORKFLOW_SIGNALS = StreamSpec(
    name="AGENTBUS_WORKFLOW_SIGNALS",
    subjects=("agentbus.workflows.schedules.*.*", "agentbus.workflows.timers.*", "agentbus.workflows.admissions.*"),
    retention=Retention.WORK_QUEUE,
    description=(
        "The orchestrator's own signals: each run's deadline, scheduled when the run is accepted and published as a "
        "timer when due, and the admissions its workflow's concurrency limit decides for queued or replaced runs."
    ),
    max_age_seconds=31 * 86400,
    allow_msg_schedules=True,
)

STREAMS: tuple[StreamSpec, ...] = (
    TASKS,
    TASK_EVENTS,
    APPROVALS,
    APPROVAL_DECISIONS,
    RAG_INGEST,
    LLM_REQUESTS,
    LLM_RESULTS,
    USAGE,
    TOOL_CALLS,
    TOOL_UPDATES,
    RUN_TIMERS,
    BUDGET_ALERTS,
    SPANS,
    DEAD_LETTERS,
    WORKFLOWS,
    WORKFLOW_EVENTS,
    WORKFLOW_SIGNALS,
)

# --- subjects ------------------------------------------------------------------------------------

TASK_SUBMIT = SubjectSpec(
    "agentbus.tasks.submit.{tenant}.{submitter}",
    TaskSubmitted,
    TASKS.name,
    True,
    "Submit an agent task. The last token is the submitter, bound to the submitter's user by nats-server.",
)
TASK_CANCEL = SubjectSpec(
    "agentbus.tasks.cancel.{tenant}.{submitter}",
    TaskCancelRequested,
    TASKS.name,
    True,
    "Cancel a running task; the last token is the submitter who cancels.",
)
TASK_REPLAY = SubjectSpec(
    "agentbus.tasks.replay.{tenant}.{task_id}",
    TaskReplayRequest,
    None,
    True,
    "A task's stored events, from a given seq (request/reply).",
    reply=TaskReplayReply,
)
TASK_EVENT = SubjectSpec(
    "agentbus.tasks.events.{tenant}.{task_id}",
    None,  # a union of event types: see agentbus.contracts.tasks.TaskEvent
    TASK_EVENTS.name,
    True,
    "A task's events: accepted, step, token, ..., then one terminal event.",
)
APPROVAL_PENDING = SubjectSpec(
    "agentbus.approvals.pending.{tenant}",
    ApprovalRequested,
    APPROVALS.name,
    True,
    "Tool calls waiting for a human decision.",
)
APPROVAL_DECISION = SubjectSpec(
    "agentbus.approvals.decisions.{tenant}.{approver}",
    ApprovalDecision,
    APPROVAL_DECISIONS.name,
    True,
    "An approver's decision; each approver may publish only on their own token.",
)
APPROVAL_RESOLVED = SubjectSpec(
    "agentbus.approvals.resolved.{tenant}",
    ApprovalResolved,
    APPROVALS.name,
    True,
    "How each approval ended: approved, denied or expired.",
)
APPROVAL_VERDICT = SubjectSpec(
    "agentbus.approvals.verdicts.{tenant}.{approver}",
    ApprovalDecisionVerdict,
    None,
    True,
    "What the tool-executor made of each decision (accepted, or refused and why), to the approver who sent it.",
)
APPROVALS_LIST = SubjectSpec(
    "agentbus.approvals.list.{tenant}",
    ApprovalsListRequest,
    None,
    True,
    "A tenant's pending (and, on request, resolved) approvals (request/reply).",
    reply=ApprovalsListReply,
)
RAG_INGEST_DOCUMENTS = SubjectSpec(
    "agentbus.rag.ingest.{tenant}.{submitter}",
    DocumentsIngest,
    RAG_INGEST.name,
    True,
    "Upsert documents by id; the last token is the submitter who ingests.",
)
LLM_REQUEST = SubjectSpec(
    "agentbus.llm.requests.{model}", LlmRequest, LLM_REQUESTS.name, False, "One LLM step for a model."
)
LLM_RESULT = SubjectSpec("agentbus.llm.results.{tenant}", LlmResult, LLM_RESULTS.name, False, "A generated LLM step.")
USAGE_RECORDED = SubjectSpec(
    "agentbus.usage.{partition}.{tenant}",
    UsageRecorded,
    USAGE.name,
    False,
    "A billable usage record, on its tenant's budget partition (see `budget_partition`).",
)
RAG_DELETE_DOCUMENTS = SubjectSpec(
    "agentbus.rag.delete.{tenant}.{submitter}",
    DocumentsDelete,
    RAG_INGEST.name,
    True,
    "Delete documents by id; the last token is the submitter who deletes.",
)
RAG_SEARCH = SubjectSpec(
    "agentbus.retrieval.search.{tenant}",
    SearchRequest,
    None,
    False,
    "Search a tenant's knowledge base (request/reply).",
    reply=SearchReply,
)
TOOL_CALL = SubjectSpec(
    "agentbus.tools.calls.{tenant}", ToolCallRequested, TOOL_CALLS.name, False, "A tool call to execute."
)
TOOL_WITHDRAW = SubjectSpec(
    "agentbus.tools.withdrawals.{tenant}",
    ToolCallWithdrawn,
    TOOL_CALLS.name,
    False,
    "A call whose task ended: never run it, expire its pending approval.",
)
RUN_SCHEDULE = SubjectSpec(
    "agentbus.runs.schedules.{tenant}.{task_id}",
    RunTimer,
    RUN_TIMERS.name,
    False,
    "A run's next wake-up, scheduled (header Nats-Schedule) to be published on its timer subject when due.",
)
RUN_TIMER = SubjectSpec(
    "agentbus.runs.timers.{tenant}", RunTimer, RUN_TIMERS.name, False, "A run's timer, published when due."
)
TOOL_UPDATE = SubjectSpec(
    "agentbus.tools.updates.{tenant}",
    ToolCallUpdate,
    TOOL_UPDATES.name,
    False,
    "Approval progress or the result of a tool call.",
)
LLM_ABORT = SubjectSpec(
    "agentbus.llm.abort.{model}", LlmAbort, None, False, "Stop generating a cancelled task's request (best effort)."
)
BUDGET_RESERVE = SubjectSpec(
    "agentbus.budget.reserve.{partition}.{tenant}",
    BudgetReserveRequest,
    None,
    False,
    "Reserve the estimated cost of a call before making it (request/reply).",
    reply=BudgetReserveReply,
)
BUDGET_RELEASE = SubjectSpec(
    "agentbus.budget.release.{partition}.{tenant}",
    BudgetReleaseRequest,
    None,
    False,
    "Close a finished task: release its unused reservations, refuse later ones (request/reply).",
    reply=BudgetReserveReply,
)
TASK_COST = SubjectSpec(
    "agentbus.budget.cost.{partition}.{tenant}",
    TaskCostRequest,
    None,
    False,
    "The priced cost of a task's usage (request/reply).",
    reply=TaskCostReply,
)
RATE_LIMITS = SubjectSpec(
    "agentbus.limits.show.{partition}.{tenant}",
    RateLimitsRequest,
    None,
    False,
    "A tenant's rate buckets in the current window, and its open tasks (request/reply).",
    reply=RateLimitsReply,
)
COST_REPORT = SubjectSpec(
    "agentbus.cost.report",
    CostReportRequest,
    None,
    False,
    "A cost report grouped by tenant, task, agent, model or day (request/reply).",
    reply=CostReportReply,
)
BUDGET_ALERT = SubjectSpec(
    "agentbus.budget.alerts.{tenant}", BudgetAlert, BUDGET_ALERTS.name, True, "A budget crossed its soft limit."
)
SPAN = SubjectSpec(
    "agentbus.spans.{service}",
    SpanRecorded,
    SPANS.name,
    False,
    "A finished span of some service, or a SpanBatch of them (decode with `agentbus.contracts.spans.spans_in`).",
)
DEAD_LETTER = SubjectSpec(
    "agentbus.deadletter.{stream}.{consumer}",
    DeadLetter,
    DEAD_LETTERS.name,
    False,
    "A message a consumer gave up on.",
)
WORKFLOW_SUBMIT = SubjectSpec(
    "agentbus.workflows.submit.{tenant}.{submitter}",
    WorkflowSubmitted,
    WORKFLOWS.name,
    True,
    "Run a workflow. The last token is the submitter, bound by nats-server; every step's task is submitted as them.",
)
WORKFLOW_CANCEL = SubjectSpec(
    "agentbus.workflows.cancel.{tenant}.{submitter}",
    WorkflowCancelRequested,
    WORKFLOWS.name,
    True,
    "Cancel a workflow run and its running steps; the last token is the submitter who cancels.",
)
WORKFLOW_EVENT = SubjectSpec(
    "agentbus.workflows.events.{tenant}.{run_id}",
    WorkflowEvent,
    WORKFLOW_EVENTS.name,
    True,
    "A workflow run's events: accepted, step_started, step_completed, ..., then one terminal event.",
)
WORKFLOW_REPLAY = SubjectSpec(
    "agentbus.workflows.replay.{tenant}.{run_id}",
    WorkflowReplayRequest,
    None,
    True,
    "A workflow run's stored events, from a given seq (request/reply).",
    reply=WorkflowReplayReply,
)
WORKFLOWS_LIST = SubjectSpec(
    "agentbus.workflows.list.{tenant}",
    WorkflowsListRequest,
    None,
    True,
    "The workflows the orchestrator knows: inputs, steps, limits (request/reply).",
    reply=WorkflowsListReply,
)
WORKFLOW_SCHEDULE = SubjectSpec(
    "agentbus.workflows.schedules.{tenant}.{run_id}",
    WorkflowTimer,
    WORKFLOW_SIGNALS.name,
    False,
    "A workflow run's deadline, scheduled (header Nats-Schedule) to be published on its timer subject when due.",
)
WORKFLOW_TIMER = SubjectSpec(
    "agentbus.workflows.timers.{tenant}",
    WorkflowTimer,
    WORKFLOW_SIGNALS.name,
    False,
    "A workflow run's deadline, published when due.",
)
WORKFLOW_ADMISSION = SubjectSpec(
    "agentbus.workflows.admissions.{tenant}",
    WorkflowAdmission,
    WORKFLOW_SIGNALS.name,
    False,
    "A queued run admitted, or a running one replaced, by its workflow's concurrency limit.",
)

SESSIONS_LIST = SubjectSpec(
    "agentbus.sessions.list.{tenant}.{submitter}",
    SessionsListRequest,
    None,
    True,
    "The submitter's sessions in the tenant (request/reply); the last token is the submitter, bound by nats-server.",
    reply=SessionsListReply,
)
SESSION_SHOW = SubjectSpec(
    "agentbus.sessions.show.{tenant}.{submitter}",
    SessionShowRequest,
    None,
    True,
    "One of the submitter's sessions with its history and summary (request/reply).",
    reply=SessionShowReply,
)
SESSION_DELETE = SubjectSpec(
    "agentbus.sessions.delete.{tenant}.{submitter}",
    SessionDeleteRequest,
    None,
    True,
    "Forget one of the submitter's sessions (request/reply); refused while a task of it runs or waits.",
    reply=SessionDeleteReply,
)

SUBJECTS: tuple[SubjectSpec, ...] = (
    TASK_SUBMIT,
    TASK_CANCEL,
    TASK_EVENT,
    TASK_REPLAY,
    APPROVAL_PENDING,
    APPROVAL_DECISION,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS_LIST,
    RAG_INGEST_DOCUMENTS,
    LLM_REQUEST,
    LLM_RESULT,
    USAGE_RECORDED,
    RAG_DELETE_DOCUMENTS,
    RAG_SEARCH,
    TOOL_CALL,
    TOOL_WITHDRAW,
    TOOL_UPDATE,
    RUN_SCHEDULE,
    RUN_TIMER,
    LLM_ABORT,
    BUDGET_RESERVE,
    BUDGET_RELEASE,
    TASK_COST,
    RATE_LIMITS,
    COST_REPORT,
    BUDGET_ALERT,
    SPAN,
    DEAD_LETTER,
    WORKFLOW_SUBMIT,
    WORKFLOW_CANCEL,
    WORKFLOW_EVENT,
    WORKFLOW_REPLAY,
    WORKFLOWS_LIST,
    WORKFLOW_SCHEDULE,
    WORKFLOW_TIMER,
    WORKFLOW_ADMISSION,
    SESSIONS_LIST,
    SESSION_SHOW,
    SESSION_DELETE,
)

# --- durable consumers ---------------------------------------------------------------------------

# Runner transitions take milliseconds, so a short ack_wait: after a crash, the unacked input comes back
# (and re-publishes the transition's stored outbox) within seconds. Slow handlers send in-progress acks.
RUNNER_ACK_WAIT_SECONDS = 10.0

RUNNER_SUBMISSIONS = ConsumerSpec(
    durable="agent-runner-submissions",
    stream=TASKS.name,
    filter_subject=TASK_SUBMIT.wildcard,
    service=Service.AGENT_RUNNER,
    description="Starts runs from submissions.",
    ack_wait_seconds=RUNNER_ACK_WAIT_SECONDS,
    max_deliver=5,
)
RUNNER_CANCELLATIONS = ConsumerSpec(
    durable="agent-runner-cancellations",
    stream=TASKS.name,
    filter_subject=TASK_CANCEL.wildcard,
    service=Service.AGENT_RUNNER,
    description="Cancels runs.",
    ack_wait_seconds=RUNNER_ACK_WAIT_SECONDS,
    max_deliver=5,
)
RUNNER_LLM_RESULTS = ConsumerSpec(
    durable="agent-runner-llm-results",
    stream=LLM_RESULTS.name,
    filter_subject=LLM_RESULT.wildcard,
    service=Service.AGENT_RUNNER,
    description="Advances runs with generated steps.",
    ack_wait_seconds=RUNNER_ACK_WAIT_SECONDS,
    max_deliver=5,
)

RUNNER_TOOL_UPDATES = ConsumerSpec(
    durable="agent-runner-tool-updates",
    stream=TOOL_UPDATES.name,
    filter_subject=TOOL_UPDATE.wildcard,
    service=Service.AGENT_RUNNER,
    description="Advances runs with approval progress and tool results.",
    ack_wait_seconds=RUNNER_ACK_WAIT_SECONDS,
    max_deliver=5,
)
RUNNER_TIMERS = ConsumerSpec(
    durable="agent-runner-timers",
    stream=RUN_TIMERS.name,
    filter_subject=RUN_TIMER.wildcard,
    service=Service.AGENT_RUNNER,
    description="Acts on due run timers: ends runs at their deadline, re-drives steps that wait too long.",
    ack_wait_seconds=RUNNER_ACK_WAIT_SECONDS,
    max_deliver=5,
)
RUNNER_DEAD_LETTERS = ConsumerSpec(
    durable="agent-runner-dead-letters",
    stream=DEAD_LETTERS.name,
    filter_subject=DEAD_LETTER.wildcard,
    service=Service.AGENT_RUNNER,
    description="Ends a run with `failed internal_error` when a message it waits on was given up on.",
    ack_wait_seconds=30.0,
    max_deliver=5,
)
EXECUTOR_CALLS = ConsumerSpec(
    durable="tool-executor-calls",
    stream=TOOL_CALLS.name,
    filter_subject=TOOL_CALL.wildcard,
    service=Service.TOOL_EXECUTOR,
    description="Validates tool calls, asks for approval where policy says so, executes the rest once.",
    ack_wait_seconds=30.0,
    max_deliver=5,
    max_ack_pending=256,
)
EXECUTOR_WITHDRAWALS = ConsumerSpec(
    durable="tool-executor-withdrawals",
    stream=TOOL_CALLS.name,
    filter_subject=TOOL_WITHDRAW.wildcard,
    service=Service.TOOL_EXECUTOR,
    description="Withdraws calls whose task ended: never runs them, expires their pending approvals.",
    ack_wait_seconds=30.0,
    max_deliver=5,
    max_ack_pending=256,
)
EXECUTOR_DECISIONS = ConsumerSpec(
    durable="tool-executor-decisions",
    stream=APPROVAL_DECISIONS.name,
    filter_subject=APPROVAL_DECISION.wildcard,
    service=Service.TOOL_EXECUTOR,
    description="Checks approvers' decisions and executes approved calls once.",
    ack_wait_seconds=30.0,
    max_deliver=5,
    max_ack_pending=256,
)
RETRIEVER_INGEST = ConsumerSpec(
    durable="retriever-ingest",
    stream=RAG_INGEST.name,
    filter_subject=RAG_INGEST_DOCUMENTS.wildcard,
    service=Service.RETRIEVER,
    description="Chunks, embeds and upserts documents.",
    ack_wait_seconds=120.0,
    max_deliver=4,
    max_ack_pending=16,
)
RETRIEVER_DELETES = ConsumerSpec(
    durable="retriever-deletes",
    stream=RAG_INGEST.name,
    filter_subject=RAG_DELETE_DOCUMENTS.wildcard,
    service=Service.RETRIEVER,
    description="Deletes documents and their chunks.",
    ack_wait_seconds=60.0,
    max_deliver=4,
    max_ack_pending=16,
)
BUDGET_PARTITIONS = 8
"""Budgets are partitioned by tenant over this many partitions; each partition has exactly one owner (a
cost-accountant replica) at a time, which decides its reservations in memory. Changing the number moves
tenants between partitions: stop every accountant first."""


def budget_partition(tenant: str) -> str:
    """The budget partition of a tenant (a subject token): stable across processes and languages (CRC-32)."""
    return str(zlib.crc32(tenant.encode("utf-8")) % BUDGET_PARTITIONS)


def budget_subject(spec: SubjectSpec, tenant: str) -> str:
    """The subject of a budget request (reserve, release, cost) or usage record for `tenant`'s partition."""
    return spec.format(partition=budget_partition(tenant), tenant=tenant)


ACCOUNTANT_USAGE_DURABLE_PREFIX = "cost-accountant-usage-"


def accountant_usage_consumer(partition: int) -> ConsumerSpec:
    """The usage consumer of one budget partition: read by the partition's owner alone."""
    return ConsumerSpec(
        durable=f"{ACCOUNTANT_USAGE_DURABLE_PREFIX}{partition}",
        stream=USAGE.name,
        filter_subject=USAGE_RECORDED.pattern.format(partition=partition, tenant="*"),
        service=Service.COST_ACCOUNTANT,
        description=f"Prices usage records of budget partition {partition} into the ledger and settles reservations.",
        # Short: a record held by an accountant that died comes back soon, since a finished run's terminal
        # event waits for every usage record it named to be priced.
        ack_wait_seconds=10.0,
        max_deliver=5,
        max_ack_pending=4096,
    )


ACCOUNTANT_USAGE: tuple[ConsumerSpec, ...] = tuple(accountant_usage_consumer(p) for p in range(BUDGET_PARTITIONS))
TRACE_EXPORTER_SPANS = ConsumerSpec(
    durable="trace-exporter-spans",
    stream=SPANS.name,
    filter_subject=SPAN.wildcard,
    service=Service.TRACE_EXPORTER,
    description="Exports span events as one trace per task; stops acking while the backend is down.",
    ack_wait_seconds=60.0,
    # A backend outage must not exhaust deliveries: with the exporter's backoff capped at 60 s, this
    # outlasts the stream's 7-day retention, so spans age out of SPANS before they could be dead-lettered.
    max_deliver=20_000,
    max_ack_pending=10_000,
)

# Orchestrator transitions take milliseconds, like the runner's: a short ack_wait brings an input held by a
# killed orchestrator back within seconds (and with it the transition's stored outbox).
ORCHESTRATOR_ACK_WAIT_SECONDS = 10.0

ORCHESTRATOR_SUBMISSIONS = ConsumerSpec(
    durable="workflow-orchestrator-submissions",
    stream=WORKFLOWS.name,
    filter_subject=WORKFLOW_SUBMIT.wildcard,
    service=Service.WORKFLOW_ORCHESTRATOR,
    description="Starts workflow runs from submissions.",
    ack_wait_seconds=ORCHESTRATOR_ACK_WAIT_SECONDS,
    max_deliver=5,
)
ORCHESTRATOR_CANCELLATIONS = ConsumerSpec(
    durable="workflow-orchestrator-cancellations",
    stream=WORKFLOWS.name,
    filter_subject=WORKFLOW_CANCEL.wildcard,
    service=Service.WORKFLOW_ORCHESTRATOR,
    description="Cancels workflow runs and their running steps.",
    ack_wait_seconds=ORCHESTRATOR_ACK_WAIT_SECONDS,
    max_deliver=5,
)
ORCHESTRATOR_TASK_EVENTS = ConsumerSpec(
    durable="workflow-orchestrator-task-events",
    stream=TASK_EVENTS.name,
    filter_subject=TASK_EVENT.wildcard,
    service=Service.WORKFLOW_ORCHESTRATOR,
    description="Advances workflow runs with the events of their steps' tasks; other tasks' events are passed over.",
    ack_wait_seconds=ORCHESTRATOR_ACK_WAIT_SECONDS,
    max_deliver=5,
    max_ack_pending=4096,
)
ORCHESTRATOR_TIMERS = ConsumerSpec(
    durable="workflow-orchestrator-timers",
    stream=WORKFLOW_SIGNALS.name,
    filter_subject=WORKFLOW_TIMER.wildcard,
    service=Service.WORKFLOW_ORCHESTRATOR,
    description="Ends workflow runs at their deadline.",
    ack_wait_seconds=ORCHESTRATOR_ACK_WAIT_SECONDS,
    max_deliver=5,
)
ORCHESTRATOR_ADMISSIONS = ConsumerSpec(
    durable="workflow-orchestrator-admissions",
    stream=WORKFLOW_SIGNALS.name,
    filter_subject=WORKFLOW_ADMISSION.wildcard,
    service=Service.WORKFLOW_ORCHESTRATOR,
    description="Starts queued workflow runs given a slot; cancels runs a newer one replaced.",
    ack_wait_seconds=ORCHESTRATOR_ACK_WAIT_SECONDS,
    max_deliver=5,
)

INFERENCE_DURABLE_PREFIX = "inference-worker-"


def inference_consumer(model: str) -> ConsumerSpec:
    """The durable consumer of one model's LLM requests. Workers of a model share it (a work queue).

    Models are configuration, so these consumers are declared per model rather than listed statically;
    the bootstrap applies one for each model the deployment serves.
    """
    return ConsumerSpec(
        durable=f"{INFERENCE_DURABLE_PREFIX}{model}",
        stream=LLM_REQUESTS.name,
        filter_subject=LLM_REQUEST.format(model=model),
        service=Service.INFERENCE_WORKER,
        description=f"Generates steps for model {model}.",
        ack_wait_seconds=60.0,
        max_deliver=4,
        max_ack_pending=256,
    )


STATIC_CONSUMERS: tuple[ConsumerSpec, ...] = (
    RUNNER_SUBMISSIONS,
    RUNNER_CANCELLATIONS,
    RUNNER_LLM_RESULTS,
    RUNNER_TOOL_UPDATES,
    RUNNER_TIMERS,
    RUNNER_DEAD_LETTERS,
    EXECUTOR_CALLS,
    EXECUTOR_WITHDRAWALS,
    EXECUTOR_DECISIONS,
    RETRIEVER_INGEST,
    RETRIEVER_DELETES,
    *ACCOUNTANT_USAGE,
    TRACE_EXPORTER_SPANS,
    ORCHESTRATOR_SUBMISSIONS,
    ORCHESTRATOR_CANCELLATIONS,
    ORCHESTRATOR_TASK_EVENTS,
    ORCHESTRATOR_TIMERS,
    ORCHESTRATOR_ADMISSIONS,
)

DEFAULT_MODELS: tuple[str, ...] = ("scripted",)
"""Models served when a deployment configures none: the offline `scripted` engine."""


def consumers(models: tuple[str, ...] = DEFAULT_MODELS) -> tuple[ConsumerSpec, ...]:
    """Every durable consumer of a deployment that serves `models`."""
    return STATIC_CONSUMERS + tuple(inference_consumer(model) for model in models)


# --- key-value buckets ---------------------------------------------------------------------------

RUNS = KeyValueSpec(
    bucket="AGENTBUS_RUNS",
    description="Run state of every task, written compare-and-set on each transition.",
    history=1,
)

WORKFLOW_RUNS = KeyValueSpec(
    bucket="AGENTBUS_WORKFLOW_RUNS",
    description=(
        "Workflow run state (`run.<tenant>.<run_id>`), each workflow's concurrency slots per tenant "
        "(`slots.<tenant>.<workflow>`) and which run each step task belongs to (`step.<tenant>.<task_id>`), "
        "written compare-and-set."
    ),
    history=1,
)

SESSIONS = KeyValueSpec(
    bucket="AGENTBUS_SESSIONS",
    description=(
        "Sessions of the memory stores of type nats-kv (`<store>.<tenant>.<submitter>.<session_id>`): the "
        "conversation so far, its summary, the running task and those waiting, written compare-and-set; each "
        "write carries its store's TTL (a per-message TTL), so an idle session expires."
    ),
    history=1,
)

KEY_VALUE_BUCKETS: tuple[KeyValueSpec, ...] = (RUNS, WORKFLOW_RUNS, SESSIONS)


def stream_named(name: str) -> StreamSpec:
    """The stream spec of that name, or KeyError."""
    for stream in STREAMS:
        if stream.name == name:
            return stream
    raise KeyError(name)
