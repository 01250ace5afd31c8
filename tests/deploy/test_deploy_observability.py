"""The prometheus component against the code and the registry: scrapes find their targets, every agentbus
metric an alert or a panel reads is one the services export, and the consumer limits the stalled-consumer
alert compares against are the registry's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from agentbus.contracts import registry
from deploy.manifests import (
    REPO_ROOT,
    Manifest,
    labels_of,
    model_folders,
    name_of,
    named,
    of_kind,
    pod_labels,
    render,
    render_overlay,
    selector_matches,
    service_deployments,
    workloads,
)

OVERLAY = "prod"
SOURCE_ROOTS = ("contracts/src", "libs", "services")
METRIC_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def _rule(manifests: list[Manifest]) -> Manifest:
    return named(manifests, "PrometheusRule", "agentbus")


def _rules(manifests: list[Manifest]) -> Iterator[dict[str, Any]]:
    for group in _rule(manifests)["spec"]["groups"]:
        yield from group["rules"]


def _dashboard(manifests: list[Manifest]) -> dict[str, Any]:
    configmap = named(manifests, "ConfigMap", "agentbus-grafana-dashboard")
    assert labels_of(configmap).get("grafana_dashboard") == "1"
    dashboard: dict[str, Any] = json.loads(configmap["data"]["agentbus.json"])
    return dashboard


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _exported_metric_names() -> set[str]:
    """agentbus_* names the code registers (string literals in the sources), as Prometheus exposes them."""
    literals: set[str] = set()
    for root in SOURCE_ROOTS:
        for path in (REPO_ROOT / root).rglob("*.py"):
            if "tests" in path.parts:
                continue
            literals.update(re.findall(r"[\"'](agentbus_[a-z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    return {literal.removesuffix("_total") + suffix for literal in literals for suffix in METRIC_SUFFIXES}


def test_alerts_and_panels_read_only_metrics_the_services_export() -> None:
    manifests = render_overlay(OVERLAY)
    exprs = [r["expr"] for r in _rules(manifests)] + _dashboard_exprs(_dashboard(manifests))
    used = {name for expr in exprs for name in re.findall(r"\b(agentbus_[a-z0-9_]+)", expr)}
    assert used, "no agentbus metric is used"
    assert sorted(used - _exported_metric_names()) == []


def test_max_ack_pending_limits_are_the_registrys() -> None:
    limits: dict[str, int] = {}
    for rule in _rules(render_overlay(OVERLAY)):
        if rule.get("record") != "agentbus:consumer_max_ack_pending":
            continue
        match = re.fullmatch(r"(\d+) \+ 0 \* .*\{consumer_name(=~?)\"([^\"]+)\"\}\)", rule["expr"].strip())
        assert match is not None, rule["expr"]
        value, operator, consumer = int(match.group(1)), match.group(2), match.group(3)
        limits[consumer if operator == "=" else consumer.removesuffix(".+")] = value
    expected = {spec.durable: spec.max_ack_pending for spec in registry.STATIC_CONSUMERS}
    expected[registry.INFERENCE_DURABLE_PREFIX] = registry.inference_consumer("any").max_ack_pending
    assert limits == expected


def test_missing_consumer_alert_covers_the_static_consumers() -> None:
    alert = next(r for r in _rules(render_overlay(OVERLAY)) if r.get("alert") == "AgentbusConsumerMissing")
    named_consumers = set(re.findall(r'consumer_name="([^"]+)"', alert["expr"]))
    assert named_consumers == {spec.durable for spec in registry.STATIC_CONSUMERS}


def test_required_alerts_exist_and_explain_themselves() -> None:
    rules = [r for r in _rules(render_overlay(OVERLAY)) if "alert" in r]
    names = {r["alert"] for r in rules}
    assert {
        "AgentbusHandlerErrorRate",
        "AgentbusConsumerBacklogHigh",
        "AgentbusConsumerAckPendingStalled",
        "AgentbusBudgetExceededSpike",
        "AgentbusBudgetExceededRatio",
        "AgentbusBudgetSoftLimitCrossed",
        "AgentbusCostBurnHigh",
        "AgentbusTraceExportBacklog",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def test_dashboard_panels_all_have_queries() -> None:
    dashboard = _dashboard(render_overlay(OVERLAY))
    assert dashboard["uid"] == "agentbus-overview"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    assert all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_scrape_configs_find_their_targets(overlay: str) -> None:
    manifests = render_overlay(overlay)
    services = of_kind(manifests, "Service")
    monitor = named(manifests, "ServiceMonitor", "agentbus-services")
    selected = [s for s in services if selector_matches(monitor["spec"]["selector"], labels_of(s))]
    port = monitor["spec"]["endpoints"][0]["port"]
    for deployment in service_deployments(manifests):
        backing = [
            s for s in selected if selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(deployment))
        ]
        assert backing, f"no scraped Service in front of {name_of(deployment)}"
        assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in backing)
    pods = named(manifests, "PodMonitor", "agentbus-nats")
    scraped = [w for w in workloads(manifests) if selector_matches(pods["spec"]["selector"], pod_labels(w))]
    assert [name_of(w) for w in scraped] == ["nats"]
    container_ports = {p["name"] for c in scraped[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] in container_ports


def test_scaling_alerts_cover_every_scaled_object() -> None:
    """AgentbusScaledToMax and KedaScalerErrors select HPAs and ScaledObjects by a name pattern: every
    ScaledObject of production (and of a GPU model folder) must match it."""
    manifests = render_overlay(OVERLAY)
    rules = {r["alert"]: r["expr"] for r in _rules(manifests) if "alert" in r}
    hpa = re.search(r'horizontalpodautoscaler=~"keda-hpa-\(([^"]+)\)"', rules["AgentbusScaledToMax"])
    scaler = re.search(r'scaledObject=~"([^"]+)"', rules["KedaScalerErrors"])
    assert hpa is not None
    assert scaler is not None
    names = [name_of(s) for s in of_kind(manifests, "ScaledObject")]
    names += [name_of(s) for folder in model_folders() for s in of_kind(render(folder), "ScaledObject")]
    for name in names:
        assert re.fullmatch(hpa.group(1), name), f"AgentbusScaledToMax misses {name}"
        assert re.fullmatch(scaler.group(1), name), f"KedaScalerErrors misses {name}"
