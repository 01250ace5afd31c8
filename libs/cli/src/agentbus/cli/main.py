"""`agentbus`: run the embedded suite, submit tasks, follow their events, decide approvals, see queue depth."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import click
import nats.errors
from agentbus.cli.approvals import approvals
from agentbus.cli.backup import backup as backup_command
from agentbus.cli.backup import restore as restore_command
from agentbus.cli.config import STATE_DIR, admin_credential, run_nats, submitter_credential
from agentbus.cli.cost import cost_group
from agentbus.cli.doctor import doctor_command
from agentbus.cli.follow import ReplayError, replay_events
from agentbus.cli.identities import Credential, IdentityError
from agentbus.cli.inputs import check_identifier, parse_input
from agentbus.cli.limits import limits_group
from agentbus.cli.rag import ingest_command, search_command
from agentbus.cli.replay import replay
from agentbus.cli.sessions import sessions_group
from agentbus.cli.suite import (
    CONFIGURATION_ERROR_STATUS,
    DEFAULT_CONFIG_DIR,
    DEFAULT_TOOLS_DIR,
    DEFAULT_WORKFLOWS_DIR,
    StartupError,
    Suite,
    SuiteLockedError,
)
from agentbus.cli.tasks import ANONYMOUS_SUBMITTER, describe, submit_task
from agentbus.cli.tools import tools_group
from agentbus.cli.workflows import run_workflow_command, workflows_group
from agentbus.contracts.registry import DEFAULT_MODELS, STREAMS, TASK_CANCEL, TASK_EVENT, TASK_EVENTS
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TaskCancelRequested, TaskEvent, TaskSubmitted
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.logging import configure_logging
from nats.aio.client import Client as NatsClient

EXIT_TASK_UNSUCCESSFUL = 1
EXIT_TIMEOUT = 3

nats_url_option = click.option(
    "--nats-url",
    default=None,
    help="NATS URL. Default: $AGENTBUS_NATS_URL, then ./.agentbus/env, then :4222.",
)


def _models(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


def _print_event(event: TaskEvent, as_json: bool) -> None:
    click.echo(event.model_dump_json() if as_json else describe(event))


def _event_reader(tenant: str | None) -> Credential | None:
    """A tenant's events are read as its submitter when it has one, anything else as the operator."""
    if tenant:
        with contextlib.suppress(click.UsageError):
            return submitter_credential(tenant, None)[0]
    return admin_credential()


DEBUG_KEY = "agentbus.debug"


def one_line(exc: BaseException) -> str:
    """An unexpected error as one line: its type and message, newlines folded."""
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


