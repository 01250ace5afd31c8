"""Model routing: weighted deployments deterministic on the request id, pinning, fallback chains."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.routing import RoutingConfigError, RoutingTable, load_routing_table

REPO_ROOT = Path(__file__).resolve().parents[3]
REQUESTS = 20_000


def _table(models: dict[str, Any], **extra: Any) -> RoutingTable:
    return RoutingTable.from_mapping({"models": models, **extra})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_weights_split_requests_in_proportion_within_statistical_bounds() -> None:
    table = _table(
        {
            "big": {
                "deployments": [
                    {"model": "stable", "weight": 70},
                    {"model": "canary", "weight": 20},
                    {"model": "shadow", "weight": 10},
                ]
            }
        }
    )
    counts = Counter(table.choose("big", f"task-{i}.step-1") for i in range(REQUESTS))
    assert set(counts) == {"stable", "canary", "shadow"}
    for deployment, share in (("stable", 0.7), ("canary", 0.2), ("shadow", 0.1)):
        expected = REQUESTS * share
        sigma = math.sqrt(REQUESTS * share * (1 - share))
        # Five standard deviations: a correct router fails this about once in two million tables.
        assert abs(counts[deployment] - expected) < 5 * sigma, (deployment, counts)
    # Pearson's chi-square with 2 degrees of freedom; 18.4 is its 0.9999 quantile.
    chi_square = sum(
        (counts[d] - REQUESTS * s) ** 2 / (REQUESTS * s) for d, s in (("stable", 0.7), ("canary", 0.2), ("shadow", 0.1))
    )
    assert chi_square < 18.4


def test_the_same_request_id_always_picks_the_same_deployment() -> None:
    models = {"m": {"deployments": [{"model": "a", "weight": 1}, {"model": "b", "weight": 1}]}}
    first, second = _table(models), _table(models)
    picks = [first.choose("m", f"t{i}.step-2") for i in range(500)]
    assert picks == [first.choose("m", f"t{i}.step-2") for i in range(500)]
    assert picks == [second.choose("m", f"t{i}.step-2") for i in range(500)]
    # The choice is a hash of the id, not a round robin or a random draw: both deployments get used.
    assert set(picks) == {"a", "b"}


def test_adding_a_canary_only_moves_requests_to_the_canary() -> None:
    before = _table({"m": {"deployments": [{"model": "a", "weight": 50}, {"model": "b", "weight": 50}]}})
    after = _table(
        {
            "m": {
                "deployments": [
                    {"model": "a", "weight": 50},
                    {"model": "b", "weight": 50},
                    {"model": "c", "weight": 10},
                ]
            }
        }
    )
    moved = [(before.choose("m", f"r{i}"), after.choose("m", f"r{i}")) for i in range(5000)]
    changed = [(old, new) for old, new in moved if old != new]
    assert changed, "the canary takes some requests"
    assert all(new == "c" for _, new in changed)


def test_weight_zero_deployment_takes_only_pinned_requests() -> None:
    table = _table({"m": {"deployments": [{"model": "live", "weight": 1}, {"model": "preview", "weight": 0}]}})
    assert {table.choose("m", f"r{i}") for i in range(2000)} == {"live"}
    assert table.choose("m", "r1", pinned="preview") == "preview"


def test_a_pin_must_name_a_deployment_of_the_model() -> None:
    table = _table(
        {
            "m": {"deployments": [{"model": "a", "weight": 1}, {"model": "b", "weight": 1}]},
            "other": {"deployments": [{"model": "expensive", "weight": 1}]},
        }
    )
    pinned_b = {table.choose("m", f"r{i}", pinned="b") for i in range(200)}
    assert pinned_b == {"b"}
    unpinned = [table.choose("m", f"r{i}") for i in range(200)]
    assert [table.choose("m", f"r{i}", pinned="expensive") for i in range(200)] == unpinned


def test_pin_is_read_from_the_configured_metadata_key() -> None:
    table = _table({"m": {"deployments": [{"model": "a"}]}}, pin_metadata_key="route_to")
    assert table.pinned_deployment({"route_to": "a", "model_deployment": "b"}) == "a"
    assert table.pinned_deployment({"route_to": 7}) is None
    assert table.pinned_deployment({}) is None
    assert RoutingTable.empty().pinned_deployment({"model_deployment": "x"}) == "x"


def test_a_model_absent_from_the_table_routes_to_itself_without_fallback() -> None:
    table = _table({"m": {"deployments": [{"model": "a"}], "fallback": "scripted"}})
    assert table.choose("scripted", "r1") == "scripted"
    assert table.choose("scripted", "r1", pinned="a") == "scripted"
    assert table.fallback("scripted") is None
    assert table.deployments("scripted") == ("scripted",)
    assert RoutingTable.empty().choose("anything", "r") == "anything"


def test_fallback_chain_follows_each_model_until_one_without_fallback() -> None:
    table = _table(
        {
            "big": {"deployments": [{"model": "big-gpu"}], "fallback": "medium"},
            "medium": {"deployments": [{"model": "medium-gpu"}], "fallback": "hosted"},
        }
    )
    assert table.fallback("big") == "medium"
    assert table.fallback("medium") == "hosted"
    assert table.fallback("hosted") is None
    assert table.fallback_chain("big") == ("medium", "hosted")
    assert table.served_models() == ("big-gpu", "hosted", "medium-gpu")


@pytest.mark.parametrize(
    ("models", "cycle"),
    [
        ({"a": {"deployments": [{"model": "x"}], "fallback": "a"}}, "a -> a"),
        (
            {
                "a": {"deployments": [{"model": "x"}], "fallback": "b"},
                "b": {"deployments": [{"model": "y"}], "fallback": "c"},
                "c": {"deployments": [{"model": "z"}], "fallback": "a"},
            },
            "a -> b -> c -> a",
        ),
    ],
)
def test_fallback_loops_are_refused_at_load(tmp_path: Path, models: dict[str, Any], cycle: str) -> None:
    path = _write(tmp_path, yaml.safe_dump({"models": models}))
    with pytest.raises(RoutingConfigError) as caught:
        load_routing_table(path)
    assert str(path) in str(caught.value)
    assert "fallback" in str(caught.value)
    assert cycle in str(caught.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("models:\n  m:\n    deployments:\n      - {model: a, weight: -1}\n", "models.m.deployments[0].weight"),
        ("models:\n  m:\n    deployments:\n      - {model: 'bad.token'}\n", "models.m.deployments[0].model"),
        ("models:\n  m:\n    deployments: []\n", "models.m.deployments"),
        ("models:\n  m:\n    deployments:\n      - {model: a}\n    fallbak: b\n", "models.m.fallbak"),
        ("models:\n  m:\n    deployments:\n      - {model: a, weight: 0}\n", "models.m"),
        ("models:\n  m:\n    deployments:\n      - {model: a}\n      - {model: a}\n", "models.m"),
        ("modles: {}\n", "modles"),
    ],
)
def test_bad_tables_name_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RoutingConfigError) as caught:
        load_routing_table(path)
    assert isinstance(caught.value, ConfigurationError)
    assert str(caught.value).startswith(f"{path}: field '{field}'"), str(caught.value)


def test_unreadable_or_malformed_files_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(RoutingConfigError, match="cannot read"):
        load_routing_table(tmp_path / "missing.yaml")
    with pytest.raises(RoutingConfigError, match="not valid YAML"):
        load_routing_table(_write(tmp_path, "models: [\n"))
    with pytest.raises(RoutingConfigError, match="expected a mapping"):
        load_routing_table(_write(tmp_path, "- a\n"))
    assert load_routing_table(_write(tmp_path, "")).routes == {}


def test_the_shipped_routing_table_loads() -> None:
    table = load_routing_table(REPO_ROOT / "config" / "models.yaml")
    assert table.routes
    for model in table.routes:
        assert set(table.deployments(model)) <= set(table.served_models())
