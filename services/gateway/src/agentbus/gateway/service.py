"""The gateway's use cases. Each acts on the bus as the identity's own NATS user for the role it needs, so
nats-server's permissions keep applying; nothing is kept here between requests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from agentbus.contracts.approvals import (
    ApprovalDecision,
    ApprovalEntry,
    ApprovalRequested,
    ApprovalResolved,
    ApprovalsListRequest,
)
from agentbus.contracts.budget import CostReportReply, CostReportRequest
from agentbus.contracts.common import utc_now
from agentbus.contracts.tasks import TaskCancelRequested, TaskEvent, TaskSubmitted
from agentbus.gateway.domain import (
    Actor,
    ApprovalView,
    Bar,
    Budgets,
    CostDimension,
    CostRow,
    EventCursor,
    ForbiddenError,
    Identity,
    InvalidRequestError,
    Limit,
    NotFoundError,
    Role,
    TaskState,
    UnavailableError,
    cost_bars,
    is_terminal,
    task_state,
)
from agentbus.gateway.ports import (
    ApprovalBus,
    ConsumerState,
    DecisionReceipt,
    OperatorBus,
    ServiceProbe,
    ServiceReadiness,
    TaskBus,
)
from pydantic import ValidationError

REPLAY_PAGE = 1000
TASK_ID_PREFIX = "task-"
DAYS_CHARTED = 30


@dataclass(frozen=True)
class Timeouts:
    submit_wait_seconds: float = 5.0
    verdict_seconds: float = 15.0
    catch_up_seconds: float = 3.0


@dataclass(frozen=True)
class NewTask:
    """A submission as a client asks for it: the task id is made up when it names none."""

    tenant: str
    agent: str
    input: str
    task_id: str | None = None
    budget_usd: float | None = None
    deadline_seconds: float | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class SubmittedTask:
    task: TaskSubmitted
    duplicate: bool
    first_event: TaskEvent | None


@dataclass(frozen=True)
class TaskStreamStart:
    """A task whose events a client follows after `after_seq`; `ended`: it saw the terminal event already."""

    actor: Actor
    tenant: str
    task_id: str
    after_seq: int
    ended: bool


@dataclass(frozen=True)
class InboxSnapshot:
    approvals: list[ApprovalView]


InboxChange = InboxSnapshot | ApprovalView | ApprovalResolved


@dataclass(frozen=True)
class DecisionOutcome:
    request: ApprovalRequested
    decision: ApprovalDecision
    receipt: DecisionReceipt


@dataclass(frozen=True)
class CostChart:
    dimension: CostDimension
    title: str
    bars: list[Bar]
    total_usd: float


@dataclass(frozen=True)
class CostOverview:
    tenant: str | None
    since_month: datetime
    charts: list[CostChart]
    user_budgets: list[tuple[str, str, Limit]]
    """(tenant, user, limit) of every user budget: the accountant reports no spend per user."""


@dataclass(frozen=True)
class Health:
    services: list[ServiceReadiness]
    consumers: list[ConsumerState]


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class GatewayService:
    """Tasks, approvals, costs and health, for one identity at a time."""

    def __init__(
        self,
        tasks: TaskBus,
        approvals: ApprovalBus,
        operator: OperatorBus,
        probe: ServiceProbe,
        budgets: Budgets,
        timeouts: Timeouts,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._tasks = tasks
        self._approvals = approvals
        self._operator = operator
        self._probe = probe
        self._budgets = budgets
        self._timeouts = timeouts
        self._clock = clock

    # --- tasks ------------------------------------------------------------------------------------------

    async def submit_task(self, identity: Identity, new: NewTask) -> SubmittedTask:
        """Submit as the identity's own submitter; wait a little for the runner's first event. A task id that
        was taken before starts nothing: its first stored event is returned instead."""
        actor = identity.submitter(new.tenant)
        try:
            task = TaskSubmitted(
                task_id=new.task_id or f"{TASK_ID_PREFIX}{uuid.uuid4().hex[:16]}",
                tenant=new.tenant,
                agent=new.agent,
                input=new.input,
                budget_usd=new.budget_usd,
                deadline_seconds=new.deadline_seconds,
                metadata=new.metadata or {},
                submitted_by=identity.name,
            )
        except ValidationError as exc:
            raise InvalidRequestError(_first_error(exc)) from exc
        if new.task_id is not None:
            stored = await self._replay_page(actor, task.tenant, task.task_id, 1, 1)
            if stored:
                return SubmittedTask(task, duplicate=True, first_event=stored[0])
        async with self._tasks.task_events(actor, task.tenant, task.task_id) as live:
            await self._tasks.submit(actor, task)
            first = await live.next(self._timeouts.submit_wait_seconds)
        return SubmittedTask(task, duplicate=False, first_event=first)

    def task_tenant(self, identity: Identity, tenant: str | None) -> str:
        return tenant if tenant is not None else identity.only_tenant(identity.submits_for, "read tasks")

    async def task_state(self, identity: Identity, task_id: str, tenant: str | None) -> TaskState:
        tenant = self.task_tenant(identity, tenant)
        events = await self._replay_all(identity.reader(tenant), tenant, task_id, 1)
        state = task_state(events)
        if state is None:
            raise NotFoundError(f"no task {task_id} in tenant {tenant}")
        return state

    async def cancel_task(self, identity: Identity, task_id: str, tenant: str | None, reason: str | None) -> TaskState:
        """Ask the runner to cancel, as the identity's submitter; the state it had when asked is returned."""
        tenant = self.task_tenant(identity, tenant)
        actor = identity.submitter(tenant)
        state = task_state(await self._replay_all(actor, tenant, task_id, 1))
        if state is None:
            raise NotFoundError(f"no task {task_id} in tenant {tenant}")
        try:
            request = TaskCancelRequested(task_id=task_id, tenant=tenant, reason=reason)
        except ValidationError as exc:
            raise InvalidRequestError(_first_error(exc)) from exc
        await self._tasks.cancel(actor, request)
        return state

    async def open_task_stream(
        self, identity: Identity, task_id: str, tenant: str | None, after_seq: int
    ) -> TaskStreamStart:
        """Check, before a stream starts, that the task exists (and has the event a resuming client saw)."""
        tenant = self.task_tenant(identity, tenant)
        actor = identity.reader(tenant)
        stored = [
            e for e in await self._replay_page(actor, tenant, task_id, max(after_seq, 1), 50) if e.kind != "token"
        ]
        if not stored or (after_seq > 0 and stored[0].seq != after_seq):
            what = f"no event {after_seq} of task {task_id}" if after_seq else f"no task {task_id}"
            raise NotFoundError(f"{what} in tenant {tenant}")
        ended = after_seq > 0 and is_terminal(stored[0])
        return TaskStreamStart(actor, tenant, task_id, after_seq, ended)

    async def follow_task(self, start: TaskStreamStart) -> AsyncIterator[TaskEvent]:
        """The task's events after `start.after_seq`, each once and in order, until its terminal event: live
        from a core subscription opened first, and from the runner's replay for whatever came before or was
        missed (a gap, or a quiet spell that a reconnect may have caused)."""
        if start.ended:
            return
        cursor = EventCursor(next_seq=start.after_seq + 1)
        async with self._tasks.task_events(start.actor, start.tenant, start.task_id) as live:
            batch = await self._stored_or_nothing(start, cursor)
            while True:
                for event in batch:
                    if cursor.accept(event):
                        yield event
                        if is_terminal(event):
                            return
                received = await live.next(self._timeouts.catch_up_seconds)
                if received is None or cursor.gap_before(received):
                    batch = await self._stored_or_nothing(start, cursor)
                else:
                    batch = [received]

    async def stored_events(self, start: TaskStreamStart) -> list[TaskEvent]:
        """Every stored event after `start.after_seq`."""
        return await self._replay_all(start.actor, start.tenant, start.task_id, start.after_seq + 1)

    async def _stored_or_nothing(self, start: TaskStreamStart, cursor: EventCursor) -> list[TaskEvent]:
        # While the runner cannot answer (restarting), live events still arrive; the next quiet spell asks again.
        try:
            return await self._replay_all(start.actor, start.tenant, start.task_id, cursor.next_seq)
        except UnavailableError:
            return []

    async def _replay_page(self, actor: Actor, tenant: str, task_id: str, from_seq: int, limit: int) -> list[TaskEvent]:
        reply = await self._tasks.replay(actor, tenant, task_id, from_seq, limit)
        if reply.error is not None:
            raise UnavailableError(f"the agent-runner could not replay {task_id}: {reply.error.message}")
        return list(reply.events)

    async def _replay_all(self, actor: Actor, tenant: str, task_id: str, from_seq: int) -> list[TaskEvent]:
        events: list[TaskEvent] = []
        while True:
            reply = await self._tasks.replay(actor, tenant, task_id, from_seq, REPLAY_PAGE)
            if reply.error is not None:
                raise UnavailableError(f"the agent-runner could not replay {task_id}: {reply.error.message}")
            events.extend(reply.events)
            if not reply.more:
                return events
            from_seq = reply.next_seq

    # --- approvals --------------------------------------------------------------------------------------

    async def approvals(
        self, identity: Identity, tenant: str | None, include_resolved: bool = False
    ) -> list[ApprovalEntry]:
        """The approvals of the identity's tenants (or one of them), oldest first, as the executor lists them."""
        tenants = self._approver_tenants(identity, tenant)
        found: list[ApprovalEntry] = []
        for each in tenants:
            found += await self._list(identity, each, ApprovalsListRequest(include_resolved=include_resolved))
        return sorted(found, key=lambda entry: entry.request.requested_at)

    async def inbox(self, identity: Identity) -> list[ApprovalView]:
        now = self._clock()
        return [ApprovalView.of(entry.request, now) for entry in await self.approvals(identity, None)]

    async def watch_inbox(self, identity: Identity) -> AsyncIterator[InboxChange]:
        """What waits now, then each approval requested or resolved, live, until the client goes away.
        Subscribed before listing, so nothing requested in between is missed."""
        tenants = identity.approves_for
        if not tenants:
            yield InboxSnapshot([])
            return
        actor = Actor(identity.name, Role.APPROVER)
        async with self._approvals.approval_changes(actor, tenants) as live:
            yield InboxSnapshot(await self.inbox(identity))
            while True:
                change = await live.next(self._timeouts.catch_up_seconds)
                if isinstance(change, ApprovalRequested):
                    yield ApprovalView.of(change, self._clock())
                elif isinstance(change, ApprovalResolved):
                    yield change

    def _approver_tenants(self, identity: Identity, tenant: str | None) -> list[str]:
        if tenant is not None:
            identity.approver(tenant)
            return [tenant]
        if not identity.approves_for:
            raise ForbiddenError(f"{identity.name} is not an approver of any tenant")
        return list(identity.approves_for)

    async def find_approval(self, identity: Identity, approval_id: str, tenant: str | None) -> ApprovalEntry:
        tenants = self._approver_tenants(identity, tenant)
        request = ApprovalsListRequest(include_resolved=True, approval_id=approval_id)
        for each in tenants:
            entries = await self._list(identity, each, request)
            if entries:
                return entries[0]
        raise NotFoundError(f"no approval {approval_id} in tenant {tenant or ', '.join(tenants) or '(none)'}")

    async def decide(
        self,
        identity: Identity,
        approval_id: str,
        decision: Literal["approve", "deny"],
        arguments_sha256: str,
        reason: str | None,
        tenant: str | None,
    ) -> DecisionOutcome:
        """Publish the decision as the identity's own approver and wait for the executor's verdict on it. The
        hash is the one the approver was shown: the executor refuses it if the call's arguments differ."""
        entry = await self.find_approval(identity, approval_id, tenant)
        request = entry.request
        actor = identity.approver(request.tenant)
        try:
            message = ApprovalDecision(
                approval_id=approval_id,
                decision=decision,
                approver=identity.name,
                arguments_sha256=arguments_sha256,
                reason=reason or None,
            )
        except ValidationError as exc:
            raise InvalidRequestError(_first_error(exc)) from exc
        receipt = await self._approvals.decide(actor, request.tenant, message, self._timeouts.verdict_seconds)
        return DecisionOutcome(request, message, receipt)

    async def _list(self, identity: Identity, tenant: str, request: ApprovalsListRequest) -> list[ApprovalEntry]:
        reply = await self._approvals.list_approvals(identity.approver(tenant), tenant, request)
        if reply.error is not None:
            raise UnavailableError(f"the tool-executor could not list approvals: {reply.error.message}")
        return list(reply.approvals)

    # --- operators --------------------------------------------------------------------------------------

    async def costs(self, identity: Identity, tenant: str | None) -> CostOverview:
        """Month-to-date spend by tenant, agent and model against the monthly budgets, and spend per day."""
        identity.require_operator()
        now = self._clock()
        since = month_start(now)
        budgets = self._budgets
        tenants = await self._report("tenant", None, since)
        charts = [
            self._chart("tenant", "Tenants, this month", tenants, {r.key: budgets.of_tenant(r.key) for r in tenants}),
        ]
        agents = await self._report("agent", tenant, since)
        models = await self._report("model", tenant, since)
        days = await self._report("day", tenant, now - timedelta(days=DAYS_CHARTED))
        scope = f"tenant {tenant}" if tenant else "all tenants"
        charts += [
            self._chart(
                "agent",
                f"Agents of {scope}, this month",
                agents,
                {r.key: budgets.of_agent(tenant, r.key) for r in agents} if tenant else {},
            ),
            self._chart(
                "model",
                f"Models of {scope}, this month",
                models,
                {r.key: budgets.of_model(tenant, r.key) for r in models} if tenant else {},
            ),
            self._chart("day", f"Each day, {scope}, last {DAYS_CHARTED} days", days, {}),
        ]
        users = [
            (name, user, limit)
            for name, tenant_budgets in budgets.tenants.items()
            if tenant is None or name == tenant
            for user, limit in tenant_budgets.users.items()
        ]
        return CostOverview(tenant, since, charts, users)

    def _chart(
        self, dimension: CostDimension, title: str, rows: list[CostRow], limits: dict[str, Limit | None]
    ) -> CostChart:
        return CostChart(dimension, title, cost_bars(rows, limits), round(sum(r.cost_usd for r in rows), 9))

    async def _report(self, by: CostDimension, tenant: str | None, since: datetime) -> list[CostRow]:
        reply: CostReportReply = await self._operator.cost_report(CostReportRequest(tenant=tenant, by=by, since=since))
        if reply.error is not None:
            raise UnavailableError(f"the cost-accountant could not report: {reply.error.message}")
        rows = [CostRow(row.key, row.cost_usd, row.calls) for row in reply.rows]
        return sorted(rows, key=lambda r: r.key) if by == "day" else sorted(rows, key=lambda r: -r.cost_usd)

    async def health(self, identity: Identity) -> Health:
        identity.require_operator()
        return Health(await self._probe.readiness(), await self._operator.consumer_states())


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(p) for p in error["loc"]) or "request"
    return f"{location}: {error['msg']}"
