"""Submitting a task and following its events: shared by `agentbus submit` and `make demo`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from agentbus.cli.follow import ReplayError, TaskFollower, replay_events
from agentbus.contracts.registry import TASK_SUBMIT, Header
from agentbus.contracts.tasks import TERMINAL_EVENT_KINDS, TaskEvent, TaskSubmitted
from nats.aio.client import Client as NatsClient

ANONYMOUS_SUBMITTER = "anonymous"
"""The submitter token used against a server that enforces no identities, when none is named."""


async def submit_task(
    nc: NatsClient,
    submission: TaskSubmitted,
    submitter: str,
    *,
    on_submitted: Callable[[bool], None],
    on_event: Callable[[TaskEvent], None] | None,
    wait_seconds: float,
    check_existing: bool = False,
) -> str | None:
    """Publish the submission as `submitter` (Nats-Msg-Id = task id). With `on_event`, follow the task's
    events from seq 1 until a terminal one and return its kind, or None on timeout. Subscribing before
    publishing means no event can be missed.

    `on_submitted` is told whether the id was taken before. The server's duplicate window on public
    subjects is too short to tell (an id must not be pre-empted by another identity), so with
    `check_existing` (a caller that chose the id) the runner is asked for the task's stored events first.
    """
    follower = TaskFollower(nc, submission.tenant, submission.task_id)
    async with follower:
        existing: list[TaskEvent] = []
        if check_existing:
            with contextlib.suppress(ReplayError):
                existing = await replay_events(nc, submission.tenant, submission.task_id)
        ack = await nc.jetstream().publish(
            TASK_SUBMIT.format(tenant=submission.tenant, submitter=submitter),
            submission.model_dump_json().encode(),
            headers={Header.MSG_ID.value: submission.task_id},
        )
        duplicate = bool(ack.duplicate) or bool(existing)
        on_submitted(duplicate)
        if on_event is None:
            return None
        try:
            async with asyncio.timeout(wait_seconds):
                # A resubmitted id may have events already: the follower replays from seq 1 first.
                async for event in follower.events(replay_first=duplicate):
                    on_event(event)
                    if event.kind in TERMINAL_EVENT_KINDS:
                        return event.kind
        except TimeoutError:
            return None
    return None


def describe(event: TaskEvent) -> str:
    """One human-readable line for an event."""
    head = f"{event.seq:>3} {event.kind:<17}"
    match event.kind:
        case "accepted":
            session = f" session={event.session_id}" if event.session_id else ""
            session += " (queued behind the session's running task)" if event.queued else ""
            return f"{head} agent={event.agent} model={event.model} max_steps={event.max_steps}{session}"
        case "step":
            calls = ", ".join(f"{c.name}({json.dumps(c.arguments)})" for c in event.tool_calls) or "answer"
            return f"{head} step {event.step}: {calls}"
        case "token":
            return f"{head} {event.text!r}"
        case "completed":
            usage = event.usage
            return (
                f"{head} {event.output}\n    steps={event.steps} prompt_tokens={usage.prompt_tokens} "
                f"completion_tokens={usage.completion_tokens} cost_usd={event.cost_usd:.6f}"
            )
        case "rejected" | "failed":
            return f"{head} {event.error.code}: {event.error.message}"
        case "cancelled":
            by = f" by {event.by}" if event.by else ""
            return f"{head}{by} {event.reason or ''}".rstrip()
        case "budget_exceeded":
            needed = f"; the call needed ~${event.requested_usd:.6f}" if event.requested_usd is not None else ""
            return f"{head} {event.budget}: ${event.spent_usd:.6f} spent or held of ${event.limit_usd:.6f}{needed}"
        case "approval_pending":
            return f"{head} {event.approval_id} tool={event.tool}"
        case "approval_resolved":
            return f"{head} {event.approval_id} {event.outcome}"
        case "guardrail":
            found = ", ".join(
                f"{f.policy}/{f.check}:{f.kind}" + (f" in {f.field}" if f.field else "") for f in event.findings
            )
            return f"{head} {event.stage} {event.action}: {found}"
        case "throttled":
            return f"{head} step {event.step} waits {event.wait_seconds:g}s for {event.limit}"
