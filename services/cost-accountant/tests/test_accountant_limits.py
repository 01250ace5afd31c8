"""Rate limits decided with the reservation: requests and tokens per window per bucket, concurrent tasks per
tenant, waiting or rejecting; in the book's memory, and across a restart on real SQLite and Postgres."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from accountant_support import DATABASE_KINDS, Clock, database, open_books, partition_of, reservation, wait_for
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest
from agentbus.contracts.registry import BUDGET_PARTITIONS, BUDGET_RESERVE, budget_subject
from agentbus.cost_accountant.app import AccountantApp, create_app
from agentbus.cost_accountant.book import PartitionBook, StoredTask
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.cost_accountant.config import load_limits_config
from agentbus.cost_accountant.domain import Verdict
from agentbus.cost_accountant.limits import Admission, LimitsConfig, RatePolicy
from agentbus.cost_accountant.ports import ReservationInput
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.server import NatsServerProcess
from nats.aio.client import Client as NatsClient

REPO = Path(__file__).resolve().parents[3]
WINDOW_START = datetime(2026, 11, 20, 12, 0)
"""A minute boundary (naive UTC, as the books keep time)."""

TEN_PER_MINUTE: dict[str, Any] = {"tenants": {"acme": {"tenant": {"requests_per_minute": 10}}}}


def book(limits: dict[str, Any]) -> PartitionBook:
    return PartitionBook(
        0,
        1,
        BudgetPolicy(BudgetConfig()),
        since_period="2026-10",
        reservation_ttl=timedelta(minutes=10),
        rates=RatePolicy(LimitsConfig.model_validate(limits)),
    )


def ask(rid: str, task: str = "t1", **fields: Any) -> ReservationInput:
    values: dict[str, Any] = {
        "reservation_id": rid,
        "tenant": "acme",
        "task_id": task,
        "agent": "assistant",
        "user": "bob",
        "kind": "llm",
        "model": "m1",
        "tool": None,
        "amount_nano": 100,
        "task_budget_nano": None,
        "tokens": 100,
        **fields,
    }
    return ReservationInput(**values)


def decide(b: PartitionBook, request: ReservationInput, at: datetime) -> Verdict:
    b.begin(b.batch + 1)
    if not b.has_task((request.tenant, request.task_id)):
        b.install(StoredTask(request.tenant, request.task_id, None, {}, []))
    verdict = b.reserve(request, at)
    assert verdict is not None
    return verdict


def test_exactly_the_limit_is_admitted_per_window_and_the_next_call_waits_for_the_window_to_end() -> None:
    b = book(TEN_PER_MINUTE)
    at = WINDOW_START + timedelta(seconds=45)
    admitted = [decide(b, ask(f"r{n}", task=f"t{n}"), at) for n in range(10)]
    assert all(verdict.allowed for verdict in admitted)
    held = decide(b, ask("r10", task="t10"), at)
    assert not held.allowed
    assert held.rate_limit == "tenant:acme:requests_per_minute"
    assert held.wait_seconds == pytest.approx(15.0)
    assert not held.rate_reject
    assert decide(b, ask("r10", task="t10"), WINDOW_START + timedelta(seconds=60)).allowed


def test_calls_held_back_wait_their_turn_in_later_windows_first_come_first_served() -> None:
    b = book(TEN_PER_MINUTE)
    at = WINDOW_START + timedelta(seconds=50)
    verdicts = [decide(b, ask(f"r{n}", task=f"t{n}"), at) for n in range(25)]
    assert sum(v.allowed for v in verdicts) == 10
    # The ten after them have places in the next window, the last five in the one after.
    assert [v.wait_seconds for v in verdicts[10:]] == [10.0] * 10 + [70.0] * 5
    next_window = WINDOW_START + timedelta(minutes=1)
    # A newcomer there finds every place promised: it is given the next free one, behind the others.
    newcomer = decide(b, ask("new", task="t-new"), next_window + timedelta(seconds=1))
    assert (newcomer.allowed, newcomer.wait_seconds) == (False, 59.0)
    # Back early, a call waits for its own turn.
    assert decide(b, ask("r20", task="t20"), next_window).wait_seconds == pytest.approx(60.0)
    # Each comes back at its turn and is admitted: no window admits more than ten.
    assert all(decide(b, ask(f"r{n}", task=f"t{n}"), next_window).allowed for n in range(10, 20))
    later = next_window + timedelta(minutes=1)
    assert all(decide(b, ask(f"r{n}", task=f"t{n}"), later).allowed for n in range(20, 25))
    assert decide(b, ask("new", task="t-new"), later).allowed
    # Six of its ten places were promised and taken: four newcomers fit, the fifth waits.
    more = [decide(b, ask(f"m{n}", task=f"tm{n}"), later).allowed for n in range(5)]
    assert more == [True] * 4 + [False]


def test_a_held_back_call_keeps_nothing_so_the_same_reservation_is_decided_again() -> None:
    b = book(TEN_PER_MINUTE)
    for n in range(10):
        decide(b, ask(f"r{n}", task=f"t{n}"), WINDOW_START)
    assert decide(b, ask("late", task="t10"), WINDOW_START).rate_limit is not None
    task = b.tasks[("acme", "t10")]
    assert task.holds == {}
    assert not task.stored
    assert b.plan.new_holds == {} or all(key[1] != "t10" for key in b.plan.new_holds)
    assert decide(b, ask("late", task="t10"), WINDOW_START + timedelta(minutes=1)).allowed


def test_every_bucket_binds_and_the_narrowest_over_its_limit_is_named() -> None:
    limits = {
        "defaults": {"submitter": {"requests_per_minute": 100}},
        "tenants": {
            "acme": {
                "tenant": {"requests_per_minute": 100},
                "submitters": {"bob": {"requests_per_minute": 2}},
                "models": {"m2": {"requests_per_minute": 1}},
            }
        },
    }
    b = book(limits)
    assert decide(b, ask("a", user="bob"), WINDOW_START).allowed
    assert decide(b, ask("b", user="bob"), WINDOW_START).allowed
    assert decide(b, ask("c", user="bob"), WINDOW_START).rate_limit == "submitter:bob:requests_per_minute"
    assert decide(b, ask("d", user="carol"), WINDOW_START).allowed, "carol has the default submitter limit"
    assert decide(b, ask("e", user="carol", model="m2"), WINDOW_START).allowed
    assert decide(b, ask("f", user="carol", model="m2"), WINDOW_START).rate_limit == "model:m2:requests_per_minute"


def test_tokens_per_minute_count_the_estimate_and_a_call_larger_than_a_window_goes_alone() -> None:
    b = book({"tenants": {"acme": {"agents": {"assistant": {"tokens_per_minute": 1000}}}}})
    assert decide(b, ask("a", tokens=600), WINDOW_START).allowed
    assert decide(b, ask("b", tokens=400), WINDOW_START).allowed, "reaching the limit exactly is allowed"
    assert decide(b, ask("c", tokens=1), WINDOW_START).rate_limit == "agent:assistant:tokens_per_minute"
    next_window = WINDOW_START + timedelta(minutes=1)
    assert decide(b, ask("d", tokens=5000), next_window).allowed, "alone in an empty window"
    assert decide(b, ask("e", tokens=1), next_window).rate_limit == "agent:assistant:tokens_per_minute"


def test_tool_calls_are_not_counted_by_the_rates() -> None:
    b = book({"tenants": {"acme": {"tenant": {"requests_per_minute": 1}}}})
    assert decide(b, ask("llm"), WINDOW_START).allowed
    assert decide(b, ask("tool", kind="tool", model=None, tool="search", tokens=0), WINDOW_START).allowed


def test_a_reject_limit_refuses_new_tasks_and_lets_admitted_tasks_wait() -> None:
    b = book({"tenants": {"acme": {"tenant": {"requests_per_minute": 2, "on_limit": "reject"}}}})
    assert decide(b, ask("t1-1", task="t1"), WINDOW_START).allowed
    assert decide(b, ask("t2-1", task="t2"), WINDOW_START).allowed
    refused = decide(b, ask("t3-1", task="t3"), WINDOW_START)
    assert refused.rate_reject
    assert refused.rate_limit == "tenant:acme:requests_per_minute"
    waits = decide(b, ask("t1-2", task="t1"), WINDOW_START)
    assert waits.rate_limit is not None
    assert not waits.rate_reject, "a task admitted before waits for its next step"


def test_the_concurrency_cap_counts_open_tasks_and_a_close_frees_a_place() -> None:
    b = book({"tenants": {"acme": {"tenant": {"concurrent_tasks": 2}}}, "concurrency_retry_seconds": 3})
    assert decide(b, ask("a", task="t1"), WINDOW_START).allowed
    assert decide(b, ask("b", task="t2"), WINDOW_START).allowed
    assert decide(b, ask("b2", task="t2"), WINDOW_START).allowed, "an open task's later calls are not capped"
    held = decide(b, ask("c", task="t3"), WINDOW_START)
    assert held.rate_limit == "tenant:acme:concurrent_tasks"
    assert held.wait_seconds == 3
    b.begin(b.batch + 1)
    b.close("acme", "t1", WINDOW_START)
    assert decide(b, ask("c", task="t3"), WINDOW_START).allowed
    assert b.rates.open_tasks == {"acme": 2}


def test_a_rebuilt_book_counts_the_current_windows_admissions_and_open_tasks_again() -> None:
    limits = {
        "defaults": {"tenant": {"concurrent_tasks": 5}},
        "tenants": {"acme": {"tenant": {"requests_per_minute": 10, "concurrent_tasks": 5}}},
    }
    policy = RatePolicy(LimitsConfig.model_validate(limits))
    now = WINDOW_START + timedelta(seconds=30)
    admissions = [
        Admission("acme", "assistant", "bob", "m1", 10, WINDOW_START + timedelta(seconds=second)) for second in range(9)
    ]
    admissions.append(Admission("acme", "assistant", "bob", "m1", 10, WINDOW_START - timedelta(seconds=1)))
    b = PartitionBook.rebuilt(
        0,
        2,
        BudgetPolicy(BudgetConfig()),
        since_period="2026-10",
        reservation_ttl=timedelta(minutes=10),
        monthly=[],
        tasks=[],
        rates=policy,
        admissions=admissions,
        open_tasks={"acme": 4, "globex": 5},
        now=now,
    )
    assert [(level.bucket, level.requests, level.tokens) for level in b.rates.levels("acme", now)] == [
        ("tenant:acme", 9, 90)
    ]
    assert decide(b, ask("tenth", task="new"), now).allowed
    assert decide(b, ask("eleventh", task="other"), now).rate_limit == "tenant:acme:concurrent_tasks"
    assert decide(b, ask("eleventh", task="t1", tenant="globex"), now).rate_limit == "tenant:globex:concurrent_tasks"


def test_the_shipped_limits_load_and_a_bad_one_names_the_file_and_field(tmp_path: Path) -> None:
    shipped = load_limits_config(REPO / "config" / "limits.yaml")
    assert shipped.window_seconds == 60
    bad = tmp_path / "limits.yaml"
    bad.write_text("tenants:\n  acme:\n    tenant: {requests_per_minute: 0}\n")
    with pytest.raises(ConfigurationError, match=r"limits\.yaml: field 'tenants\.acme\.tenant\.requests_per_minute'"):
        load_limits_config(bad)


# --- across a restart, on real databases ----------------------------------------------------------------


@pytest.fixture(params=DATABASE_KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with database(request.param, tmp_path) as found:
        yield found


async def test_a_restart_does_not_refill_the_buckets(db: tuple[str, str | None]) -> None:
    clock = Clock(datetime(2026, 11, 20, 12, 0, 20, tzinfo=UTC))
    limits = TEN_PER_MINUTE | {"defaults": {"tenant": {"concurrent_tasks": 50}}}
    async with open_books(*db, clock=clock, limits=limits) as books:
        verdicts = [await books.reserve(reservation(f"r{n}", 0.001, task=f"t{n}", tokens=50)) for n in range(8)]
        assert all(v is not None and v.allowed for v in verdicts)
        await books.close("acme", "t0")
    clock.advance(5)
    async with open_books(*db, clock=clock, limits=limits) as books:
        rates = books.committer.books[partition_of("acme")].rates
        levels = rates.levels("acme", datetime(2026, 11, 20, 12, 0, 25))
        assert [(level.bucket, level.requests, level.tokens) for level in levels] == [("tenant:acme", 8, 400)]
        assert rates.open_tasks == {"acme": 7}, "t0 was closed"
        more = [await books.reserve(reservation(f"s{n}", 0.001, task=f"u{n}")) for n in range(3)]
        assert [v is not None and v.allowed for v in more] == [True, True, False]
        assert more[2] is not None
        assert more[2].wait_seconds == pytest.approx(35.0)
        clock.advance(35)
        again = await books.reserve(reservation("s2", 0.001, task="u2"))
        assert again is not None
        assert again.allowed, "a new window is full again"


# --- two replicas on one database ------------------------------------------------------------------------


def _replica(server: NatsServerProcess, db: tuple[str, str | None], folder: Path, name: str) -> AccountantApp:
    (folder / "prices.yaml").write_text(yaml.safe_dump({"default_model": PRICE}), encoding="utf-8")
    (folder / "budgets.yaml").write_text("{}", encoding="utf-8")
    (folder / "limits.yaml").write_text(yaml.safe_dump(REPLICA_LIMITS), encoding="utf-8")
    settings = AccountantSettings(
        nats_url=server.url,
        database_url=db[0],
        database_schema=db[1],
        prices_file=folder / "prices.yaml",
        budgets_file=folder / "budgets.yaml",
        limits_file=folder / "limits.yaml",
        replica_id=name,
        lease_ttl_seconds=3.0,
        lease_renew_seconds=0.2,
        drain_timeout_seconds=2.0,
    )
    return create_app(settings)


PRICE = {"prompt_per_million": 1.0, "completion_per_million": 1.0}
REPLICA_LIMITS: dict[str, Any] = {"window_seconds": 3600, "defaults": {"tenant": {"requests_per_minute": 5}}}


async def _ask(nc: NatsClient, tenant: str, rid: str) -> BudgetReserveReply:
    request = BudgetReserveRequest(
        reservation_id=rid, tenant=tenant, task_id=f"task-{rid}", agent="assistant", kind="llm", model="m1"
    )
    reply = await nc.request(budget_subject(BUDGET_RESERVE, tenant), request.model_dump_json().encode(), timeout=10)
    return BudgetReserveReply.model_validate_json(reply.data)


async def test_two_replicas_keep_one_bucket_per_tenant_and_a_take_over_keeps_its_level(
    own_server: NatsServerProcess, own_client: NatsClient, db: tuple[str, str | None], tmp_path: Path
) -> None:
    into = time.time() % 3600
    if into > 3540:  # the test must not cross the hour's window boundary
        await asyncio.sleep(3600 - into + 0.5)
    a, b = _replica(own_server, db, tmp_path, "replica-a"), _replica(own_server, db, tmp_path, "replica-b")
    await a.start()
    await b.start()
    try:

        async def shared() -> bool:
            return len(a.served) == len(b.served) == BUDGET_PARTITIONS // 2 and not a.served & b.served

        await wait_for(shared)
        tenants = {partition_of(f"t-{n}"): f"t-{n}" for n in range(200)}
        tenant = next(t for p, t in tenants.items() if p in a.served)
        replies = await asyncio.gather(*(_ask(own_client, tenant, f"r{n}") for n in range(8)))
        assert sorted(reply.allowed for reply in replies) == [False] * 3 + [True] * 5
        assert all(reply.throttled for reply in replies if not reply.allowed)
        await a.stop()

        async def taken_over() -> bool:
            return b.served == set(range(BUDGET_PARTITIONS))

        await wait_for(taken_over)
        after = await _ask(own_client, tenant, "after-take-over")
        assert after.throttled, "the new owner counted the window's admissions again"
        assert after.limit == f"tenant:{tenant}:requests_per_minute"
    finally:
        await b.stop()
        await a.stop()
