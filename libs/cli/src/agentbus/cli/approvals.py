"""`agentbus approvals`: what waits for a human decision, and the decision itself.

A tenant's approvals are asked of the tool-executor (`agentbus.approvals.list.<tenant>`, which an
approver's permissions name); the operator, reading every tenant at once, replays the approvals stream.
New and resolved approvals are followed on core subscriptions. A decision is published as the approver
(with the approver's own NATS credentials when the server enforces identities), under a message id nobody
else can predict, and carries exactly the arguments hash of the request it was shown; the command then
waits for the executor's verdict on that decision (its stream sequence). Exit codes: 0 accepted, 1 refused /
unknown / not pending, 2 usage error, 3 no verdict in time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import click
import nats.errors
from agentbus.cli.config import admin_credential, credential_of, resolve_identities, run_nats
from agentbus.cli.identities import Credential, IdentityError, approver_user
from agentbus.cli.inputs import check_identifier, describe_validation_error
from agentbus.cli.replay import replay
from agentbus.contracts.approvals import (
    ApprovalDecision,
    ApprovalDecisionVerdict,
    ApprovalRequested,
    ApprovalResolved,
    ApprovalsListReply,
    ApprovalsListRequest,
)
from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS,
    APPROVALS_LIST,
)
from agentbus.runtime.publishing import publish_message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

REPLAY_MESSAGE_TIMEOUT_SECONDS = 5.0
LIST_TIMEOUT_SECONDS = 10.0
VERDICT_TIMEOUT_SECONDS = 15.0
ARGUMENTS_COLUMN_WIDTH = 48
EXIT_NO_VERDICT = 3


@dataclass(frozen=True)
class Approval:
    """A request and, once it ended, how."""

    request: ApprovalRequested
    resolution: ApprovalResolved | None = None

    def expired(self, now: datetime) -> bool:
        return self.resolution is None and self.request.expires_at <= now

    def status(self, now: datetime) -> str:
        if self.resolution is not None:
            by = f" by {self.resolution.by}" if self.resolution.by else ""
            return f"{self.resolution.outcome}{by} at {self.resolution.at:%Y-%m-%d %H:%M:%S}Z"
        return "pending (expired, awaiting the executor)" if self.expired(now) else "pending"


def human_duration(seconds: float) -> str:
    """`45s`, `12m`, `3h 5m`, `2d 4h`: two units at most."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def _expiry(request: ApprovalRequested, now: datetime) -> str:
    left = (request.expires_at - now).total_seconds()
    return f"in {human_duration(left)}" if left > 0 else f"{human_duration(-left)} ago"


def _compact(arguments: dict[str, Any], width: int = ARGUMENTS_COLUMN_WIDTH) -> str:
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


async def _backlog(nc: NatsClient, subject: str) -> list[Msg]:
    """Every message stored on `subject` when the replay started."""
    stored = await replay(nc, APPROVALS.name, subject)
    messages: list[Msg] = []
    try:
        while len(messages) < stored.backlog:
            messages.append(await stored.subscription.next_msg(timeout=REPLAY_MESSAGE_TIMEOUT_SECONDS))
    finally:
        await stored.close()
    return messages


def _decode_request(msg: Msg) -> ApprovalRequested | None:
    try:
        return ApprovalRequested.model_validate_json(msg.data)
    except ValidationError as exc:
        click.echo(f"skipping an unreadable approval request on {msg.subject}: {exc.errors()[0]['msg']}", err=True)
        return None


def _decode_resolution(msg: Msg) -> ApprovalResolved | None:
    try:
        return ApprovalResolved.model_validate_json(msg.data)
    except ValidationError as exc:
        click.echo(f"skipping an unreadable approval outcome on {msg.subject}: {exc.errors()[0]['msg']}", err=True)
        return None


async def load_approvals(nc: NatsClient, tenants: Sequence[str] | None) -> dict[str, Approval]:
    """Every approval of `tenants` in request order, joined with its resolution. Each tenant's are asked of
    the tool-executor; every tenant's (`tenants` None, the operator) are read from the approvals stream."""
    if tenants is None:
        return await _load_from_stream(nc)
    found: list[Approval] = []
    for tenant in tenants:
        request = ApprovalsListRequest(include_resolved=True)
        try:
            msg = await nc.request(
                APPROVALS_LIST.format(tenant=tenant), request.model_dump_json().encode(), timeout=LIST_TIMEOUT_SECONDS
            )
        except nats.errors.NoRespondersError as exc:
            raise click.ClickException("no tool-executor is running to list approvals") from exc
        except nats.errors.TimeoutError as exc:
            raise click.ClickException(
                f"the tool-executor did not list approvals within {LIST_TIMEOUT_SECONDS:g}s"
            ) from exc
        try:
            reply = ApprovalsListReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise click.ClickException(f"unreadable approvals list: {exc.errors()[0]['msg']}") from exc
        if reply.error is not None:
            raise click.ClickException(f"listing approvals failed: {reply.error.code}: {reply.error.message}")
        found += [Approval(entry.request, entry.resolution) for entry in reply.approvals]
    ordered = sorted(found, key=lambda a: a.request.requested_at)
    return {a.request.approval_id: a for a in ordered}


