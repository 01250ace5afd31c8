"""The manifests against the contracts registry: every service is deployed, every durable consumer is
watched by a KEDA trigger (or says why not), every trigger names a real stream and consumer of the
service it scales, the bootstrap creates the consumers of every model served, and the scaling numbers
fit the consumers' limits."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import pytest
from agentbus.cli.identities import service_user
from agentbus.cli.permissions import SERVICE_ACCESS, service_permissions
from agentbus.contracts import registry
from agentbus.contracts.registry import ConsumerSpec, Service
from deploy.manifests import (
    NATS_SERVICE,
    NOT_AUTOSCALED_ANNOTATION,
    OVERLAYS,
    SETTINGS,
    Manifest,
    configmap_data,
    container_env,
    env_prefix,
    main_container,
    model_folders,
    name_of,
    named,
    nats_triggers,
    of_kind,
    pod_spec,
    render,
    render_overlay,
    scaled_by_deployment,
    service_deployments,
    service_name,
    settings_of,
    untriggered_consumers,
)
from pydantic import TypeAdapter, ValidationError

CONCURRENCY_FIELD: dict[str, str] = {
    Service.AGENT_RUNNER: "consumer_concurrency",
    Service.INFERENCE_WORKER: "max_concurrency",
    Service.TOOL_EXECUTOR: "consumer_concurrency",
    Service.COST_ACCOUNTANT: "ingest_concurrency",
}
"""The setting that bounds the messages one replica holds unacked per consumer, for each autoscaled service."""

FIXED_CONCURRENCY: dict[str, int] = {
    registry.RETRIEVER_INGEST.durable: 2,
    registry.RETRIEVER_DELETES.durable: 4,
}
"""Consumers whose per-replica concurrency is fixed in code rather than a setting (services/retriever app.py)."""

BEST_EFFORT_REQUESTS = frozenset({registry.LLM_ABORT.pattern})
"""Core-NATS subjects whose loss is harmless: a worker scaled to zero has no generation to abort."""

REQUEST_SERVER_LABEL = "agentbus.dev/serves-requests"

MONITORING_PORT_NAME = "monitor"

_env_prefix = env_prefix


def _settings_env(deployment: Manifest, manifests: list[Manifest]) -> dict[str, str]:
    """The service's own settings (prefix stripped, lower-cased) from its literal environment."""
    prefix = _env_prefix(service_name(deployment))
    env = container_env(main_container(deployment), manifests)
    return {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}


def _setting(deployment: Manifest, manifests: list[Manifest], field: str) -> Any:
    """A setting's value in a Deployment: its literal env value, parsed as the field's type, or the default."""
    settings = settings_of(service_name(deployment))
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


