"""`agentbus run-workflow` and `agentbus workflows list|status|cancel`: multi-agent workflows on the bus.

Everything goes through the wire contract as the tenant's submitter: the workflows are asked of the
orchestrator (`agentbus.workflows.list.<tenant>`), a run is published on
`agentbus.workflows.submit.<tenant>.<submitter>`, its events are followed on a core subscription to
`agentbus.workflows.events.<tenant>.<run_id>` (subscribed before submitting) and what a subscription missed is
asked of the orchestrator by a replay request. A run's status is its events folded: each step's phase,
attempt, start and completion time, and the run's outputs once it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import click
import nats.errors
from agentbus.cli.config import resolve_identities, run_nats, submitter_credential
from agentbus.cli.identities import IdentityError
from agentbus.cli.inputs import check_identifier, parse_input
from agentbus.cli.tasks import ANONYMOUS_SUBMITTER
from agentbus.contracts.registry import (
    WORKFLOW_CANCEL,
    WORKFLOW_EVENT,
    WORKFLOW_REPLAY,
    WORKFLOW_SUBMIT,
    WORKFLOWS_LIST,
    Header,
)
from agentbus.contracts.workflows import (
    WORKFLOW_EVENT_ADAPTER,
    WORKFLOW_TERMINAL_EVENT_KINDS,
    WorkflowCancelRequested,
    WorkflowEventKind,
    WorkflowInfo,
    WorkflowReplayReply,
    WorkflowReplayRequest,
    WorkflowsListReply,
    WorkflowsListRequest,
    WorkflowSubmitted,
)
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from pydantic import ValidationError

EXIT_RUN_UNSUCCESSFUL = 1
EXIT_TIMEOUT = 3
REQUEST_TIMEOUT_SECONDS = 5.0
CATCH_UP_SECONDS = 3.0
"""With no live event for this long, the follower asks the orchestrator for what it may have missed."""
DEFAULT_TENANT = "acme"


class WorkflowRequestError(click.ClickException):
    """The orchestrator answered with an error, or not at all."""


# --- talking to the orchestrator -------------------------------------------------------------------


async def list_workflows(nc: NatsClient, tenant: str, name: str | None = None) -> list[WorkflowInfo]:
    """The workflows the orchestrator runs for `tenant` (or the one named)."""
    request = WorkflowsListRequest(name=name)
    try:
        msg = await nc.request(
            WORKFLOWS_LIST.format(tenant=tenant), request.model_dump_json().encode(), timeout=REQUEST_TIMEOUT_SECONDS
        )
    except nats.errors.NoRespondersError as exc:
        raise WorkflowRequestError("no workflow-orchestrator is running (is `agentbus up` running?)") from exc
    except nats.errors.TimeoutError as exc:
        raise WorkflowRequestError(
            f"the workflow-orchestrator did not answer within {REQUEST_TIMEOUT_SECONDS:g}s"
        ) from exc
    reply = WorkflowsListReply.model_validate_json(msg.data)
    if reply.error is not None:
        raise WorkflowRequestError(f"{reply.error.code}: {reply.error.message}")
    return reply.workflows


async def replay_run(nc: NatsClient, tenant: str, run_id: str, from_seq: int = 1) -> list[WorkflowEventKind]:
    """Every stored event of a run from `from_seq`, page by page."""
    events: list[WorkflowEventKind] = []
    subject = WORKFLOW_REPLAY.format(tenant=tenant, run_id=run_id)
    while True:
        request = WorkflowReplayRequest(from_seq=from_seq)
        try:
            msg = await nc.request(subject, request.model_dump_json().encode(), timeout=REQUEST_TIMEOUT_SECONDS)
        except nats.errors.NoRespondersError as exc:
            raise WorkflowRequestError("no workflow-orchestrator is serving replays") from exc
        except nats.errors.TimeoutError as exc:
            raise WorkflowRequestError("the workflow-orchestrator did not answer a replay in time") from exc
        try:
            reply = WorkflowReplayReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise WorkflowRequestError(f"unreadable replay reply: {exc.errors()[0]['msg']}") from exc
        if reply.error is not None:
            raise WorkflowRequestError(f"{reply.error.code}: {reply.error.message}")
        events.extend(reply.events)
        if not reply.more:
            return events
        from_seq = reply.next_seq


class RunFollower:
    """Yields a run's events once each, in order, from seq 1 until its terminal event."""

    def __init__(self, nc: NatsClient, tenant: str, run_id: str) -> None:
        self._nc = nc
        self._tenant = tenant
        self._run_id = run_id
        self._subscription: Subscription | None = None
        self._next_seq = 1

    async def __aenter__(self) -> RunFollower:
        """Subscribe: do this before submitting, so no live event can be missed."""
        self._subscription = await self._nc.subscribe(WORKFLOW_EVENT.format(tenant=self._tenant, run_id=self._run_id))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _stored(self) -> list[WorkflowEventKind]:
        """What the orchestrator stored from the next expected seq; nothing while it cannot answer (it may be
        restarting): live events still arrive, and the next quiet spell asks again."""
        try:
            return await replay_run(self._nc, self._tenant, self._run_id, self._next_seq)
        except WorkflowRequestError:
            return []

    async def events(self, *, replay_first: bool = False) -> AsyncIterator[WorkflowEventKind]:
        assert self._subscription is not None, "use `async with RunFollower(...)`"
        pending = await self._stored() if replay_first else []
        while True:
            for event in pending:
                if event.seq < self._next_seq:
                    continue
                self._next_seq = event.seq + 1
                yield event
                if event.kind in WORKFLOW_TERMINAL_EVENT_KINDS:
                    return
            try:
                msg = await self._subscription.next_msg(timeout=CATCH_UP_SECONDS)
            except (nats.errors.TimeoutError, TimeoutError):
                pending = await self._stored()  # quiet for a while: a reconnect may have dropped an event
                continue
            try:
                pending = [WORKFLOW_EVENT_ADAPTER.validate_json(msg.data)]
            except ValidationError:
                pending = []
            if pending and pending[0].seq > self._next_seq:
                pending = await self._stored()  # a gap: the stored events before this one come first


