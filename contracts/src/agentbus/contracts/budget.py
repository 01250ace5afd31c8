"""Internal budget and cost messages between the agent-runner, the services and the cost-accountant."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier, utc_now
from pydantic import BaseModel, ConfigDict, Field


class BudgetErrorCode(StrEnum):
    """Codes of the `error` in the cost-accountant's replies: what the services that ask it act on."""

    STORE_UNAVAILABLE = "store_unavailable"
    """The ledger does not answer: ask again later (never a reason to fail a task)."""
    TASK_CLOSED = "task_closed"
    """The task ended and its budget was closed: nothing more is reserved for it."""
    RATE_LIMITED = "rate_limited"
    """A rate limit with `on_limit: reject` refuses a new task while it is reached."""
    MISSING_MODEL = "missing_model"
    MISSING_TOOL = "missing_tool"


class BudgetReserveRequest(BusMessage):
    """Reserve the estimated cost of one LLM or tool call before making it (request/reply).

    `reservation_id` is the idempotency key: asking again for the same id returns the first verdict.
    The usage record of the call names the same id, and settling it replaces the reservation.
    """

    reservation_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,200}$")
    tenant: Identifier
    task_id: Identifier
    agent: Identifier
    kind: Literal["llm", "tool"]
    model: str | None = Field(default=None, description="LLM calls: the model.")
    tool: str | None = Field(default=None, description="Tool calls: the tool.")
    estimated_prompt_tokens: int = Field(default=0, ge=0)
    estimated_completion_tokens: int = Field(default=0, ge=0)
    task_budget_usd: float | None = Field(default=None, ge=0, description="The task's own cap, if any.")
    submitted_by: Identifier | None = Field(default=None, description="End user, for per-user budgets.")


class BudgetReserveReply(BusMessage):
    """Allow or deny a reservation. A denial names the budget that would be exceeded."""

    reservation_id: str
    allowed: bool
    reserved_usd: float = Field(default=0.0, ge=0)
    budget: str | None = Field(default=None, description="Denials: e.g. 'task', 'agent:<name>', 'tenant:<id>'.")
    limit_usd: float | None = Field(default=None, ge=0)
    spent_usd: float | None = Field(default=None, ge=0, description="Spent and reserved in that budget.")
    requested_usd: float | None = Field(default=None, ge=0, description="Denials: the estimate that was refused.")
    throttled: bool = Field(
        default=False,
        description="A rate limit holds the call back (neither allowed nor denied): ask again for the same "
        "reservation after `retry_after_seconds`. Nothing was reserved.",
    )
    retry_after_seconds: float | None = Field(
        default=None, ge=0, description="Throttled: how long until the limit allows the call."
    )
    limit: str | None = Field(
        default=None,
        description="Throttled, or refused `rate_limited`: the rate limit, e.g. 'tenant:acme:requests_per_minute'.",
    )
    error: ErrorInfo | None = None


class BudgetReleaseRequest(BusMessage):
    """Close a task that ended (request/reply): its open reservations are given back, and a reservation asked
    for it afterwards is refused (`task_closed`), so a call decided late can never hold budget again."""

    tenant: Identifier
    task_id: Identifier


class TaskCostRequest(BusMessage):
    """The priced cost of a task's usage records (request/reply), for its terminal event."""

    tenant: Identifier
    task_id: Identifier
    usage_ids: list[str] = Field(default_factory=list, description="Records that must be in the ledger first.")
    wait_seconds: float = Field(
        default=0.0,
        ge=0,
        le=30,
        description="Answer once every record of `usage_ids` is in the ledger, or after this long at most.",
    )
    close: bool = Field(
        default=False,
        description="Once every record of `usage_ids` is in the ledger, also close the task (as "
        "BudgetReleaseRequest does): a finished run is priced and closed in one request.",
    )


class TaskCostReply(BusMessage):
    """The cost of a task so far; `missing_usage_ids` lists asked-for records not yet in the ledger (and
    then a `close` was not done)."""

    task_id: str
    cost_usd: float = Field(ge=0)
    missing_usage_ids: list[str] = Field(default_factory=list)
    closed: bool = Field(default=False, description="The task was closed by this request (or before it).")
    error: ErrorInfo | None = None


class BudgetAlert(BusMessage):
    """A budget crossed its soft limit."""

    alert_id: str = Field(min_length=1, max_length=200, description="Idempotency key of the alert.")
    tenant: Identifier
    budget: str
    soft_limit_usd: float = Field(ge=0)
    hard_limit_usd: float | None = Field(default=None, ge=0)
    spent_usd: float = Field(ge=0)
    at: datetime = Field(default_factory=utc_now)


class CostReportRequest(BusMessage):
    """Ask for a cost report (request/reply); `agentbus cost report` sends the same."""

    tenant: Identifier | None = Field(default=None, description="One tenant, or all.")
    by: Literal["task", "agent", "model", "day", "tenant"] = "tenant"
    since: datetime | None = None


class CostReportRow(BaseModel):
    """One group of a cost report."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gpu_seconds: float = 0.0
    calls: int = 0
    cost_usd: float = 0.0


class CostReportReply(BusMessage):
    """A cost report: rows by the requested key, and their total."""

    by: str
    rows: list[CostReportRow] = Field(default_factory=list)
    total_usd: float = 0.0
    error: ErrorInfo | None = None


class RateLimitsRequest(BusMessage):
    """A tenant's rate buckets as they are now (request/reply); `agentbus limits show` sends the same."""

    tenant: Identifier


class RateBucketLevel(BaseModel):
    """One rate bucket of a tenant in the current window: what it admitted, and its limits."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    bucket: str = Field(description="'tenant:<id>', 'submitter:<id>', 'agent:<name>' or 'model:<name>'.")
    requests: int = Field(ge=0, description="LLM calls admitted in the current window.")
    tokens: int = Field(ge=0, description="Estimated tokens admitted in the current window.")
    requests_per_minute: int | None = Field(default=None, description="The bucket's limit per window, if any.")
    tokens_per_minute: int | None = Field(default=None, description="The bucket's token limit per window, if any.")
    on_limit: Literal["wait", "reject"] = "wait"


class RateLimitsReply(BusMessage):
    """A tenant's rate buckets in the current window, and its open tasks against its concurrency cap."""

    tenant: str
    window_seconds: float = Field(default=60.0, gt=0, description="The window the per-minute limits count in.")
    window_started_at: datetime | None = Field(default=None, description="When the current window began (UTC).")
    buckets: list[RateBucketLevel] = Field(default_factory=list)
    open_tasks: int = Field(default=0, ge=0, description="Tasks seen by a reservation and not closed.")
    concurrent_tasks: int | None = Field(default=None, description="The tenant's cap on open tasks, if any.")
    error: ErrorInfo | None = None
