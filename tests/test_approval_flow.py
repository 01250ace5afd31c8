"""A risky tool call waits for a human, across the real runner, worker and tool-executor on one server."""

from __future__ import annotations

import asyncio
from typing import Any

from agentbus.contracts.registry import APPROVAL_RESOLVED
from agentbus.runtime.service import BusService
from helpers import (
    approval_request,
    decide,
    first_event,
    new_task_id,
    publish_submission,
    stored_messages,
    submission,
    task_events,
)
from nats.aio.client import Client as NatsClient


async def _resolutions(nc: NatsClient, approval_id: str) -> list[dict[str, Any]]:
    return await stored_messages(nc, APPROVAL_RESOLVED.format(tenant="acme"), lambda r: r["approval_id"] == approval_id)


async def test_an_approved_high_priority_ticket_is_created_once_and_the_run_completes(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    task_id = new_task_id("approve")
    text = 'create_ticket(title="db down", priority="high")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="carol")
    pending = await first_event(nats_client, task_id, "approval_pending")
    request = await approval_request(nats_client, pending["approval_id"])
    assert request["tool"] == "create_ticket"
    assert request["arguments"] == {"title": "db down", "priority": "high"}
    assert request["requested_by"] == "carol"

    await decide(nats_client, request, "alice", "approve")
    events = await task_events(nats_client, task_id, settle=0.5)
    kinds = [e["kind"] for e in events]
    assert kinds == ["accepted", "step", "approval_pending", "approval_resolved", "step", "completed"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    resolved = events[3]
    assert (resolved["outcome"], resolved["by"], resolved["approval_id"]) == (
        "approved",
        "alice",
        request["approval_id"],
    )
    assert "db down" in events[-1]["output"]
    assert [r["outcome"] for r in await _resolutions(nats_client, request["approval_id"])] == ["approved"]


async def test_a_denied_call_never_runs_and_the_model_is_told_why(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    task_id = new_task_id("deny")
    text = 'create_ticket(title="rotate keys", priority="high")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="carol")
    pending = await first_event(nats_client, task_id, "approval_pending")
    request = await approval_request(nats_client, pending["approval_id"])
    await decide(nats_client, request, "bob", "deny", reason="not during the freeze")
    events = await task_events(nats_client, task_id)
    assert [e["kind"] for e in events][-3:] == ["approval_resolved", "step", "completed"]
    assert (events[-3]["outcome"], events[-3]["by"]) == ("denied", "bob")
    assert "not during the freeze" in events[-1]["output"]


async def test_a_self_approval_is_refused_and_the_call_keeps_waiting(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    task_id = new_task_id("self")
    text = 'create_ticket(title="my own", priority="high")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="alice")
    pending = await first_event(nats_client, task_id, "approval_pending")
    request = await approval_request(nats_client, pending["approval_id"])
    await decide(nats_client, request, "alice", "approve")
    await asyncio.sleep(1.0)
    assert await _resolutions(nats_client, request["approval_id"]) == []
    await decide(nats_client, request, "bob", "approve")
    events = await task_events(nats_client, task_id)
    assert events[-1]["kind"] == "completed"
    assert [e["by"] for e in events if e["kind"] == "approval_resolved"] == ["bob"]


async def test_a_low_priority_ticket_needs_no_approval(suite: list[BusService], nats_client: NatsClient) -> None:
    task_id = new_task_id("low")
    text = 'create_ticket(title="typo on the status page", priority="low")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="carol")
    events = await task_events(nats_client, task_id)
    assert [e["kind"] for e in events] == ["accepted", "step", "step", "completed"]
    assert "typo on the status page" in events[-1]["output"]


async def test_invalid_arguments_go_back_to_the_model_as_a_readable_error(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    task_id = new_task_id("invalid")
    text = 'create_ticket(title="x", priority="urgent")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="carol")
    events = await task_events(nats_client, task_id)
    assert [e["kind"] for e in events] == ["accepted", "step", "step", "completed"]
    assert "invalid_arguments" in events[-1]["output"] or "urgent" in events[-1]["output"]