async def run_workflow(
    nc: NatsClient,
    submission: WorkflowSubmitted,
    submitter: str,
    *,
    on_event: Callable[[WorkflowEventKind], None] | None,
    wait_seconds: float,
) -> str | None:
    """Publish the run as `submitter` (Nats-Msg-Id = run id). With `on_event`, follow its events until a
    terminal one and return its kind (None on timeout)."""
    async with RunFollower(nc, submission.tenant, submission.run_id) as follower:
        ack = await nc.jetstream().publish(
            WORKFLOW_SUBMIT.format(tenant=submission.tenant, submitter=submitter),
            submission.model_dump_json().encode(),
            headers={Header.MSG_ID.value: submission.run_id},
        )
        if on_event is None:
            return None
        try:
            async with asyncio.timeout(wait_seconds):
                async for event in follower.events(replay_first=bool(ack.duplicate)):
                    on_event(event)
                    if event.kind in WORKFLOW_TERMINAL_EVENT_KINDS:
                        return event.kind
        except TimeoutError:
            return None
    return None


# --- showing a run ---------------------------------------------------------------------------------


PHASES = {
    "step_started": "Running",
    "step_waiting": "Waiting",
    "step_completed": "Succeeded",
    "step_skipped": "Skipped",
}


@dataclass
class StepStatus:
    name: str
    agent: str = ""
    phase: str = "Pending"
    attempt: int = 0
    task_id: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    detail: str = ""


@dataclass
class RunStatus:
    """A run as its events tell it (the seed's WorkflowRun status)."""

    run_id: str
    workflow: str = ""
    phase: str = "Pending"
    started_at: datetime | None = None
    completed_at: datetime | None = None
    steps: list[StepStatus] = field(default_factory=list)
    outputs: dict[str, Any] | None = None
    cost_usd: float = 0.0
    detail: str = ""

    def step(self, name: str) -> StepStatus:
        found = next((s for s in self.steps if s.name == name), None)
        if found is None:
            found = StepStatus(name)
            self.steps.append(found)
        return found


