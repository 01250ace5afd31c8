"""The gateway's rules, free of HTTP and NATS: who may do what, how a task's events read as its state, how a
stream of events is followed without a gap or a repeat, and how approvals and costs are shown."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

import yaml
from agentbus.contracts.approvals import ApprovalRequested
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.tasks import TERMINAL_EVENT_KINDS, TaskEvent
from pydantic import BaseModel, ConfigDict, Field

# --- errors ---------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """Something the gateway refuses or cannot do, with a message a person can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAuthenticatedError(GatewayError):
    """No identity, or one the gateway does not know."""


class ForbiddenError(GatewayError):
    """The identity may not do this: the gateway's own check, or nats-server refused its NATS user."""


class NotFoundError(GatewayError):
    """No such task or approval where the identity may look."""


class UnavailableError(GatewayError):
    """A service the request needs did not answer (it may be restarting)."""


class InvalidRequestError(GatewayError):
    """The request is well-formed but names something impossible (a tenant the identity has twice, ...)."""


# --- identities -----------------------------------------------------------------------------------------


class Role(StrEnum):
    """The NATS user of an identity that an action uses: people act only through their own users."""

    SUBMITTER = "submitter"
    APPROVER = "approver"


@dataclass(frozen=True)
class Actor:
    """An identity acting in one of its roles: the adapter connects as that role's NATS user."""

    name: str
    role: Role


@dataclass(frozen=True)
class Identity:
    """A person or application of the identities file, with the tenants of each of its roles."""

    name: str
    submits_for: tuple[str, ...] = ()
    approves_for: tuple[str, ...] = ()
    operator: bool = False

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.submits_for, *self.approves_for)))

    def submitter(self, tenant: str) -> Actor:
        """Act as this identity's submitter for `tenant`, or ForbiddenError."""
        if tenant not in self.submits_for:
            raise ForbiddenError(f"{self.name} is not a submitter of tenant {tenant}")
        return Actor(self.name, Role.SUBMITTER)

    def approver(self, tenant: str) -> Actor:
        """Act as this identity's approver for `tenant`, or ForbiddenError."""
        if tenant not in self.approves_for:
            raise ForbiddenError(f"{self.name} is not an approver of tenant {tenant}")
        return Actor(self.name, Role.APPROVER)

    def reader(self, tenant: str) -> Actor:
        """Who reads a tenant's tasks: the submitter user (approvers may not read task events)."""
        if tenant not in self.submits_for:
            raise ForbiddenError(f"{self.name} may not read the tasks of tenant {tenant} (not a submitter of it)")
        return Actor(self.name, Role.SUBMITTER)

    def require_operator(self) -> None:
        if not self.operator:
            raise ForbiddenError(f"{self.name} is not an operator")

    def only_tenant(self, tenants: Sequence[str], what: str) -> str:
        """The one tenant of `tenants`, for a request that did not name one."""
        if len(tenants) == 1:
            return tenants[0]
        if not tenants:
            raise ForbiddenError(f"{self.name} has no tenant to {what}")
        raise InvalidRequestError(f"{self.name} may {what} for {', '.join(tenants)}: name the tenant")


# --- task state -----------------------------------------------------------------------------------------

TaskStatus = Literal[
    "running", "waiting_for_approval", "completed", "rejected", "failed", "cancelled", "budget_exceeded"
]


