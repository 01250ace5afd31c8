"""`agentbus limits show`: a tenant's rate buckets as the owner of its budget partition has them now."""

from __future__ import annotations

import click
from agentbus.cli.config import admin_credential, run_nats
from agentbus.cli.cost import ask_accountant
from agentbus.cli.inputs import parse_input
from agentbus.contracts.budget import RateLimitsReply, RateLimitsRequest
from agentbus.contracts.registry import RATE_LIMITS, budget_subject
from nats.aio.client import Client as NatsClient


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_levels(reply: RateLimitsReply) -> str:
    """The buckets as a fixed-width table: what each admitted in the current window against its limits."""
    started = reply.window_started_at.isoformat(timespec="seconds") if reply.window_started_at else "-"
    cap = _limit(reply.concurrent_tasks)
    lines = [
        f"tenant {reply.tenant}: window of {reply.window_seconds:g}s since {started}; "
        f"open tasks {reply.open_tasks} of {cap}",
        f"{'BUCKET':<40} {'REQUESTS':>9} {'LIMIT':>7} {'TOKENS':>10} {'LIMIT':>10} {'ON_LIMIT':>8}",
    ]
    lines.extend(
        f"{level.bucket:<40} {level.requests:>9} {_limit(level.requests_per_minute):>7} {level.tokens:>10} "
        f"{_limit(level.tokens_per_minute):>10} {level.on_limit:>8}"
        for level in reply.buckets
    )
    return "\n".join(lines)


async def request_levels(nc: NatsClient, request: RateLimitsRequest, timeout: float) -> RateLimitsReply:
    """Ask the owner of the tenant's budget partition for its rate buckets."""
    subject = budget_subject(RATE_LIMITS, request.tenant)
    return await ask_accountant(
        nc,
        subject,
        request,
        RateLimitsReply,
        timeout,
        no_responders="no cost-accountant serves this tenant's budget partition",
    )


@click.group("limits")
def limits_group() -> None:
    """Rate limits (config/limits.yaml), as the cost-accountant enforces them."""


@limits_group.command("show")
@click.option("--tenant", required=True, help="The tenant whose buckets to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the answer.")
@click.option(
    "--nats-url", default=None, help="NATS URL. Default: $AGENTBUS_NATS_URL, then ./.agentbus/env, then :4222."
)
def show(tenant: str, as_json: bool, timeout: float, nats_url: str | None) -> None:
    """Print the current level of each rate bucket of a tenant, and its open tasks."""
    request = parse_input(RateLimitsRequest, tenant=tenant)
    reply = run_nats(nats_url, admin_credential(), lambda nc: request_levels(nc, request, timeout))
    if reply.error is not None:
        raise click.ClickException(f"{reply.error.code}: {reply.error.message}")
    click.echo(reply.model_dump_json() if as_json else format_levels(reply))