def fold(run_id: str, events: Sequence[WorkflowEventKind]) -> RunStatus:
    """A run's status from its events, in order."""
    status = RunStatus(run_id)
    for event in events:
        match event.kind:
            case "accepted":
                status.workflow, status.phase, status.started_at = event.workflow, "Running", event.at
                status.steps = [StepStatus(s.name, s.agent) for s in event.steps]
            case "queued":
                status.phase = "Queued"
            case "step_started" | "step_waiting" | "step_completed" | "step_failed":
                step = status.step(event.step)
                step.attempt, step.task_id = event.attempt, event.task_id
                if event.kind == "step_started":
                    status.phase = "Running"
                    step.started_at = step.started_at or event.at
                    step.detail = ""
                if event.kind == "step_waiting":
                    step.detail = f"waits for approval {event.approval_id} ({event.tool})"
                if event.kind == "step_failed":
                    step.phase = "Retrying" if event.will_retry else "Failed"
                    step.detail = f"{event.error.code}: {event.error.message}"
                else:
                    step.phase = PHASES[event.kind]
                if event.kind in ("step_completed", "step_failed") and not (
                    event.kind == "step_failed" and event.will_retry
                ):
                    step.completed_at = event.at
            case "step_skipped":
                step = status.step(event.step)
                step.phase, step.completed_at, step.detail = "Skipped", event.at, event.reason
            case "completed" | "failed" | "cancelled" | "rejected":
                status.completed_at = event.at
                status.phase = {
                    "completed": "Succeeded",
                    "failed": "Failed",
                    "cancelled": "Cancelled",
                    "rejected": "Rejected",
                }[event.kind]
                if event.kind == "completed":
                    status.outputs, status.cost_usd = event.outputs, event.cost_usd
                elif event.kind in ("failed", "rejected"):
                    status.detail = f"{event.error.code}: {event.error.message}"
                if event.kind in ("failed", "cancelled"):
                    status.cost_usd = event.cost_usd
                if event.kind == "cancelled":
                    status.detail = " ".join(p for p in (f"by {event.by}" if event.by else "", event.reason or "") if p)
                for step in status.steps:
                    if step.phase in ("Running", "Waiting", "Retrying"):
                        step.phase, step.completed_at = "Cancelled", event.at
    return status


