"""`agentbus sessions list|show|delete`: a submitter's conversations, asked of the agent-runner.

Each request goes on the submitter's own subject (`agentbus.sessions.<op>.<tenant>.<submitter>`), which
nats-server binds to the connecting user, so a submitter only ever sees and deletes its own sessions.
"""

from __future__ import annotations

from typing import TypeVar

import click
import nats.errors
from agentbus.cli.config import run_nats, submitter_credential
from agentbus.cli.identities import Credential
from agentbus.cli.inputs import check_identifier, parse_input
from agentbus.cli.tasks import ANONYMOUS_SUBMITTER
from agentbus.cli.workflows import as_option, default_tenant, nats_url_option, tenant_option
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import SESSION_DELETE, SESSION_SHOW, SESSIONS_LIST, SubjectSpec
from agentbus.contracts.sessions import (
    MAX_SESSIONS_LISTED,
    SessionDeleteReply,
    SessionDeleteRequest,
    SessionShowReply,
    SessionShowRequest,
    SessionsListReply,
    SessionsListRequest,
)
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ValidationError

REQUEST_TIMEOUT_SECONDS = 5.0
_Reply = TypeVar("_Reply", SessionsListReply, SessionShowReply, SessionDeleteReply)


class SessionRequestError(click.ClickException):
    """The runner answered with an error, or not at all."""


async def ask_runner(
    nc: NatsClient, spec: SubjectSpec, tenant: str, submitter: str, request: BaseModel, reply_type: type[_Reply]
) -> _Reply:
    """One sessions request to the agent-runner; its error (or its silence) as one line."""
    subject = spec.format(tenant=tenant, submitter=submitter)
    try:
        msg = await nc.request(subject, request.model_dump_json().encode(), timeout=REQUEST_TIMEOUT_SECONDS)
    except nats.errors.NoRespondersError as exc:
        raise SessionRequestError("no agent-runner is running (is `agentbus up` running?)") from exc
    except nats.errors.TimeoutError as exc:
        raise SessionRequestError(f"the agent-runner did not answer within {REQUEST_TIMEOUT_SECONDS:g}s") from exc
    try:
        reply = reply_type.model_validate_json(msg.data)
    except ValidationError as exc:
        raise SessionRequestError(f"the agent-runner's reply is not a {reply_type.__name__}") from exc
    error: ErrorInfo | None = reply.error
    if error is not None:
        raise SessionRequestError(f"{error.code}: {error.message}")
    return reply


def _who(tenant: str | None, submitter: str | None) -> tuple[str, str, Credential | None]:
    check_identifier("--tenant", tenant)
    tenant = tenant or default_tenant()
    credential, submitter = submitter_credential(tenant, submitter)
    return tenant, submitter or ANONYMOUS_SUBMITTER, credential


store_option = click.option("--store", default=None, help="Only this memory store (memory/*.yaml). Default: every one.")


@click.group("sessions")
def sessions_group() -> None:
    """Conversations (`agentbus submit --session S`): list, show and delete your own."""


@sessions_group.command("list")
@tenant_option
@as_option
@store_option
@click.option("--limit", type=click.IntRange(1, MAX_SESSIONS_LISTED), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each session as a JSON line.")
@nats_url_option
def list_command(
    tenant: str | None, submitter: str | None, store: str | None, limit: int, as_json: bool, nats_url: str | None
) -> None:
    """Your sessions in the tenant, most recently changed first."""
    check_identifier("--store", store)
    tenant, token, credential = _who(tenant, submitter)
    request = parse_input(SessionsListRequest, store=store, limit=limit)
    reply = run_nats(
        nats_url,
        credential,
        lambda nc: ask_runner(nc, SESSIONS_LIST, tenant, token, request, SessionsListReply),
    )
    if not reply.sessions and not as_json:
        click.echo(f"no sessions of {token} in {tenant}")
    for info in reply.sessions:
        if as_json:
            click.echo(info.model_dump_json())
            continue
        state = f", running {info.running}" if info.running else ""
        state += f", {len(info.waiting)} waiting" if info.waiting else ""
        summarized = f" (+{info.summarized_turns} summarized)" if info.summarized_turns else ""
        click.echo(
            f"{info.session_id}  store {info.store}  {info.turns} turns{summarized}  "
            f"updated {info.updated_at:%Y-%m-%d %H:%M:%S}Z{state}"
        )
    if reply.more and not as_json:
        click.echo(f"(more than {limit}; raise --limit)", err=True)


@sessions_group.command("show")
@click.argument("session_id")
@tenant_option
@as_option
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the session as JSON.")
@nats_url_option
def show_command(
    session_id: str, tenant: str | None, submitter: str | None, store: str | None, as_json: bool, nats_url: str | None
) -> None:
    """A session's summary and history, as its next task sees them."""
    check_identifier("SESSION_ID", session_id)
    check_identifier("--store", store)
    tenant, token, credential = _who(tenant, submitter)
    request = parse_input(SessionShowRequest, session_id=session_id, store=store)
    reply = run_nats(
        nats_url,
        credential,
        lambda nc: ask_runner(nc, SESSION_SHOW, tenant, token, request, SessionShowReply),
    )
    if not reply.sessions:
        raise click.ClickException(f"no session {session_id} of {token} in {tenant}")
    for detail in reply.sessions:
        if as_json:
            click.echo(detail.model_dump_json())
            continue
        click.echo(f"session {detail.session_id} (store {detail.store}): {detail.turns} turns")
        if detail.summary:
            click.echo(f"  summary of {detail.summarized_turns} earlier turns: {detail.summary}")
        for turn in detail.history:
            click.echo(f"  task {turn.task_id} at {turn.at:%Y-%m-%d %H:%M:%S}Z")
            for message in turn.messages:
                text = message.content or ", ".join(f"{c.name}({c.arguments})" for c in message.tool_calls)
                click.echo(f"    {message.role}: {text}")


@sessions_group.command("delete")
@click.argument("session_id")
@tenant_option
@as_option
@store_option
@nats_url_option
def delete_command(
    session_id: str, tenant: str | None, submitter: str | None, store: str | None, nats_url: str | None
) -> None:
    """Forget a session's history and summary (refused while a task of it runs or waits)."""
    check_identifier("SESSION_ID", session_id)
    check_identifier("--store", store)
    tenant, token, credential = _who(tenant, submitter)
    request = parse_input(SessionDeleteRequest, session_id=session_id, store=store)
    reply = run_nats(
        nats_url,
        credential,
        lambda nc: ask_runner(nc, SESSION_DELETE, tenant, token, request, SessionDeleteReply),
    )
    if not reply.deleted:
        raise click.ClickException(f"no session {session_id} of {token} in {tenant}")
    click.echo(f"deleted session {session_id} from {', '.join(reply.deleted)}")
