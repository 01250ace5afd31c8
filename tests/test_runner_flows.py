"""Runner behaviour over the real bus: idempotency, every bad input, cancellation, step limit."""

from __future__ import annotations

import json

import pytest
from agentbus.contracts.deadletter import DeadLetter
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from helpers import new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient

pytestmark = pytest.mark.usefixtures("suite")


async def test_the_same_task_id_submitted_twice_runs_once(nats_client: NatsClient) -> None:
    task_id = new_task_id()
    assert not await publish_submission(nats_client, submission(task_id), msg_id=task_id)
    assert await publish_submission(nats_client, submission(task_id), msg_id=task_id), "JetStream dedupe"
    # Past the dedupe window (no Nats-Msg-Id): the runner's own idempotency on task_id holds.
    await publish_submission(nats_client, submission(task_id))
    events = await task_events(nats_client, task_id, settle=1.0)
    assert [e["kind"] for e in events] == ["accepted", "step", "completed"]
    assert [e["seq"] for e in events] == [1, 2, 3]


BAD_INPUTS = [
    pytest.param(lambda tid: b"{not json", "malformed_json", id="malformed-json"),
    pytest.param(lambda tid: b"\xff\xfe\x00garbage", "malformed_json", id="not-utf8"),
    pytest.param(lambda tid: json.dumps([1, 2]).encode(), "schema_violation", id="not-an-object"),
    pytest.param(lambda tid: submission(tid, text=""), "schema_violation", id="empty-input"),
    pytest.param(lambda tid: submission(tid, budget_usd=-1), "schema_violation", id="negative-budget"),
    pytest.param(
        lambda tid: json.dumps({"task_id": tid, "tenant": "acme", "input": "x"}).encode(),
        "schema_violation",
        id="missing-agent",
    ),
    pytest.param(lambda tid: submission(tid, tenant="globex"), "tenant_mismatch", id="tenant-mismatch"),
    pytest.param(lambda tid: submission(tid, agent="no-such-agent"), "unknown_agent", id="unknown-agent"),
]


@pytest.mark.parametrize(("payload", "code"), BAD_INPUTS)
async def test_bad_input_is_rejected_with_a_reason_and_the_next_task_still_completes(
    nats_client: NatsClient, payload: object, code: str
) -> None:
    task_id = new_task_id("bad")
    make = payload
    assert callable(make)
    await publish_submission(nats_client, make(task_id), msg_id=task_id)
    [rejected] = await task_events(nats_client, task_id)
    assert rejected["kind"] == "rejected"
    assert rejected["seq"] == 1
    assert rejected["error"]["code"] == code
    assert rejected["error"]["message"]

    good = new_task_id("good")
    await publish_submission(nats_client, submission(good), msg_id=good)
    assert (await task_events(nats_client, good))[-1]["kind"] == "completed"


async def test_garbage_with_no_task_id_anywhere_becomes_a_dead_letter(
    nats_client: NatsClient, bootstrapped_nats: NatsServerProcess
) -> None:
    js = nats_client.jetstream()
    dead = await js.subscribe("agentbus.deadletter.AGENTBUS_TASKS.agent-runner-submissions")
    await publish_submission(nats_client, b"%%% no id here %%%")
    letter = DeadLetter.model_validate_json((await dead.next_msg(timeout=10)).data)
    await dead.unsubscribe()
    assert letter.error.code == "malformed_json"
    assert "no valid task_id" in letter.error.message
    assert letter.payload == "%%% no id here %%%"
    good = new_task_id("after-dead")
    await publish_submission(nats_client, submission(good), msg_id=good)
    assert (await task_events(nats_client, good))[-1]["kind"] == "completed"


async def test_a_run_that_keeps_calling_tools_stops_at_the_step_limit(nats_client: NatsClient) -> None:
    # `assistant` allows 6 steps; seven written calls need seven tool steps.
    task_id = new_task_id("limit")
    text = " ".join(f"calculator({i}+1)" for i in range(7))
    await publish_submission(nats_client, submission(task_id, agent="assistant", text=text), msg_id=task_id)
    events = await task_events(nats_client, task_id)
    assert events[-1]["kind"] == "failed"
    assert events[-1]["error"]["code"] == "step_limit_exceeded"
    assert sum(1 for e in events if e["kind"] == "step") == 6


async def test_cancel_stops_a_running_task_and_a_late_cancel_changes_nothing(
    nats_client: NatsClient, suite: list[BusService]
) -> None:
    js = nats_client.jetstream()
    task_id = new_task_id("cancel")
    # Cancel first: a cancellation that overtakes its submission keeps the task from ever running.
    await js.publish("agentbus.tasks.cancel.acme.acme-app", json.dumps({"task_id": task_id, "tenant": "acme"}).encode())
    [cancelled] = await task_events(nats_client, task_id)
    assert cancelled["kind"] == "cancelled"
    await publish_submission(nats_client, submission(task_id), msg_id=task_id)

    done = new_task_id("done")
    await publish_submission(nats_client, submission(done), msg_id=done)
    await task_events(nats_client, done)
    await js.publish("agentbus.tasks.cancel.acme.acme-app", json.dumps({"task_id": done, "tenant": "acme"}).encode())
    events = await task_events(nats_client, task_id, settle=1.0)
    assert [e["kind"] for e in events] == ["cancelled"]
    assert [e["kind"] for e in await task_events(nats_client, done, settle=1.0)] == ["accepted", "step", "completed"]


async def test_a_cancel_from_another_tenant_is_refused(nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    task_id = new_task_id("other")
    await publish_submission(nats_client, submission(task_id), msg_id=task_id)
    await task_events(nats_client, task_id)
    dead = await js.subscribe("agentbus.deadletter.AGENTBUS_TASKS.agent-runner-cancellations")
    # The payload claims acme while the subject says globex: the subject is the authenticated tenant.
    cancel = json.dumps({"task_id": task_id, "tenant": "acme"}).encode()
    await js.publish("agentbus.tasks.cancel.globex.globex-app", cancel)
    letter = DeadLetter.model_validate_json((await dead.next_msg(timeout=10)).data)
    await dead.unsubscribe()
    assert letter.error.code == "tenant_mismatch"