class TaskState(BaseModel):
    """Where a task stands, read from its events."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    tenant: str
    status: TaskStatus
    last_seq: int = Field(description="The seq of its last event: resume its event stream after this.")
    agent: str | None = None
    model: str | None = None
    steps: int = Field(default=0, description="LLM steps so far.")
    pending_approvals: list[str] = Field(default_factory=list, description="Approvals the task waits for.")
    output: str | None = None
    citations: list[RetrievedChunk] = Field(default_factory=list)
    usage: TokenUsage | None = None
    cost_usd: float | None = None
    error: ErrorInfo | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


def task_state(events: Iterable[TaskEvent]) -> TaskState | None:
    """The state its events describe, or None for a task with no event yet."""
    state: dict[str, Any] = {}
    pending: list[str] = []
    for event in events:
        if event.kind == "token":
            continue
        if not state:
            state = {"task_id": event.task_id, "tenant": event.tenant, "status": "running", "started_at": event.at}
        state["last_seq"] = event.seq
        match event.kind:
            case "accepted":
                state.update(agent=event.agent, model=event.model)
            case "step":
                state["steps"] = event.step
            case "approval_pending":
                pending.append(event.approval_id)
            case "approval_resolved":
                pending = [a for a in pending if a != event.approval_id]
            case "completed":
                state.update(
                    status="completed",
                    output=event.output,
                    citations=event.citations,
                    usage=event.usage,
                    cost_usd=event.cost_usd,
                    steps=event.steps,
                )
            case "failed":
                state.update(status="failed", error=event.error, usage=event.usage, cost_usd=event.cost_usd)
            case "rejected":
                state.update(status="rejected", error=event.error)
            case "cancelled" | "budget_exceeded":
                state["status"] = event.kind
        if event.kind in TERMINAL_EVENT_KINDS:
            state["ended_at"] = event.at
    if not state:
        return None
    if state["status"] == "running" and pending:
        state["status"] = "waiting_for_approval"
    return TaskState(pending_approvals=pending, **state)


# --- following a stream of events -----------------------------------------------------------------------


@dataclass
class EventCursor:
    """Which events of a task to pass on, so that a follower sees each once and in order.

    Numbered events are passed on from `next_seq` with no gap: one that comes early means some were missed,
    and the stored events are read first. Token events repeat the seq of the event before their step; those
    of the step in progress are passed on once each (by their chunk), older ones not at all.
    """

    next_seq: int = 1
    _chunks: set[tuple[int, int, int]] = field(default_factory=set)

    def gap_before(self, event: TaskEvent) -> bool:
        """Whether events before `event` were missed."""
        return event.kind != "token" and event.seq > self.next_seq

    def accept(self, event: TaskEvent) -> bool:
        """Whether to pass `event` on now (and remember that it was)."""
        if event.kind == "token":
            key = (event.seq, event.step, event.chunk)
            if event.seq != self.next_seq - 1 or key in self._chunks:
                return False
            self._chunks.add(key)
            return True
        if event.seq != self.next_seq:
            return False
        self.next_seq += 1
        self._chunks.clear()
        return True


def is_terminal(event: TaskEvent) -> bool:
    return event.kind in TERMINAL_EVENT_KINDS


def last_event_id(header: str | None) -> int:
    """The seq an SSE client saw last (`Last-Event-ID`), 0 when it saw none. Not a seq: InvalidRequestError."""
    if header is None or not header.strip():
        return 0
    try:
        seq = int(header.strip())
    except ValueError as exc:
        raise InvalidRequestError(f"Last-Event-ID {header!r} is not an event seq") from exc
    if seq < 0:
        raise InvalidRequestError(f"Last-Event-ID {header!r} is not an event seq")
    return seq


# --- approvals as shown to an approver ------------------------------------------------------------------

MANIFEST_ARGUMENTS: dict[str, str] = {"kubectl_apply": "manifest"}
"""Tools whose argument is Kubernetes manifests, shown as the YAML they are."""


def human_duration(seconds: float) -> str:
    """`45s`, `12m`, `3h 5m`, `2d 4h`: two units at most."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


@dataclass(frozen=True)
class ApprovalView:
    """One pending approval as the inbox shows it: the exact arguments whose hash a decision quotes."""

    request: ApprovalRequested
    age: str
    expires: str
    expired: bool
    arguments_json: str
    manifests_yaml: str | None

    @classmethod
    def of(cls, request: ApprovalRequested, now: datetime) -> ApprovalView:
        left = (request.expires_at - now).total_seconds()
        manifest = request.arguments.get(MANIFEST_ARGUMENTS.get(request.tool, ""))
        return cls(
            request=request,
            age=human_duration((now - request.requested_at).total_seconds()),
            expires=f"in {human_duration(left)}" if left > 0 else f"{human_duration(-left)} ago",
            expired=left <= 0,
            arguments_json=json.dumps(request.arguments, indent=2, ensure_ascii=False, sort_keys=True),
            manifests_yaml=_as_yaml(manifest) if manifest is not None else None,
        )


