"""The accountant as a service: a real nats-server, real SQLite and Postgres, its own consumer and replies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import yaml
from accountant_support import DATABASE_KINDS, database, open_store
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
    ACCOUNTANT_USAGE,
    BUDGET_ALERT,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    DEAD_LETTER,
    SPAN,
    TASK_COST,
    USAGE,
    USAGE_RECORDED,
    Header,
    Service,
)
from agentbus.contracts.spans import SpanRecorded
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.app import AccountantApp, create_app
from agentbus.cost_accountant.handlers import AccountantHandlers
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.cost_accountant.service import AccountantMetrics, AccountantService
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import RetryableError, TerminalError
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
BUDGETS: dict[str, Any] = {
    "defaults": {"tenant": {"soft_usd": 1.0, "hard_usd": 100.0}, "user": {"hard_usd": 5.0}},
}


@pytest.fixture(scope="module", params=DATABASE_KINDS)
async def accountant(
    request: pytest.FixtureRequest, bootstrapped_nats: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AccountantApp]:
    folder = tmp_path_factory.mktemp("accountant")
    (folder / "prices.yaml").write_text(yaml.safe_dump(PRICES), encoding="utf-8")
    (folder / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS), encoding="utf-8")
    async with database(request.param, folder) as (url, schema):
        settings = AccountantSettings(
            nats_url=bootstrapped_nats.url,
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
            yield app
        finally:
            await app.stop()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll until `check()` holds; fail after `timeout` seconds (a bound, not a speed assertion)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def publish_usage(nc: NatsClient, tenant: str, payload: dict[str, Any] | bytes, msg_id: str) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    await nc.jetstream().publish(USAGE_RECORDED.format(tenant=tenant), data, headers={Header.MSG_ID.value: msg_id})


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


async def ask(nc: NatsClient, subject: str, request: BaseModel | bytes, headers: dict[str, str] | None = None) -> bytes:
    data = request if isinstance(request, bytes) else request.model_dump_json().encode()
    return (await nc.request(subject, data, timeout=10, headers=headers)).data


async def dead_letters(nc: NatsClient, wanted: set[str]) -> dict[str, DeadLetter]:
    """The usage consumer's dead letters whose payload names one of the `wanted` usage ids."""
    subject = DEAD_LETTER.format(stream=USAGE.name, consumer=ACCOUNTANT_USAGE.durable)
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
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    sample = accountant.registry.get_sample_value
    duplicates_before = sample("agentbus_cost_usage_records_total", {"outcome": "duplicate"}) or 0
    record = llm_usage(tenant, "llm:req-1")
    await publish_usage(nats_client, tenant, record, f"first-{tenant}")
    await publish_usage(nats_client, tenant, record, f"second-{tenant}")  # a repeat that passed JetStream's dedupe
    await publish_usage(
        nats_client,
        tenant,
        llm_usage(tenant, "llm:req-2", prompt_tokens=0, completion_tokens=0, gpu_seconds=10.0, node_class="gpu-l4"),
        f"third-{tenant}",
    )

    async def recorded() -> bool:
        _, missing = await accountant.store.task_cost(tenant, "task-1", ["llm:req-1", "llm:req-2"])
        return not missing

    await wait_for(recorded)
    # Wait until the repeat was handled too, then the ledger must still hold one row for it.

    async def repeat_handled() -> bool:
        return (sample("agentbus_cost_usage_records_total", {"outcome": "duplicate"}) or 0) > duplicates_before

    await wait_for(repeat_handled)
    cost, _ = await accountant.store.task_cost(tenant, "task-1", [])
    assert cost == 2_000_000 + 10_000_000  # 1000 * $1/M + 500 * $2/M, and 10 GPU-seconds at $3.60/h
    assert sample("agentbus_cost_usd_total", {"tenant": tenant, "model": "m1", "kind": "llm"}) == pytest.approx(0.012)
    assert sample("agentbus_cost_tokens_total", {"tenant": tenant, "model": "m1", "direction": "prompt"}) == 1000
    assert sample("agentbus_cost_tokens_total", {"tenant": tenant, "model": "m1", "direction": "completion"}) == 500


