"""The accountant as a service: a nats-server of its own, real SQLite and Postgres, its partition consumers and
request subjects, its alerts, spans and reports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
import yaml
from accountant_support import DATABASE_KINDS, database, partition_of, recount
from agentbus.cli.cost import cost_group
from agentbus.contracts.budget import (
    BudgetAlert,
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.registry import (
    BUDGET_ALERT,
    BUDGET_PARTITIONS,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    DEAD_LETTER,
    SPAN,
    TASK_COST,
    USAGE,
    USAGE_RECORDED,
    Header,
    Service,
    accountant_usage_consumer,
    budget_subject,
)
from agentbus.contracts.spans import SpanRecorded, spans_in
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.app import AccountantApp, create_app
from agentbus.cost_accountant.handlers import AccountantHandlers
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.cost_accountant.service import AccountantService
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.tracing import TraceContext
from click.testing import CliRunner
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

PRICES: dict[str, Any] = {
    "models": {"m1": {"prompt_per_million": 1.0, "completion_per_million": 2.0}},
    "default_model": {"prompt_per_million": 10.0, "completion_per_million": 20.0},
    "node_classes": {"gpu-l4": {"per_gpu_hour": 3.6}},
    "tools": {"search": {"per_call": 0.002}},
}
LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[")
BUDGETS: dict[str, Any] = {
    "defaults": {"tenant": {"soft_usd": 1.0, "hard_usd": 100.0}, "user": {"hard_usd": 5.0}},
}


@pytest_asyncio.fixture(scope="module", params=DATABASE_KINDS)
async def accountant(
    request: pytest.FixtureRequest,
    own_server: NatsServerProcess,
    own_client: NatsClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AccountantApp]:
    folder = tmp_path_factory.mktemp("accountant")
    (folder / "prices.yaml").write_text(yaml.safe_dump(PRICES), encoding="utf-8")
    (folder / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS), encoding="utf-8")
    async with database(request.param, folder) as (url, schema):
        settings = AccountantSettings(
            nats_url=own_server.url,
            database_url=url,
            database_schema=schema,
            prices_file=folder / "prices.yaml",
            budgets_file=folder / "budgets.yaml",
            alert_retry_seconds=0.2,
            drain_timeout_seconds=5.0,
        )
        app = create_app(settings)
        await app.start()
        try:
            assert app.served == set(range(BUDGET_PARTITIONS))
            yield app
        finally:
            await app.stop()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def publish_usage(
    nc: NatsClient, tenant: str, payload: dict[str, Any] | bytes, msg_id: str, subject: str | None = None
) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    await nc.jetstream().publish(
        subject or budget_subject(USAGE_RECORDED, tenant), data, headers={Header.MSG_ID.value: msg_id}
    )


def llm_usage(tenant: str, usage_id: str, **fields: Any) -> dict[str, Any]:
    record = {
        "usage_id": usage_id,
        "kind": "llm",
        "tenant": tenant,
        "task_id": "task-1",
        "agent": "assistant",
        "model": "m1",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
    }
    record.update(fields)
    return record


async def ask(
    nc: NatsClient, subject: str, request: BaseModel | bytes, headers: dict[str, str] | None = None, timeout: float = 10
) -> bytes:
    data = request if isinstance(request, bytes) else request.model_dump_json().encode()
    return (await nc.request(subject, data, timeout=timeout, headers=headers)).data


async def task_cost(
    nc: NatsClient, tenant: str, task_id: str, usage_ids: list[str], wait: float = 20.0
) -> TaskCostReply:
    request = TaskCostRequest(tenant=tenant, task_id=task_id, usage_ids=usage_ids, wait_seconds=wait)
    return TaskCostReply.model_validate_json(
        await ask(nc, budget_subject(TASK_COST, tenant), request, timeout=wait + 10)
    )


async def dead_letters(nc: NatsClient, wanted: set[str]) -> dict[str, DeadLetter]:
    """The usage consumers' dead letters whose payload names one of the `wanted` usage ids."""
    subject = DEAD_LETTER.format(stream=USAGE.name, consumer="x").rsplit(".", 1)[0] + ".*"
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    found: dict[str, DeadLetter] = {}
    try:
        async with asyncio.timeout(20):
            while not wanted <= found.keys():
                letter = DeadLetter.model_validate_json((await sub.next_msg(timeout=20)).data)
                for usage_id in wanted:
                    if f'"{usage_id}"' in letter.payload:
                        found[usage_id] = letter
    finally:
        await sub.unsubscribe()
    return found


