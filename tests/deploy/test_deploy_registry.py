"""The manifests against the contracts registry: every service is deployed, every durable consumer is
watched by a KEDA trigger (or says why not), every trigger names a real stream and consumer of the
service it scales, the bootstrap creates the consumers of every model served, and the scaling numbers
fit the consumers' limits."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import pytest
from agentbus.contracts import registry
from agentbus.contracts.registry import ConsumerSpec, Service
from deploy.manifests import (
    NATS_SERVICE,
    OVERLAYS,
    SETTINGS,
    Manifest,
    configmap_data,
    container_env,
    main_container,
    name_of,
    named,
    of_kind,
    render_overlay,
    service_deployments,
    service_name,
)
from pydantic import TypeAdapter, ValidationError

CONCURRENCY_FIELD: dict[str, str] = {
    Service.AGENT_RUNNER: "consumer_concurrency",
    Service.INFERENCE_WORKER: "max_concurrency",
}
"""The setting that bounds the messages one replica holds unacked per consumer."""

NO_TRIGGER_ANNOTATION = "agentbus.dev/consumers-without-trigger"
"""On a ScaledObject: a JSON object {durable: reason} for consumers of its service it deliberately does not
scale on. Scale-to-zero makes this dangerous: a consumer nobody watches never wakes its service."""

MONITORING_PORT_NAME = "monitor"


def _env_prefix(service: str) -> str:
    prefix: str = SETTINGS[service].model_config["env_prefix"]
    return prefix


def _settings_env(deployment: Manifest, manifests: list[Manifest]) -> dict[str, str]:
    """The service's own settings (prefix stripped, lower-cased) from its literal environment."""
    prefix = _env_prefix(service_name(deployment))
    env = container_env(main_container(deployment), manifests)
    return {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}


def _setting(deployment: Manifest, manifests: list[Manifest], field: str) -> Any:
    """A setting's value in a Deployment: its literal env value, parsed as the field's type, or the default."""
    settings = SETTINGS[service_name(deployment)]
    raw = _settings_env(deployment, manifests).get(field)
    info = settings.model_fields[field]
    if raw is None:
        return info.get_default(call_default_factory=True)
    assert info.annotation is not None
    adapter: TypeAdapter[Any] = TypeAdapter(info.annotation)
    try:
        return adapter.validate_python(raw)
    except ValidationError:
        return adapter.validate_json(raw)  # lists and objects come as JSON, as pydantic-settings reads them


def _served_models(manifests: list[Manifest]) -> list[str]:
    models: list[str] = []
    for deployment in service_deployments(manifests):
        if service_name(deployment) == Service.INFERENCE_WORKER:
            models.extend(_setting(deployment, manifests, "models"))
    return models


def _scaled_by_deployment(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(manifests, "ScaledObject")}


def _consumer_specs(manifests: list[Manifest]) -> dict[str, ConsumerSpec]:
    return {spec.durable: spec for spec in registry.consumers(tuple(_served_models(manifests)))}


def _deployment_consumers(deployment: Manifest, manifests: list[Manifest]) -> set[str]:
    """The durable consumers a Deployment's pods read, per the registry and its settings."""
    service = service_name(deployment)
    if service == Service.INFERENCE_WORKER:
        return {registry.inference_consumer(m).durable for m in _setting(deployment, manifests, "models")}
    return {spec.durable for spec in registry.STATIC_CONSUMERS if spec.service == service}