async def test_bad_usage_goes_to_the_dead_letter_stream_with_its_reason(
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    negative = f"neg-{tenant}"
    no_tenant = f"nt-{tenant}"
    no_price = f"np-{tenant}"
    mismatch = f"mm-{tenant}"
    await publish_usage(nats_client, tenant, llm_usage(tenant, negative, prompt_tokens=-5), negative)
    without_tenant = llm_usage(tenant, no_tenant)
    del without_tenant["tenant"]
    await publish_usage(nats_client, tenant, without_tenant, no_tenant)
    await publish_usage(
        nats_client, tenant, {**llm_usage(tenant, no_price), "kind": "tool", "tool": "unlisted"}, no_price
    )
    await publish_usage(nats_client, tenant, llm_usage("someone-else", mismatch), mismatch)

    letters = await dead_letters(nats_client, {negative, no_tenant, no_price, mismatch})
    assert letters[negative].error.code == "negative_quantity"
    assert "prompt_tokens" in letters[negative].error.message
    assert letters[no_tenant].error.code == "missing_tenant"
    assert letters[no_price].error.code == "unknown_tool"
    assert letters[mismatch].error.code == "tenant_mismatch"
    for usage_id in (negative, no_tenant, no_price, mismatch):
        assert await accountant.store.ledger_row(usage_id) is None


async def test_an_unknown_model_is_priced_by_the_default_rule_and_flagged(
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    await publish_usage(
        nats_client,
        tenant,
        llm_usage(tenant, f"u-{tenant}", model="brand-new", prompt_tokens=100_000, completion_tokens=0),
        tenant,
    )

    async def recorded() -> bool:
        return await accountant.store.ledger_row(f"u-{tenant}") is not None

    await wait_for(recorded)
    row = await accountant.store.ledger_row(f"u-{tenant}")
    assert row is not None
    assert row["priced_by_default"] is True
    assert row["cost_nanousd"] == 1_000_000_000  # 100k tokens at the default $10/M
    assert (
        accountant.registry.get_sample_value(
            "agentbus_cost_priced_by_default_total", {"tenant": tenant, "model": "brand-new"}
        )
        == 1
    )


async def test_an_unknown_model_without_a_default_rule_is_refused(tmp_path: Path) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", None)
    service = AccountantService(
        store, PriceTable.model_validate({"models": {}}), AccountantMetrics(CollectorRegistry())
    )
    await service.start()
    try:
        record = UsageRecorded(usage_id="u1", kind="llm", tenant="acme", model="nobody-priced-me", prompt_tokens=1)
        delivery = Delivery(USAGE_RECORDED.format(tenant="acme"), record.model_dump_json().encode(), {}, 1, 1, None)
        with pytest.raises(TerminalError) as caught:
            await AccountantHandlers(service).on_usage_recorded(delivery)
        assert caught.value.code == "unknown_model"
        assert await store.ledger_row("u1") is None
    finally:
        await service.stop()
        await store.close()


class UnavailableStore:
    """A store whose database is down: every call fails."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError("database down")

        return fail


async def test_a_database_outage_is_retried_with_growing_delays_not_dead_lettered() -> None:
    service = AccountantService(
        UnavailableStore(), PriceTable.model_validate(PRICES), AccountantMetrics(CollectorRegistry())
    )
    await service.start()
    try:
        handlers = AccountantHandlers(service)
        record = UsageRecorded(usage_id="u1", kind="llm", tenant="acme", model="m1", prompt_tokens=1)
        delays = []
        for deliveries in (1, 2, 3):
            delivery = Delivery(
                USAGE_RECORDED.format(tenant="acme"), record.model_dump_json().encode(), {}, deliveries, 1, None
            )
            with pytest.raises(RetryableError) as caught:
                await handlers.on_usage_recorded(delivery)
            delays.append(caught.value.delay_seconds)
        assert delays == [5.0, 15.0, 45.0]
        reply = await service.reserve(
            BudgetReserveRequest(reservation_id="r", tenant="acme", task_id="t", agent="a", kind="llm", model="m1")
        )
        assert reply.error is not None
        assert (reply.allowed, reply.error.code) == (False, "store_unavailable")
    finally:
        await service.stop()


def test_a_bad_config_file_stops_start_up_with_status_2(tmp_path: Path) -> None:
    env = {**os.environ, "AGENTBUS_ACCOUNTANT_PRICES_FILE": str(tmp_path / "missing.yaml")}
    result = subprocess.run(
        [sys.executable, "-m", "agentbus.cost_accountant"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "missing.yaml: file does not exist" in result.stderr


async def test_reservations_are_decided_settled_and_released_over_request_reply(
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    def reserve(rid: str) -> BudgetReserveRequest:
        return BudgetReserveRequest(
            reservation_id=rid,
            tenant=tenant,
            task_id="task-9",
            agent="assistant",
            kind="llm",
            model="m1",
            estimated_prompt_tokens=100_000,  # $0.10
            task_budget_usd=0.25,
            submitted_by="bob",
        )

    subject = BUDGET_RESERVE.format(tenant=tenant)
    first = BudgetReserveReply.model_validate_json(await ask(nats_client, subject, reserve("llm:a")))
    assert (first.allowed, first.reserved_usd) == (True, 0.1)
    assert BudgetReserveReply.model_validate_json(await ask(nats_client, subject, reserve("llm:a"))) == first
    assert BudgetReserveReply.model_validate_json(await ask(nats_client, subject, reserve("llm:b"))).allowed
    denied = BudgetReserveReply.model_validate_json(await ask(nats_client, subject, reserve("llm:c")))
    assert (denied.allowed, denied.budget, denied.limit_usd, denied.spent_usd) == (False, "task:task-9", 0.25, 0.2)

    # The call behind llm:a cost less than estimated: settling frees the difference.
    await publish_usage(
        nats_client,
        tenant,
        llm_usage(tenant, "llm:a", task_id="task-9", reservation_id="llm:a", prompt_tokens=1000, completion_tokens=0),
        f"a-{tenant}",
    )
    cost_request = TaskCostRequest(tenant=tenant, task_id="task-9", usage_ids=["llm:a", "llm:b"])

    async def settled() -> bool:
        reply = TaskCostReply.model_validate_json(await ask(nats_client, TASK_COST.format(tenant=tenant), cost_request))
        return reply.missing_usage_ids == ["llm:b"]

    await wait_for(settled)
    assert BudgetReserveReply.model_validate_json(await ask(nats_client, subject, reserve("llm:d"))).allowed
    released = BudgetReserveReply.model_validate_json(
        await ask(
            nats_client, BUDGET_RELEASE.format(tenant=tenant), BudgetReleaseRequest(tenant=tenant, task_id="task-9")
        )
    )
    assert (released.allowed, released.reserved_usd) == (True, 0.2)  # llm:b and llm:d were still open
    cost = TaskCostReply.model_validate_json(await ask(nats_client, TASK_COST.format(tenant=tenant), cost_request))
    assert cost.cost_usd == 0.001


async def test_invalid_requests_get_an_error_reply(
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    subject = BUDGET_RESERVE.format(tenant=tenant)
    malformed = BudgetReserveReply.model_validate_json(await ask(nats_client, subject, b'{"reservation_id": "x"'))
    assert malformed.error is not None
    assert malformed.error.code == "schema_violation"
    request = BudgetReserveRequest(
        reservation_id="tool:1", tenant="other", task_id="t", agent="a", kind="tool", tool="search"
    )
    mismatch = BudgetReserveReply.model_validate_json(await ask(nats_client, subject, request))
    assert mismatch.error is not None
    assert mismatch.error.code == "tenant_mismatch"
    unknown = request.model_copy(update={"tenant": tenant, "tool": "unlisted"})
    unpriced = BudgetReserveReply.model_validate_json(await ask(nats_client, subject, unknown))
    assert (unpriced.allowed, unpriced.error and unpriced.error.code) == (False, "unknown_tool")


async def test_crossing_a_soft_limit_publishes_an_alert(
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    sub = await nats_client.jetstream().subscribe(
        BUDGET_ALERT.format(tenant=tenant), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        # 600k prompt tokens at $1/M plus 300k completion at $2/M: $1.20, over the default $1.00 soft limit.
        await publish_usage(
            nats_client,
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
    accountant: AccountantApp, nats_client: NatsClient, tenant: str
) -> None:
    incoming = TraceContext.new()
    request = BudgetReserveRequest(
        reservation_id="tool:s", tenant=tenant, task_id="t", agent="a", kind="tool", tool="search"
    )
    sub = await nats_client.jetstream().subscribe(
        SPAN.format(service=Service.COST_ACCOUNTANT.value), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await ask(
            nats_client, BUDGET_RESERVE.format(tenant=tenant), request, {Header.TRACEPARENT.value: incoming.traceparent}
        )
        async with asyncio.timeout(20):
            while True:
                span = SpanRecorded.model_validate_json((await sub.next_msg(timeout=20)).data)
                if span.trace_id == incoming.trace_id:
                    break
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


async def test_cost_report_prints_a_table(accountant: AccountantApp, nats_client: NatsClient, tenant: str) -> None:
    await publish_usage(nats_client, tenant, llm_usage(tenant, f"r1-{tenant}"), f"r1-{tenant}")
    await publish_usage(
        nats_client, tenant, llm_usage(tenant, f"r2-{tenant}", model="brand-new", prompt_tokens=10), f"r2-{tenant}"
    )

    async def both() -> bool:
        return (await accountant.store.task_cost(tenant, "task-1", [f"r1-{tenant}", f"r2-{tenant}"]))[1] == []

    await wait_for(both)
    url = accountant.settings.nats_url
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cost_group,
        ["report", "--tenant", tenant, "--by", "model", "--since", "1d", "--nats-url", url],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "CALLS"]
    assert [line.split()[0] for line in lines[1:]] == ["brand-new", "m1", "TOTAL"]
    assert lines[-1].split()[-1] == "0.012100"  # $0.002 on m1; 10 + 500 tokens at the default $10/$20 per M
    as_json = await asyncio.to_thread(
        CliRunner().invoke, cost_group, ["report", "--tenant", tenant, "--by", "day", "--json", "--nats-url", url]
    )
    assert json.loads(as_json.output)["total_usd"] == pytest.approx(0.0121)