async def test_usage_is_priced_recorded_once_and_exported(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    sample = accountant.registry.get_sample_value
    duplicates_before = sample("agentbus_cost_usage_records_total", {"outcome": "duplicate"}) or 0
    record = llm_usage(tenant, "llm:req-1")
    await publish_usage(own_client, tenant, record, f"first-{tenant}")
    await publish_usage(own_client, tenant, record, f"second-{tenant}")  # a repeat that passed JetStream's dedupe
    await publish_usage(
        own_client,
        tenant,
        llm_usage(tenant, "llm:req-2", prompt_tokens=0, completion_tokens=0, gpu_seconds=10.0, node_class="gpu-l4"),
        f"third-{tenant}",
    )
    cost = await task_cost(own_client, tenant, "task-1", ["llm:req-1", "llm:req-2"])
    assert cost.missing_usage_ids == []
    # Wait until the repeat was handled too, then the ledger must still hold one row for it.
    async with asyncio.timeout(20):
        while (sample("agentbus_cost_usage_records_total", {"outcome": "duplicate"}) or 0) <= duplicates_before:
            await asyncio.sleep(0.05)
    cost = await task_cost(own_client, tenant, "task-1", [])
    assert cost.cost_usd == pytest.approx(0.012)  # 1000 * $1/M + 500 * $2/M, and 10 GPU-seconds at $3.60/h
    assert sample("agentbus_cost_usd_total", {"tenant": tenant, "model": "m1", "kind": "llm"}) == pytest.approx(0.012)
    assert sample("agentbus_cost_tokens_total", {"tenant": tenant, "model": "m1", "direction": "prompt"}) == 1000
    assert sample("agentbus_cost_tokens_total", {"tenant": tenant, "model": "m1", "direction": "completion"}) == 500
    assert await recount(accountant.store, tenant) == _counters(accountant, tenant)


def _counters(app: AccountantApp, tenant: str) -> dict[tuple[str, str], tuple[int, int]]:
    book = app.committer.books[partition_of(tenant)]
    return {
        key: (counter.spent_nano, counter.reserved_nano)
        for key, counter in book.counters.get(tenant, {}).items()
        if counter.spent_nano or counter.reserved_nano
    }


async def test_bad_usage_goes_to_the_dead_letter_stream_with_its_reason(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    negative, no_tenant, no_price, mismatch, misrouted = (
        f"{kind}-{tenant}" for kind in ("neg", "nt", "np", "mm", "mr")
    )
    await publish_usage(own_client, tenant, llm_usage(tenant, negative, prompt_tokens=-5), negative)
    without_tenant = llm_usage(tenant, no_tenant)
    del without_tenant["tenant"]
    await publish_usage(own_client, tenant, without_tenant, no_tenant)
    await publish_usage(
        own_client, tenant, {**llm_usage(tenant, no_price), "kind": "tool", "tool": "unlisted"}, no_price
    )
    await publish_usage(own_client, tenant, llm_usage("someone-else", mismatch), mismatch)
    wrong_partition = (partition_of(tenant) + 1) % BUDGET_PARTITIONS
    await publish_usage(
        own_client,
        tenant,
        llm_usage(tenant, misrouted),
        misrouted,
        subject=USAGE_RECORDED.format(partition=str(wrong_partition), tenant=tenant),
    )

    letters = await dead_letters(own_client, {negative, no_tenant, no_price, mismatch, misrouted})
    assert letters[negative].error.code == "negative_quantity"
    assert "prompt_tokens" in letters[negative].error.message
    assert letters[no_tenant].error.code == "missing_tenant"
    assert letters[no_price].error.code == "unknown_tool"
    assert letters[mismatch].error.code == "tenant_mismatch"
    assert letters[misrouted].error.code == "partition_mismatch"
    assert letters[misrouted].consumer == accountant_usage_consumer(wrong_partition).durable
    for usage_id in (negative, no_tenant, no_price, mismatch, misrouted):
        assert await accountant.store.ledger_row(tenant, usage_id) is None


async def test_an_unknown_model_is_priced_by_the_default_rule_and_flagged(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    usage_id = f"u-{tenant}"
    await publish_usage(
        own_client,
        tenant,
        llm_usage(tenant, usage_id, model="brand-new", prompt_tokens=100_000, completion_tokens=0),
        tenant,
    )
    # Answered only once the record is committed: the ledger row is there, and the record counted.
    assert (await task_cost(own_client, tenant, "task-1", [usage_id])).missing_usage_ids == []
    row = await accountant.store.ledger_row(tenant, usage_id)
    assert row is not None
    assert row["priced_by_default"] is True
    assert row["cost_nanousd"] == 1_000_000_000  # 100k tokens at the default $10/M
    assert (
        accountant.registry.get_sample_value(
            "agentbus_cost_priced_by_default_total", {"tenant": tenant, "model": "brand-new"}
        )
        == 1
    )


async def test_an_unknown_model_without_a_default_rule_is_refused(accountant: AccountantApp, tenant: str) -> None:
    strict = AccountantService(
        accountant.committer,
        accountant.store,
        PriceTable.model_validate({"models": {}}),
        AccountantMetrics(CollectorRegistry()),
    )
    record = UsageRecorded(usage_id="u1", kind="llm", tenant=tenant, model="nobody-priced-me", prompt_tokens=1)
    delivery = Delivery(budget_subject(USAGE_RECORDED, tenant), record.model_dump_json().encode(), {}, 1, 1, None)
    with pytest.raises(TerminalError) as caught:
        await AccountantHandlers(strict).on_usage_recorded(delivery)
    assert caught.value.code == "unknown_model"
    assert await accountant.store.ledger_row(tenant, "u1") is None


def test_a_bad_config_file_stops_start_up_with_status_2(tmp_path: Path) -> None:
    env = {**os.environ, "AGENTBUS_ACCOUNTANT_PRICES_FILE": str(tmp_path / "missing.yaml")}
    result = subprocess.run(
        [sys.executable, "-m", "agentbus.cost_accountant"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "missing.yaml: file does not exist" in result.stderr


def _reserve(tenant: str, rid: str, task: str = "task-9", tokens: int = 100_000) -> BudgetReserveRequest:
    return BudgetReserveRequest(
        reservation_id=rid,
        tenant=tenant,
        task_id=task,
        agent="assistant",
        kind="llm",
        model="m1",
        estimated_prompt_tokens=tokens,  # $0.10 per 100k
        task_budget_usd=0.25,
        submitted_by="bob",
    )


async def test_reservations_are_decided_settled_and_closed_over_request_reply(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    subject = budget_subject(BUDGET_RESERVE, tenant)

    async def reserve(rid: str, task: str = "task-9") -> BudgetReserveReply:
        return BudgetReserveReply.model_validate_json(await ask(own_client, subject, _reserve(tenant, rid, task)))

    first = await reserve("llm:a")
    assert (first.allowed, first.reserved_usd) == (True, 0.1)
    assert await reserve("llm:a") == first
    assert (await reserve("llm:b")).allowed
    denied = await reserve("llm:c")
    assert (denied.allowed, denied.budget, denied.limit_usd, denied.spent_usd, denied.requested_usd) == (
        False,
        "task:task-9",
        0.25,
        0.2,
        0.1,
    )

    # The call behind llm:a cost less than estimated: settling frees the difference.
    await publish_usage(
        own_client,
        tenant,
        llm_usage(tenant, "llm:a", task_id="task-9", reservation_id="llm:a", prompt_tokens=1000, completion_tokens=0),
        f"a-{tenant}",
    )
    settled = await task_cost(own_client, tenant, "task-9", ["llm:a"])
    assert (settled.cost_usd, settled.missing_usage_ids) == (0.001, [])
    assert (await reserve("llm:d")).allowed
    close = BudgetReleaseRequest(tenant=tenant, task_id="task-9")
    released = BudgetReserveReply.model_validate_json(
        await ask(own_client, budget_subject(BUDGET_RELEASE, tenant), close)
    )
    assert (released.allowed, released.reserved_usd) == (True, 0.2)  # llm:b and llm:d were still open
    again = BudgetReserveReply.model_validate_json(await ask(own_client, budget_subject(BUDGET_RELEASE, tenant), close))
    assert (again.allowed, again.reserved_usd) == (True, 0.0)
    late = await reserve("llm:e")
    assert late.error is not None
    assert (late.allowed, late.error.code) == (False, "task_closed")
    assert (await reserve("llm:a")).allowed  # a verdict given before the close stays what it was
    cost = await task_cost(own_client, tenant, "task-9", ["llm:a", "llm:b"], wait=0)
    assert (cost.cost_usd, cost.missing_usage_ids) == (0.001, ["llm:b"])
    assert await recount(accountant.store, tenant) == _counters(accountant, tenant)


async def test_two_reservations_racing_for_the_last_of_a_budget_get_one_yes(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    subject = budget_subject(BUDGET_RESERVE, tenant)
    first = BudgetReserveReply.model_validate_json(await ask(own_client, subject, _reserve(tenant, "llm:0", "race")))
    assert first.allowed
    racing = await asyncio.gather(
        *(ask(own_client, subject, _reserve(tenant, f"llm:{i}", "race", tokens=150_000)) for i in (1, 2))
    )
    verdicts = [BudgetReserveReply.model_validate_json(reply) for reply in racing]
    assert sorted(v.allowed for v in verdicts) == [False, True]  # $0.10 + $0.15 = the task's $0.25
    assert next(v for v in verdicts if not v.allowed).spent_usd == pytest.approx(0.25)


async def test_a_task_cost_is_answered_when_its_usage_arrives(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    asked = asyncio.create_task(task_cost(own_client, tenant, "task-7", ["llm:late-1", "llm:late-2"], wait=20))
    await asyncio.sleep(0.3)
    assert not asked.done()
    for usage_id in ("llm:late-1", "llm:late-2"):
        await publish_usage(own_client, tenant, llm_usage(tenant, usage_id, task_id="task-7"), f"{usage_id}-{tenant}")
    reply = await asked
    assert reply.missing_usage_ids == []
    assert reply.cost_usd == pytest.approx(0.004)
    started = time.monotonic()
    lost = await task_cost(own_client, tenant, "task-7", ["llm:late-1", "llm:never"], wait=0.5)
    assert time.monotonic() - started >= 0.5
    assert lost.missing_usage_ids == ["llm:never"]
    assert lost.cost_usd == pytest.approx(0.004)


async def test_invalid_requests_get_an_error_reply(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    subject = budget_subject(BUDGET_RESERVE, tenant)
    malformed = BudgetReserveReply.model_validate_json(await ask(own_client, subject, b'{"reservation_id": "x"'))
    assert malformed.error is not None
    assert malformed.error.code == "schema_violation"
    request = BudgetReserveRequest(
        reservation_id="tool:1", tenant="other", task_id="t", agent="a", kind="tool", tool="search"
    )
    mismatch = BudgetReserveReply.model_validate_json(await ask(own_client, subject, request))
    assert mismatch.error is not None
    assert mismatch.error.code == "tenant_mismatch"
    ours = request.model_copy(update={"tenant": tenant})
    wrong = BUDGET_RESERVE.format(partition=str((partition_of(tenant) + 3) % BUDGET_PARTITIONS), tenant=tenant)
    misrouted = BudgetReserveReply.model_validate_json(await ask(own_client, wrong, ours))
    assert misrouted.error is not None
    assert misrouted.error.code == "partition_mismatch"
    unknown = ours.model_copy(update={"tool": "unlisted"})
    unpriced = BudgetReserveReply.model_validate_json(await ask(own_client, subject, unknown))
    assert (unpriced.allowed, unpriced.error and unpriced.error.code) == (False, "unknown_tool")


async def test_crossing_a_soft_limit_publishes_an_alert(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    sub = await own_client.jetstream().subscribe(
        BUDGET_ALERT.format(tenant=tenant), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        # 600k prompt tokens at $1/M plus 300k completion at $2/M: $1.20, over the default $1.00 soft limit.
        await publish_usage(
            own_client,
            tenant,
            llm_usage(tenant, f"big-{tenant}", prompt_tokens=600_000, completion_tokens=300_000),
            tenant,
        )
        msg = await sub.next_msg(timeout=20)
    finally:
        await sub.unsubscribe()
    alert = BudgetAlert.model_validate_json(msg.data)
    assert (alert.tenant, alert.budget, alert.soft_limit_usd, alert.hard_limit_usd) == (
        tenant,
        f"tenant:{tenant}",
        1.0,
        100.0,
    )
    assert alert.spent_usd == pytest.approx(1.2)
    assert msg.headers is not None
    assert msg.headers[Header.MSG_ID.value] == alert.alert_id


async def test_a_reservation_with_a_traceparent_is_a_span_of_that_trace(
    accountant: AccountantApp, own_client: NatsClient, tenant: str
) -> None:
    incoming = TraceContext.new()
    request = BudgetReserveRequest(
        reservation_id="tool:s", tenant=tenant, task_id="t", agent="a", kind="tool", tool="search"
    )
    sub = await own_client.jetstream().subscribe(
        SPAN.format(service=Service.COST_ACCOUNTANT.value), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await ask(
            own_client,
            budget_subject(BUDGET_RESERVE, tenant),
            request,
            {Header.TRACEPARENT.value: incoming.traceparent},
        )
        async with asyncio.timeout(20):
            found: SpanRecorded | None = None
            while found is None:
                spans = spans_in((await sub.next_msg(timeout=20)).data)
                found = next((s for s in spans if s.trace_id == incoming.trace_id), None)
            span = found
    except nats.errors.TimeoutError:
        pytest.fail("no span for the reservation")
    finally:
        await sub.unsubscribe()
    assert (span.name, span.parent_span_id, span.tenant, span.status) == (
        "budget.reserve",
        incoming.span_id,
        tenant,
        "ok",
    )
    assert span.attributes["agentbus.budget.allowed"] is True


async def test_cost_report_prints_a_table(accountant: AccountantApp, own_client: NatsClient, tenant: str) -> None:
    await publish_usage(own_client, tenant, llm_usage(tenant, f"r1-{tenant}"), f"r1-{tenant}")
    await publish_usage(
        own_client, tenant, llm_usage(tenant, f"r2-{tenant}", model="brand-new", prompt_tokens=10), f"r2-{tenant}"
    )
    assert (await task_cost(own_client, tenant, "task-1", [f"r1-{tenant}", f"r2-{tenant}"])).missing_usage_ids == []
    # The warning about the default price is logged once the record's handler resumes: not inside the table.
    labels = {"tenant": tenant, "model": "brand-new"}
    async with asyncio.timeout(20):
        while not accountant.registry.get_sample_value("agentbus_cost_priced_by_default_total", labels):
            await asyncio.sleep(0.02)
    url = accountant.settings.nats_url
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cost_group,
        ["report", "--tenant", tenant, "--by", "model", "--since", "1d", "--nats-url", url],
    )
    assert result.exit_code == 0, result.output
    # In this process logging is not configured: the CLI's own connection logs share its output.
    lines = [line for line in result.output.splitlines() if not LOG_LINE.match(line)]
    assert lines[0].split()[:2] == ["MODEL", "CALLS"], result.output
    assert [line.split()[0] for line in lines[1:]] == ["brand-new", "m1", "TOTAL"]
    assert lines[-1].split()[-1] == "0.012100"  # $0.002 on m1; 10 + 500 tokens at the default $10/$20 per M
    as_json = await asyncio.to_thread(
        CliRunner().invoke, cost_group, ["report", "--tenant", tenant, "--by", "day", "--json", "--nats-url", url]
    )
    table = "\n".join(line for line in as_json.output.splitlines() if not LOG_LINE.match(line))
    assert json.loads(table)["total_usd"] == pytest.approx(0.0121)