async def _load_from_stream(nc: NatsClient) -> dict[str, Approval]:
    requests: dict[str, ApprovalRequested] = {}
    resolutions: dict[str, ApprovalResolved] = {}
    for msg in await _backlog(nc, APPROVAL_RESOLVED.wildcard):
        if (resolution := _decode_resolution(msg)) is not None:
            resolutions.setdefault(resolution.approval_id, resolution)
    for msg in await _backlog(nc, APPROVAL_PENDING.wildcard):
        if (request := _decode_request(msg)) is not None:
            requests.setdefault(request.approval_id, request)
    ordered = sorted(requests.values(), key=lambda r: r.requested_at)
    return {r.approval_id: Approval(r, resolutions.get(r.approval_id)) for r in ordered}


@dataclass(frozen=True)
class _Reader:
    credential: Credential | None
    tenants: tuple[str, ...] | None


def _reader(tenant: str | None, approver: str | None) -> _Reader:
    """Who reads (the approver, or the operator) and which tenants: --tenant, else the approver's own."""
    if approver is None:
        return _Reader(admin_credential(), (tenant,) if tenant else None)
    credential = credential_of(approver_user(approver))
    if tenant:
        return _Reader(credential, (tenant,))
    try:
        identities = resolve_identities()
    except IdentityError as exc:
        raise click.UsageError(str(exc)) from exc
    if identities is None:
        return _Reader(credential, None)
    tenants = identities.approvers().get(approver, ())
    if not tenants:
        raise click.UsageError(f"{approver!r} is not an approver of any tenant in the identities file")
    return _Reader(credential, tenants)


APPROVAL_COLUMNS = ("ID", "TENANT", "TOOL", "RISK", "AGE", "EXPIRES", "ARGUMENTS")
RIGHT_ALIGNED = {"AGE", "EXPIRES"}