class AgentbusGroup(click.Group):
    """The `agentbus` group: any error a command did not expect is still one line and exit 1, never a
    traceback (`agentbus --debug ...` shows the traceback instead)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            raise click.ClickException(
                f"{one_line(exc)} (an unexpected error: `agentbus --debug {ctx.invoked_subcommand or ''} ...` "
                "shows where)"
            ) from exc


@click.group(cls=AgentbusGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentbus-cli", prog_name="agentbus")
@click.option("--debug", is_flag=True, help="Log the NATS client's debug lines and show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """agentbus: AI agents as services on NATS JetStream.

    Start the suite with `agentbus up`; every other command finds it through ./.agentbus/env.
    `agentbus doctor` checks a running suite and says what to do about each problem.
    """
    ctx.meta[DEBUG_KEY] = debug
    # The NATS client logs every connection state change; a person wants the command's own one line.
    configure_logging("DEBUG" if debug else "CRITICAL", "agentbus-cli")


cli.add_command(approvals)
cli.add_command(doctor_command, "doctor")
cli.add_command(cost_group)
cli.add_command(limits_group)
cli.add_command(ingest_command, "ingest")
cli.add_command(search_command, "search")
cli.add_command(workflows_group)
cli.add_command(sessions_group)
cli.add_command(tools_group)
cli.add_command(run_workflow_command, "run-workflow")
cli.add_command(backup_command, "backup")
cli.add_command(restore_command, "restore")


@cli.command()
@click.option("--nats-url", default=None, help="Attach to this NATS server instead of starting one.")
@click.option("--agents-dir", type=click.Path(path_type=Path), default=Path("agents"), show_default=True)
@click.option("--models", default=",".join(DEFAULT_MODELS), show_default=True, help="Models the worker serves.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=STATE_DIR, show_default=True)
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG_DIR,
    show_default=True,
    help="Model routing, prices, budgets, approver groups.",
)
@click.option("--tools-dir", type=click.Path(path_type=Path), default=DEFAULT_TOOLS_DIR, show_default=True)
@click.option("--workflows-dir", type=click.Path(path_type=Path), default=DEFAULT_WORKFLOWS_DIR, show_default=True)
def up(
    nats_url: str | None,
    agents_dir: Path,
    models: str,
    state_dir: Path,
    config_dir: Path,
    tools_dir: Path,
    workflows_dir: Path,
) -> None:
    """Start nats-server (JetStream under ./.agentbus/), apply streams, run every service; Ctrl-C stops all.

    The server enforces identities: every service, submitter and approver of ./.agentbus/identities.yaml
    (a demo one is written when absent) has its own NATS user and permissions; credentials are kept in
    ./.agentbus/credentials/ and used by the other commands. With --nats-url, nothing is enforced.
    """
    suite = Suite(
        state_dir,
        agents_dir,
        nats_url=nats_url,
        models=_models(models),
        enforce_identities=True,
        config_dir=config_dir,
        tools_dir=tools_dir,
        workflows_dir=workflows_dir,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        suite.start()
        click.echo(f"agentbus up: ready; NATS at {suite.nats_url}. Ctrl-C to stop.", err=True)
        while not stop.wait(0.2):
            suite.supervise()
    except SuiteLockedError as exc:
        raise click.ClickException(str(exc)) from exc
    except StartupError as exc:
        click.echo(f"agentbus up: {exc}", err=True)
        raise SystemExit(CONFIGURATION_ERROR_STATUS) from exc
    except (RuntimeError, IdentityError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        suite.stop()


@cli.command()
@click.option("--tenant", required=True)
@click.option("--agent", required=True)
@click.option("--task-id", default=None, help="Default: a new random id. Resubmitting an id runs nothing new.")
@click.option("--budget-usd", type=float, default=None)
@click.option("--deadline", "deadline_seconds", type=float, default=None, help="Seconds the task may take.")
@click.option("--as", "submitter", default=None, help="Submit as this submitter of the tenant. Default: its first.")
@click.option(
    "--session",
    "session_id",
    default=None,
    help="Continue this conversation (yours, in this tenant): the task sees its history first. The agent "
    "needs a memory store.",
)
@click.option("--wait/--no-wait", default=False, help="Print events live until the task ends.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait with --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@nats_url_option
@click.argument("task_input")
def submit(
    tenant: str,
    agent: str,
    task_id: str | None,
    budget_usd: float | None,
    deadline_seconds: float | None,
    submitter: str | None,
    session_id: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
    nats_url: str | None,
    task_input: str,
) -> None:
    """Submit TASK_INPUT to an agent. With --wait, exit 0 only when the task completes."""
    credential, submitter = submitter_credential(tenant, submitter)
    token = submitter or ANONYMOUS_SUBMITTER
    submission = parse_input(
        TaskSubmitted,
        task_id=task_id or f"task-{uuid.uuid4().hex[:16]}",
        tenant=tenant,
        agent=agent,
        input=task_input,
        budget_usd=budget_usd,
        deadline_seconds=deadline_seconds,
        session_id=session_id,
    )

    def on_submitted(duplicate: bool) -> None:
        again = " (duplicate: this id was submitted before; nothing new runs)" if duplicate else ""
        if wait:
            click.echo(f"submitted {submission.task_id} as {token}{again}", err=True)
        elif again:
            click.echo(again.strip(" ()"), err=True)

    async def action(nc: NatsClient) -> str | None:
        return await submit_task(
            nc,
            submission,
            token,
            on_submitted=on_submitted,
            on_event=(lambda event: _print_event(event, as_json)) if wait else None,
            wait_seconds=timeout,
            check_existing=task_id is not None,
        )

    if not wait:
        # The id alone on stdout, once, for scripts: TASK_ID=$(agentbus submit ... --no-wait "...")
        run_nats(nats_url, credential, action)
        click.echo(submission.task_id)
        return
    outcome = run_nats(nats_url, credential, action)
    if outcome is None:
        click.echo(
            f"timed out after {timeout:g}s waiting for {submission.task_id}; it may still run: "
            f"`agentbus events {submission.task_id} --tenant {tenant}` shows where it is",
            err=True,
        )
        sys.exit(EXIT_TIMEOUT)
    if outcome != "completed":
        sys.exit(EXIT_TASK_UNSUCCESSFUL)


@cli.command()
@click.argument("task_id")
@click.option("--tenant", required=True)
@click.option("--reason", default=None, help="Why; kept in the cancelled event.")
@click.option("--as", "submitter", default=None, help="Cancel as this submitter of the tenant. Default: its first.")
@nats_url_option
def cancel(task_id: str, tenant: str, reason: str | None, submitter: str | None, nats_url: str | None) -> None:
    """Cancel a running task; a task that already ended is left as it is."""
    credential, submitter = submitter_credential(tenant, submitter)
    token = submitter or ANONYMOUS_SUBMITTER
    request = parse_input(TaskCancelRequested, task_id=task_id, tenant=tenant, reason=reason)

    async def action(nc: NatsClient) -> None:
        await nc.jetstream().publish(
            TASK_CANCEL.format(tenant=tenant, submitter=token), request.model_dump_json().encode()
        )

    run_nats(nats_url, credential, action)
    click.echo(f"cancellation of {task_id} sent as {token}; `agentbus events {task_id} --tenant {tenant}` shows it")


@cli.command()
@click.argument("task_id")
@click.option("--tenant", default=None, help="The task's tenant (read as its submitter); default: any (as admin).")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@nats_url_option
def events(task_id: str, tenant: str | None, as_json: bool, nats_url: str | None) -> None:
    """Replay a task's events from seq 1."""
    check_identifier("TASK_ID", task_id)
    check_identifier("--tenant", tenant)

    async def from_runner(nc: NatsClient) -> int:
        assert tenant is not None
        try:
            stored = await replay_events(nc, tenant, task_id)
        except ReplayError as exc:
            raise click.ClickException(str(exc)) from exc
        for event in stored:
            _print_event(event, as_json)
        return len(stored)

    async def from_stream(nc: NatsClient) -> int:
        subject = TASK_EVENT.pattern.format(tenant="*", task_id=task_id)
        stored = await replay(nc, TASK_EVENTS.name, subject)
        count = 0
        try:
            while count < stored.backlog:
                try:
                    msg = await stored.subscription.next_msg(timeout=2.0)
                except nats.errors.TimeoutError:
                    return count
                _print_event(TASK_EVENT_ADAPTER.validate_json(msg.data), as_json)
                count += 1
                if msg.metadata.num_pending == 0:
                    return count
            return count
        finally:
            await stored.close()

    if tenant is not None:
        found = run_nats(nats_url, _event_reader(tenant), from_runner)
    else:
        found = run_nats(nats_url, admin_credential(), from_stream)
    if found == 0:
        raise click.ClickException(f"no events for task {task_id}")