def test_every_registry_service_has_settings_here() -> None:
    assert set(SETTINGS) == set(Service)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_registry_service_has_a_deployment(overlay: str) -> None:
    deployed = {service_name(d) for d in service_deployments(render_overlay(overlay))}
    assert deployed == {s.value for s in Service}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_deployment_is_scaled_by_keda(overlay: str) -> None:
    manifests = render_overlay(overlay)
    scaled = _scaled_by_deployment(manifests)
    deployments = {name_of(d) for d in service_deployments(manifests)}
    assert deployments == set(scaled)
    for name in deployments:
        assert "replicas" not in named(manifests, "Deployment", name)["spec"], (
            f"{name}: spec.replicas would fight the ScaledObject on every apply"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_trigger_names_a_registry_stream_and_consumer_of_its_service(overlay: str) -> None:
    manifests = render_overlay(overlay)
    specs = _consumer_specs(manifests)
    stream_names = {s.name for s in registry.STREAMS}
    for deployment_name, scaled in _scaled_by_deployment(manifests).items():
        deployment = named(manifests, "Deployment", deployment_name)
        reads = _deployment_consumers(deployment, manifests)
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            assert meta["stream"] in stream_names, f"{name_of(scaled)}: unknown stream {meta['stream']}"
            spec = specs.get(meta["consumer"])
            assert spec is not None, f"{name_of(scaled)}: consumer {meta['consumer']} is not in the registry"
            assert spec.stream == meta["stream"], f"{meta['consumer']} reads {spec.stream}, not {meta['stream']}"
            assert meta["consumer"] in reads, (
                f"{name_of(scaled)} scales {deployment_name} on {meta['consumer']}, which it does not read"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_consumer_has_a_trigger_or_a_written_reason(overlay: str) -> None:
    manifests = render_overlay(overlay)
    missing = []
    for deployment_name, scaled in _scaled_by_deployment(manifests).items():
        deployment = named(manifests, "Deployment", deployment_name)
        watched = {t["metadata"]["consumer"] for t in scaled["spec"]["triggers"]}
        reasons = json.loads(scaled["metadata"].get("annotations", {}).get(NO_TRIGGER_ANNOTATION, "{}"))
        assert all(isinstance(r, str) and r.strip() for r in reasons.values()), "a reason must be written out"
        missing += sorted(_deployment_consumers(deployment, manifests) - watched - set(reasons))
    assert missing == []
    covered = set().union(*(_deployment_consumers(d, manifests) for d in service_deployments(manifests)))
    assert covered == set(_consumer_specs(manifests)), "every registry consumer needs a Deployment reading it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triggers_read_the_nats_monitoring_endpoint_of_this_namespace(overlay: str) -> None:
    manifests = render_overlay(overlay)
    nats = named(manifests, "Service", NATS_SERVICE)
    port = next(p["port"] for p in nats["spec"]["ports"] if p["name"] == MONITORING_PORT_NAME)
    expected = f"{NATS_SERVICE}.{nats['metadata']['namespace']}.svc.cluster.local:{port}"
    for scaled in of_kind(manifests, "ScaledObject"):
        assert scaled["metadata"]["namespace"] == nats["metadata"]["namespace"]
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["natsServerMonitoringEndpoint"] == expected
            # Users in an `authorization` block live in the global account.
            assert trigger["metadata"]["account"] == "$G"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_numbers_fit_the_consumer_limits(overlay: str) -> None:
    """lagThreshold is at most what one replica works on at once, and maxReplicaCount replicas together
    cannot hold more unacked messages than the consumer's max_ack_pending (beyond it, replicas idle)."""
    manifests = render_overlay(overlay)
    specs = _consumer_specs(manifests)
    for deployment_name, scaled in _scaled_by_deployment(manifests).items():
        deployment = named(manifests, "Deployment", deployment_name)
        concurrency = int(_setting(deployment, manifests, CONCURRENCY_FIELD[service_name(deployment)]))
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            threshold, activation = int(meta["lagThreshold"]), int(meta["activationLagThreshold"])
            assert 1 <= threshold <= concurrency, f"{deployment_name}: lagThreshold {threshold} > {concurrency}"
            assert activation >= 0
            limit = specs[meta["consumer"]].max_ack_pending
            assert spec["maxReplicaCount"] * concurrency <= limit, (
                f"{deployment_name}: {spec['maxReplicaCount']} replicas x {concurrency} in flight exceeds "
                f"max_ack_pending {limit} of {meta['consumer']}"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_bootstrap_creates_the_consumers_of_every_served_model(overlay: str) -> None:
    manifests = render_overlay(overlay)
    config = configmap_data(manifests, "bootstrap-config")
    assert sorted(config["MODELS"].split(",")) == sorted(_served_models(manifests))
    job = named(manifests, "Job", "agentbus-bootstrap")
    args = main_container(job)["args"]
    assert args[:2] == ["streams", "apply"]
    assert args[args.index("--models") + 1] == "$(MODELS)"
    assert args[args.index("--replicas") + 1] == "$(STREAM_REPLICAS)"
    assert args[args.index("--nats-url") + 1].endswith(f"@{NATS_SERVICE}:4222")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stream_replicas_fit_the_nats_cluster(overlay: str) -> None:
    manifests = render_overlay(overlay)
    replicas = int(configmap_data(manifests, "bootstrap-config")["STREAM_REPLICAS"])
    servers = named(manifests, "StatefulSet", "nats")["spec"]["replicas"]
    assert 1 <= replicas <= servers
    if overlay != "dev":
        assert replicas == servers == 3, "staging and production keep three copies of every message"


def _env_names_are_settings(service: str, env: Mapping[str, str]) -> list[str]:
    prefix = _env_prefix(service)
    fields = set(SETTINGS[service].model_fields)
    return [name for name in env if name.startswith(prefix) and name[len(prefix) :].lower() not in fields]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_environment_is_valid_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AGENTBUS_<SERVICE>_* variable is a field of the service's settings and parses as one."""
    manifests = render_overlay(overlay)
    for deployment in service_deployments(manifests):
        service = service_name(deployment)
        env = container_env(main_container(deployment), manifests)
        assert _env_names_are_settings(service, env) == [], f"{name_of(deployment)}: unknown settings"
        prefix = _env_prefix(service)
        with monkeypatch.context() as scope:
            for name in [n for n in os.environ if n.startswith("AGENTBUS_")]:
                scope.delenv(name)
            for name, value in env.items():
                scope.setenv(name, value)
            SETTINGS[service]()
        assert env.get(f"{prefix}HTTP_HOST") == "0.0.0.0", f"{name_of(deployment)} must listen beyond localhost"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_logs_in_to_nats_as_its_own_user(overlay: str) -> None:
    """The user a service names exists in auth.conf with the password variable its Secret key fills."""
    manifests = render_overlay(overlay)
    auth = configmap_data(manifests, "nats-config")["auth.conf"]
    users = dict(re.findall(r"user:\s*([\w-]+)\s*\n\s*password:\s*\$(\w+)", auth))
    for deployment in service_deployments(manifests):
        service = service_name(deployment)
        prefix = _env_prefix(service)
        container = main_container(deployment)
        user = container_env(container, manifests)[f"{prefix}NATS_USER"]
        password_ref = next(
            v["valueFrom"]["secretKeyRef"] for v in container["env"] if v["name"] == f"{prefix}NATS_PASSWORD"
        )
        assert users.get(user) == password_ref["key"], f"{name_of(deployment)}: NATS user {user}"