def _approval_cells(approval: Approval, now: datetime) -> list[str]:
    r = approval.request
    return [
        r.approval_id,
        r.tenant,
        r.tool,
        r.risk,
        human_duration((now - r.requested_at).total_seconds()),
        _expiry(r, now),
        _compact(r.arguments),
    ]


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table, each column as wide as its widest cell; the last one is not padded."""
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=False)]
    lines = []
    for cells in (columns, *rows):
        padded = [
            cell.rjust(width) if name in RIGHT_ALIGNED else cell.ljust(width)
            for name, cell, width in zip(columns, cells, widths, strict=True)
        ]
        lines.append("  ".join([*padded[:-1], cells[-1]]))
    return lines


tenant_option = click.option("--tenant", default=None, help="Only this tenant. Default: the approver's tenants.")
as_reader_option = click.option(
    "--as", "approver", default=None, help="Read as this approver. Default: as the operator."
)
nats_url_option = click.option("--nats-url", default=None, help="NATS URL. Default: as for every command.")


@click.group()
def approvals() -> None:
    """Tool calls waiting for a human decision: list, show, approve, deny, watch."""


@approvals.command("list")
@tenant_option
@as_reader_option
@click.option("--all", "show_all", is_flag=True, help="Also approvals that already ended.")
@click.option("--json", "as_json", is_flag=True, help="Print each request as a JSON line.")
@nats_url_option
def list_approvals(
    tenant: str | None, approver: str | None, show_all: bool, as_json: bool, nats_url: str | None
) -> None:
    """Pending approvals: tool, arguments, risk, age and expiry."""
    check_identifier("--tenant", tenant)
    check_identifier("--as", approver)
    reader = _reader(tenant, approver)
    found = run_nats(nats_url, reader.credential, lambda nc: load_approvals(nc, reader.tenants))
    now = utc_now()
    shown = [a for a in found.values() if show_all or a.resolution is None]
    if as_json:
        for approval in shown:
            click.echo(approval.request.model_dump_json())
        return
    if not shown:
        click.echo("no pending approvals" if not show_all else "no approvals", err=True)
        return
    columns = APPROVAL_COLUMNS + (("STATUS",) if show_all else ())
    rows = [_approval_cells(a, now) + ([a.status(now)] if show_all else []) for a in shown]
    for line in format_table(columns, rows):
        click.echo(line)


def _find(found: dict[str, Approval], approval_id: str, tenants: tuple[str, ...] | None) -> Approval:
    approval = found.get(approval_id)
    if approval is None:
        scope = f" of tenant(s) {', '.join(tenants)}" if tenants else ""
        raise click.ClickException(f"no approval {approval_id}{scope}")
    return approval


@approvals.command("show")
@click.argument("approval_id")
@tenant_option
@as_reader_option
@nats_url_option
def show(approval_id: str, tenant: str | None, approver: str | None, nats_url: str | None) -> None:
    """Everything about one approval, with its full arguments and their hash."""
    check_identifier("APPROVAL_ID", approval_id)
    check_identifier("--tenant", tenant)
    check_identifier("--as", approver)
    reader = _reader(tenant, approver)
    approval = _find(
        run_nats(nats_url, reader.credential, lambda nc: load_approvals(nc, reader.tenants)),
        approval_id,
        reader.tenants,
    )
    now = utc_now()
    r = approval.request
    requested = f"{r.requested_at:%Y-%m-%d %H:%M:%S}Z ({human_duration((now - r.requested_at).total_seconds())} ago)"
    fields = [
        ("approval", r.approval_id),
        ("status", approval.status(now)),
        ("tenant", r.tenant),
        ("task", r.task_id),
        ("agent", r.agent),
        ("tool", r.tool),
        ("risk", r.risk),
        ("reason", r.reason),
        ("requested", requested + (f" by {r.requested_by}" if r.requested_by else "")),
        ("expires", f"{r.expires_at:%Y-%m-%d %H:%M:%S}Z ({_expiry(r, now)})"),
        ("sha256", r.arguments_sha256),
    ]
    for name, value in fields:
        click.echo(f"{name:<10} {value}")
    click.echo("arguments")
    click.echo("  " + json.dumps(r.arguments, indent=2, ensure_ascii=False).replace("\n", "\n  "))


def _decide(
    decision: Literal["approve", "deny"],
    approval_id: str,
    approver: str,
    reason: str | None,
    tenant: str | None,
    nats_url: str | None,
) -> None:
    check_identifier("APPROVAL_ID", approval_id)
    check_identifier("--as", approver)
    check_identifier("--tenant", tenant)
    reader = _reader(tenant, approver)

    async def action(nc: NatsClient) -> ApprovalDecisionVerdict | None:
        approval = _find(await load_approvals(nc, reader.tenants), approval_id, reader.tenants)
        request = approval.request
        if approval.resolution is not None:
            raise click.ClickException(f"approval {approval_id} is not pending: {approval.status(utc_now())}")
        if approval.expired(utc_now()):
            raise click.ClickException(f"approval {approval_id} expired at {request.expires_at:%Y-%m-%d %H:%M:%S}Z")
        try:
            message = ApprovalDecision(
                approval_id=request.approval_id,
                decision=decision,
                approver=approver,
                arguments_sha256=request.arguments_sha256,
                reason=reason,
            )
        except ValidationError as exc:
            raise click.UsageError(describe_validation_error(exc)) from exc
        verb = "approving" if decision == "approve" else "denying"
        click.echo(f"{verb} {request.approval_id}: tool {request.tool} for task {request.task_id} ({request.tenant})")
        click.echo(f"  arguments {json.dumps(request.arguments, ensure_ascii=False)}")
        click.echo(f"  arguments_sha256 {request.arguments_sha256}")
        # Listen before publishing, so the verdict cannot come before the subscription.
        verdicts = await nc.subscribe(APPROVAL_VERDICT.format(tenant=request.tenant, approver=approver))
        try:
            ack = await publish_message(
                nc.jetstream(),
                APPROVAL_DECISION.format(tenant=request.tenant, approver=approver),
                message,
                # Random: nobody else can predict it, so nobody can pre-empt this decision as a duplicate.
                msg_id=f"decision:{uuid.uuid4().hex}",
            )
            if ack.duplicate:
                raise click.ClickException("the server dropped this decision as a duplicate; nothing was decided")
            return await _verdict_of(verdicts, ack.seq)
        finally:
            await verdicts.unsubscribe()

    verdict = run_nats(nats_url, reader.credential, action)
    if verdict is None:
        click.echo(
            f"sent {decision} by {approver}, but the tool-executor gave no verdict within "
            f"{VERDICT_TIMEOUT_SECONDS:g}s (is it running?); `agentbus approvals show {approval_id}` tells later",
            err=True,
        )
        sys.exit(EXIT_NO_VERDICT)
    if verdict.outcome == "refused":
        detail = f": {verdict.detail}" if verdict.detail else ""
        raise click.ClickException(f"the tool-executor refused the decision ({verdict.reason_code}){detail}")
    click.echo(f"{'approved' if decision == 'approve' else 'denied'} {approval_id} as {approver}: accepted")


async def _verdict_of(verdicts: Any, decision_seq: int) -> ApprovalDecisionVerdict | None:
    """The executor's verdict on the decision stored at `decision_seq`, or None when none came in time."""
    try:
        async with asyncio.timeout(VERDICT_TIMEOUT_SECONDS):
            while True:
                msg = await verdicts.next_msg(timeout=VERDICT_TIMEOUT_SECONDS)
                try:
                    verdict = ApprovalDecisionVerdict.model_validate_json(msg.data)
                except ValidationError:
                    continue
                if verdict.decision_seq == decision_seq:
                    return verdict
    except (TimeoutError, nats.errors.TimeoutError):
        return None