def _time(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else "-"


def format_status(status: RunStatus) -> str:
    lines = [
        f"run {status.run_id}  workflow {status.workflow or '?'}  phase {status.phase}  "
        f"started {_time(status.started_at)}  completed {_time(status.completed_at)}  cost_usd {status.cost_usd:.6f}"
    ]
    if status.detail:
        lines.append(f"  {status.detail}")
    lines.append(f"{'STEP':<22} {'PHASE':<10} {'TRY':>3} {'STARTED':<21} {'COMPLETED':<21} TASK")
    for step in status.steps:
        lines.append(
            f"{step.name:<22} {step.phase:<10} {step.attempt:>3} {_time(step.started_at):<21} "
            f"{_time(step.completed_at):<21} {step.task_id or '-'}"
        )
        if step.detail and step.phase not in ("Succeeded",):
            lines.append(f"{'':<22} {step.detail}")
    if status.outputs is not None:
        lines.append("outputs: " + json.dumps(status.outputs, indent=2, ensure_ascii=False))
    return "\n".join(lines)


def describe(event: WorkflowEventKind) -> str:
    """One human-readable line for a run's event."""
    head = f"{event.seq:>3} {event.kind:<15}"
    match event.kind:
        case "accepted":
            return f"{head} workflow={event.workflow} steps={[s.name for s in event.steps]}"
        case "queued":
            return f"{head} waits for a slot (maxConcurrent {event.max_concurrent})"
        case "step_started":
            return f"{head} {event.step} (attempt {event.attempt}, agent {event.agent}) task {event.task_id}"
        case "step_waiting":
            return f"{head} {event.step} waits for approval {event.approval_id} ({event.tool})"
        case "step_completed":
            outputs = _short(json.dumps(event.outputs, ensure_ascii=False))
            return f"{head} {event.step} (attempt {event.attempt}) outputs {outputs}"
        case "step_failed":
            again = "; retrying" if event.will_retry else ""
            return f"{head} {event.step} (attempt {event.attempt}) {event.error.code}: {event.error.message}{again}"
        case "step_skipped":
            return f"{head} {event.step}: {event.reason}"
        case "completed":
            outputs = json.dumps(event.outputs, indent=2, ensure_ascii=False)
            return f"{head} cost_usd={event.cost_usd:.6f}\noutputs: {outputs}"
        case "failed" | "rejected":
            return f"{head} {event.error.code}: {event.error.message}"
        case "cancelled":
            by = f" by {event.by}" if event.by else ""
            return f"{head}{by} {event.reason or ''}".rstrip()


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


# --- the commands ----------------------------------------------------------------------------------


def default_tenant() -> str:
    """The first tenant of the identities `agentbus up` enforces; `acme` when it enforces none."""
    try:
        identities = resolve_identities()
    except IdentityError as exc:
        raise click.UsageError(str(exc)) from exc
    if identities is None:
        return DEFAULT_TENANT
    with_submitters = [tenant for tenant, members in identities.tenants.items() if members.submitters]
    if not with_submitters:
        raise click.UsageError("no tenant in the identities file has a submitter: name one with --tenant")
    return with_submitters[0]


tenant_option = click.option("--tenant", default=None, help="The tenant. Default: the first of the identities file.")
as_option = click.option("--as", "submitter", default=None, help="As this submitter of the tenant. Default: its first.")
nats_url_option = click.option("--nats-url", default=None, help="NATS URL. Default: ./.agentbus/env, then :4222.")


def _coerce(info: WorkflowInfo, pairs: Sequence[str]) -> dict[str, Any]:
    """`--input k=v` values as the types the workflow declares (text for strings, JSON for the rest)."""
    declared = {item.name: item for item in info.inputs}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.UsageError(f"--input: use NAME=VALUE (got {pair!r})")
        item = declared.get(name)
        if item is None:
            raise click.UsageError(f"--input: workflow {info.name!r} has no input {name!r}; inputs: {sorted(declared)}")
        if item.type == "string":
            values[name] = text
            continue
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--input {name}: {item.type} expected, as JSON (got {text!r})") from exc
    return values


@click.command("run-workflow")
@click.argument("name")
@click.option("--input", "inputs", multiple=True, metavar="NAME=VALUE", help="An input of the workflow (repeat).")
@tenant_option
@as_option
@click.option("--run-id", default=None, help="Default: a new random id. Resubmitting an id runs nothing new.")
@click.option("--budget-usd", type=float, default=None, help="Spending cap of the whole run.")
@click.option("--deadline", "deadline_seconds", type=float, default=None, help="Seconds the run may take.")
@click.option("--wait/--no-wait", default=False, help="Print the run's progress live until it ends.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait with --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@nats_url_option
def run_workflow_command(
    name: str,
    inputs: tuple[str, ...],
    tenant: str | None,
    submitter: str | None,
    run_id: str | None,
    budget_usd: float | None,
    deadline_seconds: float | None,
    wait: bool,
    timeout: float,
    as_json: bool,
    nats_url: str | None,
) -> None:
    """Run workflow NAME. With --wait, show each step as it starts, waits, completes or fails; exit 0 only when
    the run completes (1 when it fails, is cancelled or rejected, 3 on timeout)."""
    check_identifier("NAME", name)
    check_identifier("--tenant", tenant)
    tenant = tenant or default_tenant()
    credential, submitter = submitter_credential(tenant, submitter)
    token = submitter or ANONYMOUS_SUBMITTER

    async def action(nc: NatsClient) -> str | None:
        [info] = await list_workflows(nc, tenant, name)
        submission = parse_input(
            WorkflowSubmitted,
            run_id=run_id or f"run-{uuid.uuid4().hex[:16]}",
            tenant=tenant,
            workflow=name,
            input=_coerce(info, inputs),
            budget_usd=budget_usd,
            deadline_seconds=deadline_seconds,
        )
        if not wait:
            await run_workflow(nc, submission, token, on_event=None, wait_seconds=timeout)
            click.echo(submission.run_id)
            return None
        click.echo(f"run {submission.run_id} of {name} submitted as {token}", err=True)

        def show(event: WorkflowEventKind) -> None:
            click.echo(event.model_dump_json() if as_json else describe(event))

        outcome = await run_workflow(nc, submission, token, on_event=show, wait_seconds=timeout)
        if outcome is None:
            click.echo(
                f"timed out after {timeout:g}s waiting for {submission.run_id}; it may still run: "
                f"`agentbus workflows status {submission.run_id} --tenant {tenant}` shows where it is",
                err=True,
            )
        return outcome

    outcome = run_nats(nats_url, credential, action)
    if not wait:
        return
    if outcome is None:
        sys.exit(EXIT_TIMEOUT)
    if outcome != "completed":
        sys.exit(EXIT_RUN_UNSUCCESSFUL)


@click.group("workflows")
def workflows_group() -> None:
    """Multi-agent workflows: what the orchestrator runs, and how a run goes."""


@workflows_group.command("list")
@tenant_option
@as_option
@click.option("--json", "as_json", is_flag=True, help="Print each workflow as a JSON line.")
@nats_url_option
def list_command(tenant: str | None, submitter: str | None, as_json: bool, nats_url: str | None) -> None:
    """The workflows the orchestrator runs: inputs, steps and what each step depends on."""
    check_identifier("--tenant", tenant)
    tenant = tenant or default_tenant()
    credential, _ = submitter_credential(tenant, submitter)
    found = run_nats(nats_url, credential, lambda nc: list_workflows(nc, tenant))
    if not found:
        click.echo("no workflows (add workflows/*.yaml and restart `agentbus up`)")
    for info in found:
        if as_json:
            click.echo(info.model_dump_json())
            continue
        limit = f", at most {info.max_concurrent} at once ({info.concurrency_policy})" if info.max_concurrent else ""
        click.echo(f"{info.name}: {info.description or info.display_name}")
        click.echo(f"  timeout {info.timeout_seconds:g}s, onStepFailure {info.on_step_failure}{limit}")
        for item in info.inputs:
            extra = " required" if item.required else (f" default {item.default!r}" if item.default is not None else "")
            choices = f" one of {item.enum}" if item.enum else ""
            click.echo(f"  input {item.name} ({item.type}){extra}{choices}")
        for step in info.steps:
            after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
            click.echo(f"  step {step.name}: agent {step.agent}{after}")


@workflows_group.command("status")
@click.argument("run_id")
@tenant_option
@as_option
@click.option("--events", "show_events", is_flag=True, help="Also print every event of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@nats_url_option
def status_command(
    run_id: str, tenant: str | None, submitter: str | None, show_events: bool, as_json: bool, nats_url: str | None
) -> None:
    """A run's phase, each step's phase, attempt, start and completion time, and its outputs."""
    check_identifier("RUN_ID", run_id)
    check_identifier("--tenant", tenant)
    tenant = tenant or default_tenant()
    credential, _ = submitter_credential(tenant, submitter)
    events = run_nats(nats_url, credential, lambda nc: replay_run(nc, tenant, run_id))
    if not events:
        raise click.ClickException(f"no run {run_id} in tenant {tenant}")
    if show_events:
        for event in events:
            click.echo(describe(event))
    status = fold(run_id, events)
    click.echo(json.dumps(asdict(status), default=str, indent=2) if as_json else format_status(status))


@workflows_group.command("cancel")
@click.argument("run_id")
@tenant_option
@as_option
@click.option("--reason", default=None, help="Why; kept in the cancelled event.")
@nats_url_option
def cancel_command(
    run_id: str, tenant: str | None, submitter: str | None, reason: str | None, nats_url: str | None
) -> None:
    """Cancel a run and its running steps; a run that ended is left as it is."""
    check_identifier("--tenant", tenant)
    tenant = tenant or default_tenant()
    credential, submitter = submitter_credential(tenant, submitter)
    token = submitter or ANONYMOUS_SUBMITTER
    request = parse_input(WorkflowCancelRequested, run_id=run_id, tenant=tenant, reason=reason)

    async def action(nc: NatsClient) -> None:
        await nc.jetstream().publish(
            WORKFLOW_CANCEL.format(tenant=tenant, submitter=token), request.model_dump_json().encode()
        )

    run_nats(nats_url, credential, action)
    click.echo(f"cancellation of {run_id} sent as {token}; `agentbus workflows status {run_id}` shows it")
