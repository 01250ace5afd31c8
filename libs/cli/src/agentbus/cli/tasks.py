"""Submitting a task and following its events: shared by `agentbus submit` and `make demo`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from agentbus.cli.replay import replay
from agentbus.contracts.registry import TASK_EVENT, TASK_EVENTS, TASK_SUBMIT, Header
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TERMINAL_EVENT_KINDS, TaskEvent, TaskSubmitted
from nats.aio.client import Client as NatsClient


async def submit_task(
    nc: NatsClient,
    submission: TaskSubmitted,
    *,
    on_submitted: Callable[[bool], None],
    on_event: Callable[[TaskEvent], None] | None,
    wait_seconds: float,
) -> str | None:
    """Publish the submission (Nats-Msg-Id = task id). With `on_event`, follow the task's events from
    seq 1 until a terminal one and return its kind, or None on timeout. Subscribing before publishing
    means no event can be missed."""
    js = nc.jetstream()
    subject = TASK_EVENT.format(tenant=submission.tenant, task_id=submission.task_id)
    events = await replay(nc, TASK_EVENTS.name, subject) if on_event else None
    sub = events.subscription if events else None
    ack = await js.publish(
        TASK_SUBMIT.format(tenant=submission.tenant),
        submission.model_dump_json().encode(),
        headers={Header.MSG_ID.value: submission.task_id},
    )
    on_submitted(bool(ack.duplicate))
    if sub is None or on_event is None:
        return None
    try:
        async with asyncio.timeout(wait_seconds):
            while True:
                event = TASK_EVENT_ADAPTER.validate_json((await sub.next_msg(timeout=wait_seconds)).data)
                on_event(event)
                if event.kind in TERMINAL_EVENT_KINDS:
                    return event.kind
    except TimeoutError:
        return None
    finally:
        await sub.unsubscribe()


def describe(event: TaskEvent) -> str:
    """One human-readable line for an event."""
    head = f"{event.seq:>3} {event.kind:<17}"
    match event.kind:
        case "accepted":
            return f"{head} agent={event.agent} model={event.model} max_steps={event.max_steps}"
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
            return f"{head} {event.reason or ''}"
        case "budget_exceeded":
            return f"{head} {event.budget}: spent {event.spent_usd} of {event.limit_usd}"
        case "approval_pending":
            return f"{head} {event.approval_id} tool={event.tool}"
        case "approval_resolved":
            return f"{head} {event.approval_id} {event.outcome}"