approver_option = click.option("--as", "approver", required=True, help="The approver deciding (their credentials).")
reason_option = click.option("--reason", default=None, help="Why; kept in the audit trail.")
decision_tenant_option = click.option(
    "--tenant", default=None, help="The approval's tenant. Default: look in each of the approver's tenants."
)


@approvals.command("approve")
@click.argument("approval_id")
@approver_option
@reason_option
@decision_tenant_option
@nats_url_option
def approve(approval_id: str, approver: str, reason: str | None, tenant: str | None, nats_url: str | None) -> None:
    """Approve a pending call: sends the arguments hash shown with the request."""
    _decide("approve", approval_id, approver, reason, tenant, nats_url)


@approvals.command("deny")
@click.argument("approval_id")
@approver_option
@reason_option
@decision_tenant_option
@nats_url_option
def deny(approval_id: str, approver: str, reason: str | None, tenant: str | None, nats_url: str | None) -> None:
    """Deny a pending call."""
    _decide("deny", approval_id, approver, reason, tenant, nats_url)


def _describe_pending(request: ApprovalRequested) -> str:
    return (
        f"pending   {request.approval_id} tenant={request.tenant} tool={request.tool} risk={request.risk} "
        f"expires {_expiry(request, utc_now())} sha256={request.arguments_sha256[:12]}… "
        f"arguments={_compact(request.arguments)}"
    )


def _describe_resolved(resolution: ApprovalResolved) -> str:
    by = f" by {resolution.by}" if resolution.by else ""
    return f"resolved  {resolution.approval_id} tenant={resolution.tenant} {resolution.outcome}{by}"


@approvals.command("watch")
@tenant_option
@as_reader_option
@nats_url_option
def watch(tenant: str | None, approver: str | None, nats_url: str | None) -> None:
    """Print approvals as they are requested and resolved, until Ctrl-C."""
    check_identifier("--tenant", tenant)
    check_identifier("--as", approver)
    reader = _reader(tenant, approver)

    def line(msg: Msg) -> str | None:
        if msg.subject.startswith(APPROVAL_PENDING.pattern.split("{")[0]):
            request = _decode_request(msg)
            return _describe_pending(request) if request else None
        resolution = _decode_resolution(msg)
        return _describe_resolved(resolution) if resolution else None

    async def action(nc: NatsClient) -> None:
        subjects = (
            [APPROVAL_PENDING.wildcard, APPROVAL_RESOLVED.wildcard]
            if reader.tenants is None
            else [spec.format(tenant=t) for t in reader.tenants for spec in (APPROVAL_PENDING, APPROVAL_RESOLVED)]
        )
        subscriptions = [await nc.subscribe(subject) for subject in subjects]
        scope = ", ".join(reader.tenants) if reader.tenants else "every tenant"
        click.echo(f"watching approvals of {scope} (Ctrl-C to stop)", err=True)
        try:
            await asyncio.gather(*(_print_lines(subscription.messages, line) for subscription in subscriptions))
        finally:
            if not nc.is_closed:
                for subscription in subscriptions:
                    await subscription.unsubscribe()
        # The subscriptions' messages end only when the connection closes: the server went away.
        raise nats.errors.ConnectionClosedError

    try:
        run_nats(nats_url, reader.credential, action)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


async def _print_lines(messages: Any, line: Callable[[Msg], str | None]) -> None:
    async for msg in messages:
        if (text := line(msg)) is not None:
            click.echo(text)