_scaled_by_deployment = scaled_by_deployment


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
def test_every_service_deployment_is_scaled_by_keda_or_says_why_not(overlay: str) -> None:
    """A Deployment KEDA scales has no spec.replicas (it would fight the ScaledObject on every apply); one it
    does not scale runs a fixed number of replicas and names, for each of its consumers, why no trigger
    watches it."""
    manifests = render_overlay(overlay)
    scaled = _scaled_by_deployment(manifests)
    assert set(scaled) <= {name_of(d) for d in service_deployments(manifests)}, "a ScaledObject scales nothing"
    for deployment in service_deployments(manifests):
        name = name_of(deployment)
        if name in scaled:
            assert "replicas" not in deployment["spec"], f"{name}: spec.replicas would fight the ScaledObject"
        else:
            assert deployment["spec"].get("replicas", 0) >= 1, f"{name}: neither scaled by KEDA nor given replicas"
            assert NOT_AUTOSCALED_ANNOTATION in deployment["metadata"].get("annotations", {}), (
                f"{name}: a Deployment KEDA does not scale must say why ({NOT_AUTOSCALED_ANNOTATION})"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_trigger_names_a_registry_stream_and_consumer_of_its_service(overlay: str) -> None:
    manifests = render_overlay(overlay)
    specs = _consumer_specs(manifests)
    stream_names = {s.name for s in registry.STREAMS}
    for deployment_name, scaled in _scaled_by_deployment(manifests).items():
        deployment = named(manifests, "Deployment", deployment_name)
        reads = _deployment_consumers(deployment, manifests)
        others = [tr for tr in scaled["spec"]["triggers"] if tr["type"] != "nats-jetstream"]
        for trigger in others:
            # CPU stands in for request/reply load, which leaves no backlog: only for services that answer.
            assert trigger["type"] == "cpu", f"{name_of(scaled)}: unexpected trigger {trigger['type']}"
            assert trigger["metricType"] == "Utilization"
            assert trigger["metadata"]["containerName"] == "service"
            assert main_container(deployment)["resources"]["requests"]["cpu"], "Utilization needs a cpu request"
            assert service_name(deployment) in _answering_services(), f"{deployment_name} answers no requests"
        for trigger in nats_triggers(scaled):
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
    scaled_objects = _scaled_by_deployment(manifests)
    missing = []
    for deployment in service_deployments(manifests):
        scaled = scaled_objects.get(name_of(deployment))
        watched = {t["metadata"]["consumer"] for t in nats_triggers(scaled)} if scaled else set()
        reasons = untriggered_consumers(scaled if scaled is not None else deployment)
        assert all(isinstance(r, str) and r.strip() for r in reasons.values()), "a reason must be written out"
        reads = _deployment_consumers(deployment, manifests)
        assert set(reasons) <= reads, f"{name_of(deployment)} explains consumers it does not read"
        missing += sorted(reads - watched - set(reasons))
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
        for trigger in nats_triggers(scaled):
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
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
        for trigger in nats_triggers(scaled):
            meta = trigger["metadata"]
            concurrency = FIXED_CONCURRENCY.get(meta["consumer"]) or int(
                _setting(deployment, manifests, CONCURRENCY_FIELD[service_name(deployment)])
            )
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


def _env_names_are_settings(service: str, env: Iterable[str]) -> list[str]:
    prefix = _env_prefix(service)
    fields = set(settings_of(service).model_fields)
    return [name for name in env if name.startswith(prefix) and name[len(prefix) :].lower() not in fields]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_environment_is_valid_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AGENTBUS_<SERVICE>_* variable is a field of the service's settings and parses as one."""
    manifests = render_overlay(overlay)
    for deployment in service_deployments(manifests):
        service = service_name(deployment)
        container = main_container(deployment)
        env = container_env(container, manifests)
        from_secrets = [v["name"] for v in container.get("env", []) if "valueFrom" in v]
        assert _env_names_are_settings(service, [*env, *from_secrets]) == [], f"{name_of(deployment)}: unknown settings"
        prefix = _env_prefix(service)
        with monkeypatch.context() as scope:
            for name in [n for n in os.environ if n.startswith("AGENTBUS_")]:
                scope.delenv(name)
            for name, value in env.items():
                scope.setenv(name, value)
            for name in from_secrets:  # values unknown offline; some settings need theirs present
                scope.setenv(name, "placeholder")
            settings_of(service)()
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
        assert user == service_user(service), f"{name_of(deployment)}: the user `agentbus up` gives it is {user}"
        password_ref = next(
            v["valueFrom"]["secretKeyRef"] for v in container["env"] if v["name"] == f"{prefix}NATS_PASSWORD"
        )
        assert users.get(user) == password_ref["key"], f"{name_of(deployment)}: NATS user {user}"


def _served_models_anywhere() -> tuple[str, ...]:
    """Every model an inference-worker serves in some overlay or models/ folder."""
    models: set[str] = set()
    for manifests in [*(render_overlay(o) for o in OVERLAYS), *(render(f) for f in model_folders())]:
        models.update(_served_models(manifests))
    return tuple(sorted(models))


def _user_permissions(auth_conf: str, user: str) -> tuple[set[str], set[str], bool]:
    """(publish allow, subscribe allow, allow_responses) of one user block of auth.conf."""
    block = re.search(rf"user:\s*{re.escape(user)}\s*\n(.*?)\n    }}", auth_conf, re.S)
    assert block is not None, f"auth.conf has no user {user}"
    publish = re.search(r"publish:\s*\{\s*allow:\s*\[(.*?)\]", block.group(1), re.S)
    subscribe = re.search(r"subscribe:\s*\{\s*allow:\s*\[(.*?)\]", block.group(1), re.S)
    assert publish is not None, f"{user}: no publish allow list"
    assert subscribe is not None, f"{user}: no subscribe allow list"
    deny = re.search(r"deny:", block.group(1))
    assert deny is None, f"{user}: service users are allow-listed only"
    return (
        set(re.findall(r'"([^"]+)"', publish.group(1))),
        set(re.findall(r'"([^"]+)"', subscribe.group(1))),
        re.search(r"allow_responses:\s*true", block.group(1)) is not None,
    )


def test_service_users_have_exactly_the_permissions_agentbus_up_gives_them() -> None:
    """base/nats/auth.conf writes out agentbus.cli.permissions for every service, with the consumers of every
    model served anywhere; the same rights `agentbus up` enforces locally."""
    auth = configmap_data(render_overlay("prod"), "nats-config")["auth.conf"]
    models = _served_models_anywhere()
    for access in SERVICE_ACCESS:
        expected = service_permissions(access.service, models)
        publish, subscribe, allow_responses = _user_permissions(auth, service_user(access.service))
        assert (publish, subscribe, allow_responses) == (
            set(expected.publish),
            set(expected.subscribe),
            expected.allow_responses,
        ), (
            f"auth.conf user {service_user(access.service)} differs from service_permissions: expected\n"
            f"publish {json.dumps(expected.publish, indent=2)}\nsubscribe {json.dumps(expected.subscribe)}\n"
            f"allow_responses {expected.allow_responses}"
        )


def test_applications_get_no_jetstream_api_and_only_the_bootstrap_and_operators_may_snapshot() -> None:
    """The shared application user publishes on the public subjects alone: a JetStream consumer's deliver
    subject is not checked against its creator's permissions, and a snapshot or direct get reads every
    tenant's stored messages. Only the bootstrap (streams apply, backup, restore) and operators may."""
    auth = configmap_data(render_overlay("prod"), "nats-config")["auth.conf"]
    publish, _subscribe, _responses = _user_permissions(auth, "client")
    assert not [subject for subject in publish if subject.startswith("$JS.")], sorted(publish)
    bootstrap, _subscribe, _responses = _user_permissions(auth, "bootstrap")
    assert bootstrap == {"$JS.API.>", "$JS.SNAPSHOT.>"}
    for access in SERVICE_ACCESS:
        service_publish, _subscribe, _responses = _user_permissions(auth, service_user(access.service))
        assert not [s for s in service_publish if s.startswith(("$JS.SNAPSHOT", "$JS.API.STREAM.SNAPSHOT"))]


def _answering_services() -> set[str]:
    return {access.service.value for access in SERVICE_ACCESS if access.answers}


def test_every_request_reply_subject_has_a_deployed_server() -> None:
    """Core-NATS requests (subjects with a reply type) have a service answering them; notices sent to people
    (an approver's verdicts) have none to have."""
    answered = {spec.pattern for access in SERVICE_ACCESS for spec in (*access.answers, *access.listens)}
    requests = {spec.pattern for spec in registry.SUBJECTS if spec.stream is None and spec.reply is not None}
    assert requests <= answered, f"core-NATS requests no service answers: {sorted(requests - answered)}"
    deployed = {service_name(d) for d in service_deployments(render_overlay("prod"))}
    assert _answering_services() <= deployed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_that_answer_requests_never_scale_to_zero(overlay: str) -> None:
    """A request over core NATS leaves no backlog to wake a service: with no replica it finds no responder
    and fails at once. Such services keep a floor, also where components/scale-to-zero applies."""
    manifests = render_overlay(overlay)
    scaled = _scaled_by_deployment(manifests)
    for deployment in service_deployments(manifests):
        service = service_name(deployment)
        access = next(a for a in SERVICE_ACCESS if a.service == service)
        if not {s.pattern for s in access.answers} - BEST_EFFORT_REQUESTS:
            continue
        scaler = scaled.get(name_of(deployment))
        if scaler is None:
            assert deployment["spec"]["replicas"] >= 1
            continue
        assert scaler["spec"]["minReplicaCount"] >= 1, f"{overlay}: {name_of(deployment)} may scale to zero"
        assert scaler["metadata"]["labels"].get(REQUEST_SERVER_LABEL) == "true", name_of(scaler)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_database_egress_goes_to_the_services_that_keep_a_database(overlay: str) -> None:
    """Pods labelled as PostgreSQL or Milvus clients (the network policies open those paths for them) are
    exactly the services whose settings name such a database."""
    manifests = render_overlay(overlay)
    for deployment in service_deployments(manifests):
        fields = set(settings_of(service_name(deployment)).model_fields)
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        assert (labels.get("agentbus.dev/postgres-client") == "true") == ("database_url" in fields), name_of(deployment)
        assert (labels.get("agentbus.dev/milvus-client") == "true") == ("milvus_uri" in fields), name_of(deployment)
        assert pod_spec(deployment)["automountServiceAccountToken"] is False
