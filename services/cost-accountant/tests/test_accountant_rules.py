"""Pure rules: money, the limit boundary, pricing, which budgets apply, and the config files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.book import (
    DENIED,
    OPEN,
    RELEASED,
    SETTLED,
    MonthlySpend,
    PartitionBook,
    StoredHold,
    StoredTask,
)
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.cost_accountant.config import load_budget_config, load_price_table
from agentbus.cost_accountant.domain import (
    Attribution,
    Counter,
    ScopeLimit,
    Verdict,
    crossed_soft_limit,
    decide,
    month_period,
    usd_to_nano,
)
from agentbus.cost_accountant.ownership import fair_share, takeable
from agentbus.cost_accountant.ports import LeaseRow, PricedUsage, ReservationInput
from agentbus.cost_accountant.pricing import (
    NodeClassPrice,
    PriceTable,
    PricingError,
    _token_cost,
    price_tokens,
    price_usage,
)
from agentbus.runtime.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

PRICES = PriceTable.model_validate(
    {
        "models": {"m1": {"prompt_per_million": 1.0, "completion_per_million": 2.0}},
        "default_model": {"prompt_per_million": 10, "completion_per_million": 20},
        "node_classes": {"gpu-l4": {"per_gpu_hour": 3.6}},
        "tools": {"search": {"per_call": 0.002}, "retrieval": {"per_call": 0.0001}},
    }
)


def usage(**fields: object) -> UsageRecorded:
    return UsageRecorded.model_validate({"usage_id": "u1", "tenant": "acme", **fields})


def test_money_is_exact_in_nano_dollars() -> None:
    assert usd_to_nano(0.1) + usd_to_nano(0.2) == usd_to_nano(0.3)
    assert usd_to_nano(Decimal("0.000000001")) == 1
    assert usd_to_nano(1) == 1_000_000_000


def test_spending_exactly_up_to_the_limit_is_allowed_and_one_nano_dollar_more_is_denied() -> None:
    scopes = [ScopeLimit("task:t1", "task", hard_nano=1000)]
    at_limit = decide(400, scopes, {("task:t1", "task"): Counter(spent_nano=500, reserved_nano=100)})
    over = decide(401, scopes, {("task:t1", "task"): Counter(spent_nano=500, reserved_nano=100)})
    assert at_limit.allowed
    assert not over.allowed
    assert (over.budget, over.limit_nano, over.committed_nano) == ("task:t1", 1000, 600)


def test_every_scope_is_checked_and_the_narrowest_exceeded_one_is_named() -> None:
    scopes = [
        ScopeLimit("task:t1", "task"),
        ScopeLimit("user:bob", "2026-11", hard_nano=100),
        ScopeLimit("agent:a", "2026-11", hard_nano=10_000),
        ScopeLimit("tenant:acme", "2026-11", hard_nano=1_000_000),
    ]
    verdict = decide(150, scopes, {})
    assert not verdict.allowed
    assert verdict.budget == "user:bob"


def test_a_soft_limit_is_crossed_once() -> None:
    scope = ScopeLimit("tenant:acme", "2026-11", soft_nano=100)
    assert crossed_soft_limit(scope, 90, 100)
    assert not crossed_soft_limit(scope, 100, 120)
    assert not crossed_soft_limit(scope, 10, 99)


def test_tokens_are_priced_per_million_by_model() -> None:
    price = price_usage(PRICES, usage(kind="llm", model="m1", prompt_tokens=1000, completion_tokens=500))
    assert price.nano == usd_to_nano(Decimal("0.002"))  # 1000 * $1/M + 500 * $2/M
    assert not price.priced_by_default


def test_an_unknown_model_is_priced_by_the_default_rule_and_flagged() -> None:
    price = price_usage(PRICES, usage(kind="llm", model="mystery", prompt_tokens=1_000_000))
    assert price.nano == usd_to_nano(10)
    assert price.priced_by_default


def test_an_unknown_model_without_a_default_rule_cannot_be_priced() -> None:
    table = PriceTable.model_validate({"models": {}})
    with pytest.raises(PricingError) as caught:
        price_usage(table, usage(kind="llm", model="mystery", prompt_tokens=1))
    assert caught.value.code == "unknown_model"


def test_self_hosted_gpu_seconds_are_priced_by_node_class() -> None:
    price = price_usage(PRICES, usage(kind="llm", model="m1", prompt_tokens=0, gpu_seconds=10.0, node_class="gpu-l4"))
    assert price.nano == usd_to_nano(Decimal("0.01"))  # 10 s at $3.60/h
    with pytest.raises(PricingError) as caught:
        price_usage(PRICES, usage(kind="gpu", gpu_seconds=1.0))
    assert caught.value.code == "missing_node_class"


def test_tools_and_retrievals_are_priced_per_call() -> None:
    assert price_usage(PRICES, usage(kind="tool", tool="search")).nano == usd_to_nano(0.002)
    assert price_usage(PRICES, usage(kind="retrieval")).nano == usd_to_nano(0.0001)
    with pytest.raises(PricingError) as caught:
        price_usage(PRICES, usage(kind="tool", tool="rm-rf"))
    assert caught.value.code == "unknown_tool"


def test_an_implausible_quantity_is_refused() -> None:
    with pytest.raises(PricingError) as caught:
        price_usage(PRICES, usage(kind="llm", model="m1", prompt_tokens=10**15))
    assert caught.value.code == "implausible_quantity"


def test_a_cost_lands_in_task_user_agent_model_and_tenant_scopes() -> None:
    policy = BudgetPolicy(BudgetConfig())
    scopes = policy.scopes(Attribution("acme", "t1", "assistant", "bob", "m1"), NOW, 5)
    assert [(s.scope, s.period) for s in scopes] == [
        ("task:t1", "task"),
        ("user:bob", "2026-11"),
        ("agent:assistant", "2026-11"),
        ("model:m1", "2026-11"),
        ("tenant:acme", "2026-11"),
    ]
    assert scopes[0].hard_nano == 5


def test_the_default_user_budget_applies_to_users_without_their_own() -> None:
    config = BudgetConfig.model_validate(
        {
            "defaults": {"user": {"hard_usd": 1}},
            "tenants": {
                "acme": {"users": {"alice": {"hard_usd": 50}}},
                "globex": {"default_user": {"hard_usd": 2}},
            },
        }
    )
    policy = BudgetPolicy(config)

    def user_limit(tenant: str, user: str) -> int | None:
        return policy.scopes(Attribution(tenant, None, None, user, None), NOW, None)[0].hard_nano

    assert user_limit("acme", "alice") == usd_to_nano(50)
    assert user_limit("acme", "carol") == usd_to_nano(1)
    assert user_limit("globex", "carol") == usd_to_nano(2)
    assert user_limit("initech", "carol") == usd_to_nano(1)


def test_budget_periods_are_utc_calendar_months() -> None:
    assert month_period(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == "2026-12"


def test_the_shipped_price_table_and_budgets_load() -> None:
    prices = load_price_table(REPO / "config" / "prices.yaml")
    load_budget_config(REPO / "config" / "budgets.yaml")
    assert prices.models["scripted"].prompt_per_million == 0
    assert prices.default_model is not None


def test_a_bad_budget_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("tenants:\n  acme:\n    monthly: {hard_usd: 1, soft_usd: 2}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"budgets\.yaml: field 'tenants\.acme\.monthly'"):
        load_budget_config(path)
    path.write_text("tenants:\n  acme:\n    monthy: {hard_usd: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="monthy"):
        load_budget_config(path)


def test_a_missing_price_table_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_price_table(tmp_path / "nope.yaml")


def test_tokens_priced_in_whole_nano_dollars_agree_with_the_decimal_rule() -> None:
    table = PriceTable.model_validate(
        {
            "models": {
                "whole": {"prompt_per_million": "0.15", "completion_per_million": "0.6"},
                "fine": {"prompt_per_million": "0.1234567", "completion_per_million": "3.0000001"},
            }
        }
    )
    for model in ("whole", "fine"):
        price, _ = table.model_price(model)
        for prompt, completion in ((0, 0), (1, 1), (2000, 500), (999_999, 7), (10**9, 10**8)):
            assert price_tokens(table, model, prompt, completion).nano == usd_to_nano(
                _token_cost(price, prompt, completion)
            ), (model, prompt, completion)
            # A record with GPU-seconds too is rounded once, as the whole Decimal sum would be.
            record = usage(
                kind="llm",
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                gpu_seconds=1.7,
                node_class="gpu",
            )
            node = Decimal("3.33") * Decimal("1.7") / 3600
            expected = usd_to_nano(_token_cost(price, prompt, completion) + node)
            with_gpu = table.model_copy(update={"node_classes": {"gpu": NodeClassPrice(per_gpu_hour=Decimal("3.33"))}})
            assert price_usage(with_gpu, record).nano == expected, (model, prompt, completion)


# --- the book ------------------------------------------------------------------------------------------

NAIVE_NOW = datetime(2026, 11, 20, 12, 0)


def book(budgets: dict[str, object] | None = None) -> PartitionBook:
    policy = BudgetPolicy(BudgetConfig.model_validate(budgets or {}))
    return PartitionBook(0, 1, policy, since_period="2026-10", reservation_ttl=timedelta(minutes=10))


def ask(rid: str, nano: int, task: str = "t1", **fields: object) -> ReservationInput:
    values: dict[str, object] = {
        "reservation_id": rid,
        "tenant": "acme",
        "task_id": task,
        "agent": "assistant",
        "user": "bob",
        "kind": "llm",
        "model": "m1",
        "tool": None,
        "amount_nano": nano,
        "task_budget_nano": None,
        **fields,
    }
    return ReservationInput(**values)  # type: ignore[arg-type]


def new_task(b: PartitionBook, task: str = "t1") -> None:
    b.install(StoredTask("acme", task, None, {}, []))


def spend(usage_id: str, nano: int, **fields: object) -> PricedUsage:
    record = UsageRecorded.model_validate(
        {"usage_id": usage_id, "kind": "llm", "tenant": "acme", "task_id": "t1", "model": "m1", "at": NOW, **fields}
    )
    return PricedUsage(record, nano, False)


def test_the_book_holds_settles_and_voids_like_a_two_phase_ledger() -> None:
    b = book({"tenants": {"acme": {"monthly": {"hard_usd": "0.000001"}}}})  # 1000 nano-dollars
    new_task(b)
    b.begin(1)
    assert b.reserve(ask("a", 600), NAIVE_NOW) == Verdict(True, 600)
    denied = b.reserve(ask("b", 500), NAIVE_NOW)
    assert denied == Verdict(False, 0, "tenant:acme", 1000, 600, 500)
    assert b.reserve(ask("b", 1), NAIVE_NOW) == denied  # the same id: its first verdict
    assert b.counter("acme", "tenant:acme", "2026-11").reserved_nano == 600
    # Posted: the actual cost moves to spent, the hold is voided.
    assert b.record(spend("u1", 250, reservation_id="a"), NAIVE_NOW, in_ledger=False)
    tenant = b.counter("acme", "tenant:acme", "2026-11")
    assert (tenant.spent_nano, tenant.reserved_nano) == (250, 0)
    plan = b.take_plan()
    assert [h.status for h in plan.new_holds.values()] == [SETTLED, DENIED]  # written once, in its last state
    assert [t.task_id for t in plan.new_tasks.values()] == ["t1"]
    assert [e.priced.usage.usage_id for e in plan.ledger] == ["u1"]


def test_a_closed_task_gives_back_its_holds_and_refuses_more() -> None:
    b = book()
    new_task(b)
    b.begin(1)
    b.reserve(ask("a", 300), NAIVE_NOW)
    b.reserve(ask("b", 200), NAIVE_NOW)
    b.mark_committed(1)
    b.take_plan()
    b.begin(2)
    assert b.close("acme", "t1", NAIVE_NOW) == 500
    assert b.close("acme", "t1", NAIVE_NOW) == 0
    assert b.reserve(ask("c", 1), NAIVE_NOW) is None
    assert b.counter("acme", "task:t1", "task").reserved_nano == 0
    plan = b.take_plan()
    assert sorted((h.reservation_id, h.status) for h in plan.changed_holds) == [("a", RELEASED), ("b", RELEASED)]
    assert [t.task_id for t in plan.closed_tasks] == ["t1"]


def test_a_usage_record_counts_once_per_usage_id() -> None:
    b = book()
    new_task(b)
    b.begin(1)
    assert b.record(spend("u1", 10), NAIVE_NOW, in_ledger=False)
    assert not b.record(spend("u1", 10), NAIVE_NOW, in_ledger=False)
    assert not b.record(spend("u2", 10), NAIVE_NOW, in_ledger=True)
    assert b.counter("acme", "tenant:acme", "2026-11").spent_nano == 10


def test_holds_expire_after_their_time_to_live() -> None:
    b = book()
    new_task(b)
    b.begin(1)
    b.reserve(ask("a", 300), NAIVE_NOW)
    assert b.expire(NAIVE_NOW + timedelta(minutes=9)) == 0
    assert b.expire(NAIVE_NOW + timedelta(minutes=11)) == 300
    assert b.counter("acme", "tenant:acme", "2026-11").reserved_nano == 0


def test_a_book_is_rebuilt_from_monthly_spend_and_the_tasks_holding_budget() -> None:
    policy = BudgetPolicy(BudgetConfig())
    keys = (("task:t1", "task"), ("user:bob", "2026-11"), ("tenant:acme", "2026-11"))
    hold = StoredHold(
        "acme", "t1", "a", "assistant", "bob", "llm", "m1", None, 70, OPEN, keys, None, None, None,
        NAIVE_NOW, NAIVE_NOW + timedelta(minutes=10), None,
    )  # fmt: skip
    b = PartitionBook.rebuilt(
        0,
        3,
        policy,
        since_period="2026-10",
        reservation_ttl=timedelta(minutes=10),
        monthly=[MonthlySpend("acme", "bob", "assistant", "m1", "2026-11", 500)],
        tasks=[StoredTask("acme", "t1", ("assistant", "bob", None, NAIVE_NOW, None), {"u1": 30}, [hold])],
    )
    assert b.counter("acme", "tenant:acme", "2026-11") == Counter(500, 70)
    assert b.counter("acme", "user:bob", "2026-11") == Counter(500, 70)
    assert b.counter("acme", "model:m1", "2026-11") == Counter(500, 0)
    assert b.counter("acme", "task:t1", "task") == Counter(30, 70)
    assert b.reserve(ask("a", 999), NAIVE_NOW) == Verdict(True, 70)


def test_partitions_are_shared_among_the_replicas_alive() -> None:
    assert [fair_share(8, n) for n in (0, 1, 2, 3, 8, 9)] == [8, 8, 4, 3, 1, 1]
    now = NAIVE_NOW
    assert takeable(LeaseRow(0, None, 4, None), now)
    assert takeable(LeaseRow(0, "b", 4, now - timedelta(seconds=1)), now)
    assert not takeable(LeaseRow(0, "b", 4, now + timedelta(seconds=1)), now)
