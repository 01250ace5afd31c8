"""Pure rules: money, the limit boundary, pricing, which budgets apply, and the config files."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.cost_accountant.config import load_budget_config, load_price_table
from agentbus.cost_accountant.domain import (
    Attribution,
    Counter,
    ScopeLimit,
    crossed_soft_limit,
    decide,
    month_period,
    usd_to_nano,
)
from agentbus.cost_accountant.pricing import PriceTable, PricingError, price_usage
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
