"""THE registry: every stream, subject, message type, durable consumer, KV bucket and header of agentbus.

Nothing else in the code base spells a subject, stream, durable or header name. The bootstrap
(`agentbus streams apply`) creates or updates exactly what is declared here, and deployment manifests
and tests read their names from here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from agentbus.contracts.approvals import ApprovalDecision, ApprovalRequested, ApprovalResolved
from agentbus.contracts.budget import (
    BudgetAlert,
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.llm import LlmAbort, LlmRequest, LlmResult
from agentbus.contracts.rag import DocumentsDelete, DocumentsIngest, SearchReply, SearchRequest
from agentbus.contracts.spans import SpanRecorded
from agentbus.contracts.tasks import TaskCancelRequested, TaskSubmitted
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate
from agentbus.contracts.usage import UsageRecorded
from pydantic import BaseModel

SUBJECT_ROOT = "agentbus"
_TOKEN = re.compile(r"\{([a-z_]+)\}")
DURABLE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Header(StrEnum):
    """NATS header names agentbus reads or writes."""

    MSG_ID = "Nats-Msg-Id"
    TRACEPARENT = "traceparent"


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


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: who reads what, and when a message is given up on."""

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
    """Delay of the nak that follows a retryable failure."""


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


# --- streams -------------------------------------------------------------------------------------

TASKS = StreamSpec(
    name="AGENTBUS_TASKS",
    subjects=("agentbus.tasks.submit.*", "agentbus.tasks.cancel.*"),
    retention=Retention.WORK_QUEUE,
    description="Task submissions and cancellations, each consumed once by the agent-runner.",
    max_age_seconds=7 * 86400,
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
)
RAG_INGEST = StreamSpec(
    name="AGENTBUS_RAG_INGEST",
    subjects=("agentbus.rag.ingest.*", "agentbus.rag.delete.*"),
    retention=Retention.WORK_QUEUE,
    description="Document batches to upsert into, or delete from, a tenant's knowledge base.",
    max_age_seconds=7 * 86400,
    max_msg_size=8 * 1024 * 1024,
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
    subjects=("agentbus.usage.*",),
    retention=Retention.LIMITS,
    description="Billable usage from every service, for the cost ledger.",
    max_age_seconds=30 * 86400,
)
TOOL_CALLS = StreamSpec(
    name="AGENTBUS_TOOL_CALLS",
    subjects=("agentbus.tools.calls.*",),
    retention=Retention.WORK_QUEUE,
    description="Tool calls for the tool-executor.",
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
    BUDGET_ALERTS,
    SPANS,
    DEAD_LETTERS,
)

# --- subjects ------------------------------------------------------------------------------------

TASK_SUBMIT = SubjectSpec("agentbus.tasks.submit.{tenant}", TaskSubmitted, TASKS.name, True, "Submit an agent task.")
TASK_CANCEL = SubjectSpec(
    "agentbus.tasks.cancel.{tenant}", TaskCancelRequested, TASKS.name, True, "Cancel a running task."
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
RAG_INGEST_DOCUMENTS = SubjectSpec(
    "agentbus.rag.ingest.{tenant}", DocumentsIngest, RAG_INGEST.name, True, "Upsert documents by id."
)
LLM_REQUEST = SubjectSpec(
    "agentbus.llm.requests.{model}", LlmRequest, LLM_REQUESTS.name, False, "One LLM step for a model."
)
LLM_RESULT = SubjectSpec("agentbus.llm.results.{tenant}", LlmResult, LLM_RESULTS.name, False, "A generated LLM step.")
USAGE_RECORDED = SubjectSpec("agentbus.usage.{tenant}", UsageRecorded, USAGE.name, False, "A billable usage record.")
RAG_DELETE_DOCUMENTS = SubjectSpec(
    "agentbus.rag.delete.{tenant}", DocumentsDelete, RAG_INGEST.name, True, "Delete documents by id."
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
    "agentbus.budget.reserve.{tenant}",
    BudgetReserveRequest,
    None,
    False,
    "Reserve the estimated cost of a call before making it (request/reply).",
    reply=BudgetReserveReply,
)
BUDGET_RELEASE = SubjectSpec(
    "agentbus.budget.release.{tenant}",
    BudgetReleaseRequest,
    None,
    False,
    "Release a finished task's unused reservations (request/reply).",
    reply=BudgetReserveReply,
)
TASK_COST = SubjectSpec(
    "agentbus.budget.cost.{tenant}",
    TaskCostRequest,
    None,
    False,
    "The priced cost of a task's usage (request/reply).",
    reply=TaskCostReply,
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
SPAN = SubjectSpec("agentbus.spans.{service}", SpanRecorded, SPANS.name, False, "A finished span of some service.")
DEAD_LETTER = SubjectSpec(
    "agentbus.deadletter.{stream}.{consumer}",
    DeadLetter,
    DEAD_LETTERS.name,
    False,
    "A message a consumer gave up on.",
)

SUBJECTS: tuple[SubjectSpec, ...] = (
    TASK_SUBMIT,
    TASK_CANCEL,
    TASK_EVENT,
    APPROVAL_PENDING,
    APPROVAL_DECISION,
    APPROVAL_RESOLVED,
    RAG_INGEST_DOCUMENTS,
    LLM_REQUEST,
    LLM_RESULT,
    USAGE_RECORDED,
    RAG_DELETE_DOCUMENTS,
    RAG_SEARCH,
    TOOL_CALL,
    TOOL_UPDATE,
    LLM_ABORT,
    BUDGET_RESERVE,
    BUDGET_RELEASE,
    TASK_COST,
    COST_REPORT,
    BUDGET_ALERT,
    SPAN,
    DEAD_LETTER,
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
ACCOUNTANT_USAGE = ConsumerSpec(
    durable="cost-accountant-usage",
    stream=USAGE.name,
    filter_subject=USAGE_RECORDED.wildcard,
    service=Service.COST_ACCOUNTANT,
    description="Prices usage records into the ledger, once per usage id, and settles reservations.",
    ack_wait_seconds=30.0,
    max_deliver=5,
    max_ack_pending=4096,
)
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
    EXECUTOR_CALLS,
    EXECUTOR_DECISIONS,
    RETRIEVER_INGEST,
    RETRIEVER_DELETES,
    ACCOUNTANT_USAGE,
    TRACE_EXPORTER_SPANS,
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

KEY_VALUE_BUCKETS: tuple[KeyValueSpec, ...] = (RUNS,)


def stream_named(name: str) -> StreamSpec:
    """The stream spec of that name, or KeyError."""
    for stream in STREAMS:
        if stream.name == name:
            return stream
    raise KeyError(name)