@cli.command()
@nats_url_option
def status(nats_url: str | None) -> None:
    """Each consumer's pending and ack-pending counts: the numbers KEDA scales on."""

    async def action(nc: NatsClient) -> list[dict[str, Any]]:
        js = nc.jetstream()
        rows = []
        for stream in STREAMS:
            for info in await js.consumers_info(stream.name):
                if not info.config.durable_name:
                    continue  # ephemeral readers (an `events` replay) are not work KEDA scales on
                rows.append(
                    {
                        "stream": stream.name,
                        "consumer": info.name,
                        "pending": info.num_pending or 0,
                        "ack_pending": info.num_ack_pending or 0,
                        "redelivered": info.num_redelivered or 0,
                    }
                )
        return rows

    rows = run_nats(nats_url, admin_credential(), action)
    header = f"{'STREAM':<28} {'CONSUMER':<32} {'PENDING':>8} {'ACK_PENDING':>11} {'LAG':>8} {'REDELIVERED':>11}"
    click.echo(header)
    for row in rows:
        lag = row["pending"] + row["ack_pending"]
        click.echo(
            f"{row['stream']:<28} {row['consumer']:<32} {row['pending']:>8} {row['ack_pending']:>11} "
            f"{lag:>8} {row['redelivered']:>11}"
        )


@cli.group()
def streams() -> None:
    """Streams, consumers and buckets of the registry."""


@streams.command("apply")
@click.option("--models", default=",".join(DEFAULT_MODELS), show_default=True, help="Models served (consumers).")
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=None,
    help="Replicas of every stream and bucket (3 on a production cluster). Without it, new ones get 1 and "
    "existing ones keep theirs.",
)
@nats_url_option
def streams_apply(models: str, replicas: int | None, nats_url: str | None) -> None:
    """Create or update every stream, durable consumer and KV bucket. Safe to run again."""

    async def action(nc: NatsClient) -> None:
        for change in await apply_topology(nc.jetstream(), _models(models), replicas):
            click.echo(f"{change.kind:<8} {change.name:<36} {change.action}")

    run_nats(nats_url, admin_credential(), action)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
