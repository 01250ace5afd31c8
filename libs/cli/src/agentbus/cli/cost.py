"""`agentbus cost report`: the cost-accountant's ledger totals as a table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypeVar

import click
import nats.errors
from agentbus.cli.config import admin_credential, run_nats
from agentbus.cli.inputs import parse_input
from agentbus.contracts.budget import CostReportReply, CostReportRequest
from agentbus.contracts.registry import COST_REPORT
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ValidationError

_Reply = TypeVar("_Reply", bound=BaseModel)

REPORT_KEYS = ("tenant", "task", "agent", "model", "day")


def parse_since(value: str | None) -> datetime | None:
    """`--since`: an ISO date or time (UTC unless it says otherwise), or a span back from now: 30m, 12h, 7d."""
    if value is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither an ISO date/time nor a span like 7d, 12h, 30m") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


NO_KEY = "-"
"""The accountant's key for usage that names nothing of the kind grouped by (a tool call names no model)."""
NO_KEY_MEANING = {
    "model": "tool calls, priced per call rather than by a model's tokens",
    "agent": "usage its service recorded without the agent, such as the retriever's knowledge-base searches",
    "task": "usage recorded outside any task",
}


def _no_key_label(by: str) -> str:
    return f"(no {by})"


def format_report(reply: CostReportReply) -> str:
    """The report as a fixed-width table with a total line, and a note on the row of usage without a key."""
    header = f"{reply.by.upper():<32} {'CALLS':>8} {'PROMPT_TOK':>12} {'COMPL_TOK':>12} {'GPU_S':>10} {'COST_USD':>14}"
    lines = [header]
    for row in reply.rows:
        key = _no_key_label(reply.by) if row.key == NO_KEY else row.key
        lines.append(
            f"{key:<32} {row.calls:>8} {row.prompt_tokens:>12} {row.completion_tokens:>12} "
            f"{row.gpu_seconds:>10.1f} {row.cost_usd:>14.6f}"
        )
    lines.append(
        f"{'TOTAL':<32} {sum(r.calls for r in reply.rows):>8} {'':>12} {'':>12} {'':>10} {reply.total_usd:>14.6f}"
    )
    if any(row.key == NO_KEY for row in reply.rows):
        meaning = NO_KEY_MEANING.get(reply.by, f"usage recorded without a {reply.by}")
        lines.append(f"{_no_key_label(reply.by)}: {meaning}")
    return "\n".join(lines)


async def ask_accountant(
    nc: NatsClient,
    subject: str,
    request: BaseModel,
    reply_type: type[_Reply],
    timeout: float,
    *,
    no_responders: str = "no cost-accountant is running to answer",
) -> _Reply:
    """One request to the cost-accountant; its silence, or an unreadable reply, as a one-line error."""
    try:
        msg = await nc.request(subject, request.model_dump_json().encode(), timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise click.ClickException(no_responders) from exc
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        raise click.ClickException(f"the cost-accountant did not answer within {timeout}s") from exc
    try:
        return reply_type.model_validate_json(msg.data)
    except ValidationError as exc:
        raise click.ClickException(f"unreadable reply from the cost-accountant: {exc.errors()[0]['msg']}") from exc


async def request_report(nc: NatsClient, request: CostReportRequest, timeout: float) -> CostReportReply:
    """Ask the cost-accountant for a report over request/reply."""
    return await ask_accountant(nc, COST_REPORT.format(), request, CostReportReply, timeout)


@click.group("cost")
def cost_group() -> None:
    """What usage cost: the cost-accountant's ledger."""


@cost_group.command("report")
@click.option("--tenant", default=None, help="One tenant; default: all.")
@click.option("--by", "by", type=click.Choice(REPORT_KEYS), default="tenant", show_default=True)
@click.option("--since", default=None, help="From this ISO date/time (UTC) or span back from now (7d, 12h, 30m).")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the answer.")
@click.option(
    "--nats-url", default=None, help="NATS URL. Default: $AGENTBUS_NATS_URL, then ./.agentbus/env, then :4222."
)
def report(tenant: str | None, by: str, since: str | None, as_json: bool, timeout: float, nats_url: str | None) -> None:
    """Print cost, calls and tokens grouped by tenant, task, agent, model or day."""
    request = parse_input(CostReportRequest, tenant=tenant, by=by, since=parse_since(since))
    # Reports span tenants: the operator's credential (none when the server enforces no identities).
    reply = run_nats(nats_url, admin_credential(), lambda nc: request_report(nc, request, timeout))
    if reply.error is not None:
        raise click.ClickException(f"{reply.error.code}: {reply.error.message}")
    click.echo(reply.model_dump_json() if as_json else format_report(reply))