def _as_yaml(manifest: Any) -> str:
    """Manifests as YAML: a string is shown as written (it is YAML already), objects are dumped."""
    if isinstance(manifest, str):
        return manifest.strip() + "\n"
    return yaml.safe_dump_all(manifest if isinstance(manifest, list) else [manifest], sort_keys=False)


# --- costs and budgets ----------------------------------------------------------------------------------


class Limit(BaseModel):
    """A budget's limits in USD (the cost-accountant's budgets file)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hard_usd: Decimal | None = None
    soft_usd: Decimal | None = None


class TenantBudgets(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    monthly: Limit | None = None
    agents: dict[str, Limit] = Field(default_factory=dict)
    users: dict[str, Limit] = Field(default_factory=dict)
    default_user: Limit | None = None
    models: dict[str, Limit] = Field(default_factory=dict)


class DefaultBudgets(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant: Limit | None = None
    agent: Limit | None = None
    user: Limit | None = None


class Budgets(BaseModel):
    """The monthly limits of tenants, agents, models and users: read from the same file the accountant uses,
    so the page draws the limits the accountant enforces."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    defaults: DefaultBudgets = Field(default_factory=DefaultBudgets)
    tenants: dict[str, TenantBudgets] = Field(default_factory=dict)

    def of_tenant(self, tenant: str) -> Limit | None:
        budgets = self.tenants.get(tenant)
        return (budgets.monthly if budgets else None) or self.defaults.tenant

    def of_agent(self, tenant: str, agent: str) -> Limit | None:
        budgets = self.tenants.get(tenant)
        return (budgets.agents.get(agent) if budgets else None) or self.defaults.agent

    def of_model(self, tenant: str, model: str) -> Limit | None:
        budgets = self.tenants.get(tenant)
        return budgets.models.get(model) if budgets else None


CostDimension = Literal["tenant", "agent", "model", "day"]


@dataclass(frozen=True)
class Bar:
    """One bar of a cost chart: its spend and the limits that apply, all as fractions of the chart's scale."""

    key: str
    cost_usd: float
    calls: int
    soft_usd: float | None
    hard_usd: float | None
    scale_usd: float

    def fraction(self, usd: float | None) -> float:
        return 0.0 if usd is None or self.scale_usd <= 0 else min(usd / self.scale_usd, 1.0)

    @property
    def over_soft(self) -> bool:
        return self.soft_usd is not None and self.cost_usd > self.soft_usd

    @property
    def over_hard(self) -> bool:
        return self.hard_usd is not None and self.cost_usd >= self.hard_usd


@dataclass(frozen=True)
class CostRow:
    key: str
    cost_usd: float
    calls: int


def cost_bars(rows: Sequence[CostRow], limit_of: dict[str, Limit | None]) -> list[Bar]:
    """Bars on one scale: the largest spend or limit in the chart fills the width."""

    def usd(value: Decimal | None) -> float | None:
        return float(value) if value is not None else None

    limits = {row.key: limit_of.get(row.key) for row in rows}
    candidates = [row.cost_usd for row in rows]
    for limit in limits.values():
        if limit is not None:
            candidates += [float(v) for v in (limit.soft_usd, limit.hard_usd) if v is not None]
    scale = max(candidates, default=0.0)
    return [
        Bar(
            key=row.key,
            cost_usd=row.cost_usd,
            calls=row.calls,
            soft_usd=usd(limit.soft_usd) if (limit := limits[row.key]) else None,
            hard_usd=usd(limit.hard_usd) if limit else None,
            scale_usd=scale,
        )
        for row in rows
    ]
