"""What every workload must be to run in production: locked down, probed, drained on shutdown, pinned,
given only Secrets that exist or are documented, spread and protected from disruption, and reachable
only along the paths the network policies open."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agentbus.contracts import registry
from agentbus.contracts.registry import Service
from deploy.manifests import (
    AGENTS_DIR,
    BASE_DIR,
    COMPONENT_LABEL,
    DEPLOY_README,
    GPU_RESOURCE,
    NAME_LABEL,
    NATS_SECRET,
    OVERLAYS,
    REPO_ROOT,
    SPECS_DIR,
    Manifest,
    configmap_data,
    container_env,
    containers,
    iter_secret_refs,
    labels_of,
    main_container,
    name_of,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    render_overlay,
    selector_matches,
    service_deployments,
    unhashed,
    venv_tool,
    workloads,
)

SHUTDOWN_MARGIN_SECONDS = 5
"""Time a service needs after draining to flush and exit, on top of drain timeout and preStop."""


def _drain_timeout(deployment: Manifest, manifests: list[Manifest]) -> float:
    env = container_env(main_container(deployment), manifests)
    values = [v for k, v in env.items() if k.endswith("_DRAIN_TIMEOUT_SECONDS")]
    assert len(values) == 1, f"{name_of(deployment)}: set the drain timeout explicitly, once"
    return float(values[0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agentbus_pods_run_locked_down(overlay: str) -> None:
    """Services and the bootstrap: non-root, read-only root, no capabilities, RuntimeDefault seccomp,
    no service-account token, and a writable /tmp."""
    manifests = render_overlay(overlay)
    ours = [w for w in workloads(manifests) if pod_labels(w).get(COMPONENT_LABEL) in {"service", "bootstrap"}]
    assert ours
    for workload in ours:
        spec = pod_spec(workload)
        where = f"{workload['kind']}/{name_of(workload)}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(workload):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["runAsNonRoot"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: /tmp must be a writable emptyDir"
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"]["memory"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_drops_privileges(overlay: str) -> None:
    for workload in workloads(render_overlay(overlay)):
        for container in containers(workload):
            context = container.get("securityContext", {})
            where = f"{name_of(workload)}/{container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert "memory" in container.get("resources", {}).get("limits", {}), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_are_probed_on_healthz_and_readyz(overlay: str) -> None:
    for deployment in service_deployments(render_overlay(overlay)):
        container = main_container(deployment)
        port = container["ports"][0]
        assert port["containerPort"] == 8080
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"]["path"] == path, f"{name_of(deployment)} {probe}"
            assert container[probe]["httpGet"]["port"] in {port["name"], port["containerPort"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_leaves_time_to_drain(overlay: str) -> None:
    """terminationGracePeriodSeconds covers preStop, the drain timeout and a margin: a shorter grace
    period SIGKILLs handlers mid-message and every in-flight message is redelivered."""
    manifests = render_overlay(overlay)
    for deployment in service_deployments(manifests):
        container = main_container(deployment)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        needed = pre_stop + _drain_timeout(deployment, manifests) + SHUTDOWN_MARGIN_SECONDS
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace >= needed, f"{name_of(deployment)}: grace {grace}s < {needed}s"


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_images_are_pinned_release_tags(overlay: str) -> None:
    for workload in workloads(render_overlay(overlay)):
        for container in containers(workload):
            image: str = container["image"]
            name, _, tag = image.rpartition(":")
            assert name, f"{image}: no tag"
            assert "/" not in tag, f"{image}: no tag"
            assert tag not in {"latest", "dev"}, f"{image}: not a release tag"


def test_dev_uses_dev_images_of_every_agentbus_component() -> None:
    images = {c["image"] for w in workloads(render_overlay("dev")) for c in containers(w)}
    assert {f"agentbus/{s.value}:dev" for s in Service} | {"agentbus/cli:dev"} <= images


def _secret_refs(manifests: list[Manifest]) -> dict[str, set[str]]:
    """Secret name (before kustomize's hash) -> keys used (empty when only the whole Secret is used)."""
    rendered = {name_of(s).rsplit("-", 1)[0] for s in of_kind(manifests, "Secret")}
    refs: dict[str, set[str]] = {}
    for workload in workloads(manifests):
        for name, key in iter_secret_refs(workload):
            keys = refs.setdefault(unhashed(name, rendered), set())
            if key is not None:
                keys.add(key)
    return refs


def test_dev_generates_every_secret_it_uses() -> None:
    manifests = render_overlay("dev")
    secrets = {name_of(s): s for s in of_kind(manifests, "Secret")}
    for workload in workloads(manifests):
        for name, key in iter_secret_refs(workload):
            assert name in secrets, f"{name_of(workload)} uses Secret {name}, which dev does not generate"
            if key is not None:
                assert key in secrets[name]["data"], f"{name_of(workload)} uses {name}.{key}"


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_secrets_outside_git_are_documented(overlay: str) -> None:
    """Staging and production generate no Secret; deploy/README.md names each one and its keys."""
    manifests = render_overlay(overlay)
    assert of_kind(manifests, "Secret") == []
    readme = DEPLOY_README.read_text(encoding="utf-8")
    nats_keys = set(re.findall(r"\$([A-Z][A-Z0-9_]*_PASSWORD)", configmap_data(manifests, "nats-config")["auth.conf"]))
    for name, keys in _secret_refs(manifests).items():
        assert f"`{name}`" in readme, f"deploy/README.md must say how to create Secret {name}"
        if name == NATS_SECRET:
            keys = keys | nats_keys
        for key in keys:
            assert f"`{key}`" in readme, f"deploy/README.md must name key {key} of Secret {name}"


# ConfigMap generator -> (the files of the repository it copies, the kustomization that generates it).
CONFIG_COPIES: dict[str, tuple[list[Path], Path]] = {
    "agent-specs": (sorted(AGENTS_DIR.glob("*.y*ml")), BASE_DIR / "agent-runner"),
    "memory-stores": (sorted((REPO_ROOT / "memory").glob("*.y*ml")), BASE_DIR / "agent-runner"),
    "tool-specs": (sorted((REPO_ROOT / "tools").glob("*.y*ml")), SPECS_DIR),
    "model-routing": ([REPO_ROOT / "config" / "models.yaml"], SPECS_DIR),
    "guardrails": ([REPO_ROOT / "config" / "guardrails.yaml"], SPECS_DIR),
    "cost-config": (
        [REPO_ROOT / "config" / name for name in ("prices.yaml", "budgets.yaml", "limits.yaml")],
        SPECS_DIR,
    ),
    "approvers": ([REPO_ROOT / "config" / "approvers.yaml"], SPECS_DIR),
    "workflow-specs": (sorted((REPO_ROOT / "workflows").glob("*.y*ml")), BASE_DIR / "workflow-orchestrator"),
}

# (Deployment, setting naming a folder or file it reads) -> the ConfigMap mounted there.
CONFIG_MOUNTS: dict[tuple[str, str], str] = {
    ("agent-runner", "AGENTBUS_RUNNER_AGENTS_DIR"): "agent-specs",
    ("agent-runner", "AGENTBUS_RUNNER_TOOLS_DIR"): "tool-specs",
    ("agent-runner", "AGENTBUS_RUNNER_ROUTING_FILE"): "model-routing",
    ("agent-runner", "AGENTBUS_RUNNER_GUARDRAILS_FILE"): "guardrails",
    ("agent-runner", "AGENTBUS_RUNNER_MEMORY_DIR"): "memory-stores",
    ("tool-executor", "AGENTBUS_EXECUTOR_TOOLS_DIR"): "tool-specs",
    ("tool-executor", "AGENTBUS_EXECUTOR_APPROVERS_FILE"): "approvers",
    ("cost-accountant", "AGENTBUS_ACCOUNTANT_PRICES_FILE"): "cost-config",
    ("cost-accountant", "AGENTBUS_ACCOUNTANT_BUDGETS_FILE"): "cost-config",
    ("cost-accountant", "AGENTBUS_ACCOUNTANT_LIMITS_FILE"): "cost-config",
    ("workflow-orchestrator", "AGENTBUS_ORCHESTRATOR_WORKFLOWS_DIR"): "workflow-specs",
    ("workflow-orchestrator", "AGENTBUS_ORCHESTRATOR_AGENTS_DIR"): "agent-specs",
}

# (Deployment, setting naming a file it writes): the root filesystem is read-only, so it must be on a volume.
WRITTEN_FILES: tuple[tuple[str, str], ...] = (("trace-exporter", "AGENTBUS_TRACES_JSONL_PATH"),)


@pytest.mark.parametrize("generator", sorted(CONFIG_COPIES))
def test_config_maps_match_the_repository_files(generator: str) -> None:
    """Kustomize cannot read above its folder, so the kustomizations hold copies of agents/, tools/ and
    config/ files; they must not drift from the repository's."""
    files, kustomization = CONFIG_COPIES[generator]
    data = configmap_data(render_overlay("dev"), generator)
    repo = {p.name: p.read_text(encoding="utf-8") for p in files if p.exists()}
    assert data == repo, (
        f"ConfigMap {generator} differs from {sorted(str(p.relative_to(REPO_ROOT)) for p in files)}: copy the "
        f"files under {kustomization.relative_to(REPO_ROOT)} and list each under configMapGenerator `{generator}`"
    )


def _mounted_volume(workload: Manifest, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (mount, volume) a path lies on: the mount whose mountPath is the path or its closest parent."""
    container = main_container(workload)
    mounts = [
        m
        for m in container["volumeMounts"]
        if Path(path) == Path(m["mountPath"]) or Path(m["mountPath"]) in Path(path).parents
    ]
    assert mounts, f"{name_of(workload)}: {path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    return mount, volume


@pytest.mark.parametrize(("deployment", "setting"), sorted(CONFIG_MOUNTS))
def test_services_read_their_configuration_from_the_mounted_config_maps(deployment: str, setting: str) -> None:
    manifests = render_overlay("dev")
    workload = named(manifests, "Deployment", deployment)
    path = container_env(main_container(workload), manifests)[setting]
    mount, volume = _mounted_volume(workload, path)
    generator = CONFIG_MOUNTS[(deployment, setting)]
    assert volume["configMap"]["name"].rsplit("-", 1)[0] == generator, f"{setting} is not on ConfigMap {generator}"
    assert mount.get("readOnly") is True
    if setting.endswith("_FILE"):
        assert Path(path).name in configmap_data(manifests, generator), f"{setting}: {path} is not in {generator}"


@pytest.mark.parametrize(("deployment", "setting"), WRITTEN_FILES)
def test_files_services_write_are_on_writable_volumes(deployment: str, setting: str) -> None:
    manifests = render_overlay("dev")
    workload = named(manifests, "Deployment", deployment)
    path = container_env(main_container(workload), manifests)[setting]
    mount, volume = _mounted_volume(workload, path)
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume, f"{setting}: {path} is not writable"
    assert not mount.get("readOnly", False)


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_replicated_workloads_have_disruption_budgets_and_spread(overlay: str) -> None:
    manifests = render_overlay(overlay)
    budgets = of_kind(manifests, "PodDisruptionBudget")
    for workload in [*service_deployments(manifests), named(manifests, "StatefulSet", "nats")]:
        labels = pod_labels(workload)
        matching = [b for b in budgets if selector_matches(b["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{name_of(workload)}: {len(matching)} PodDisruptionBudgets select it"
        assert matching[0]["spec"].get("maxUnavailable") == 1
    for deployment in service_deployments(manifests):
        spec = pod_spec(deployment)
        assert spec["affinity"]["podAntiAffinity"], name_of(deployment)
        assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {"topology.kubernetes.io/zone"}


def test_production_has_replica_floors() -> None:
    manifests = render_overlay("prod")
    scaled = {name_of(s): s["spec"] for s in of_kind(manifests, "ScaledObject")}
    assert scaled["agent-runner"]["minReplicaCount"] >= 2
    for name, spec in scaled.items():
        assert spec["minReplicaCount"] >= 1, f"{name} may scale to zero in production"
    for deployment in service_deployments(manifests):
        if name_of(deployment) not in scaled:
            assert deployment["spec"]["replicas"] >= 1, name_of(deployment)


def _allows(rules: list[dict[str, Any]], peer_key: str, peer_labels: dict[str, str], port: int) -> bool:
    for rule in rules:
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") == port for p in ports):
            continue
        for peer in rule.get(peer_key, []):
            if "namespaceSelector" in peer and peer["namespaceSelector"] != {}:
                continue
            if "podSelector" in peer and selector_matches(peer["podSelector"], peer_labels):
                return True
    return False


def _reaches_dns(rule: dict[str, Any]) -> bool:
    return any(p.get("port") == 53 for p in rule.get("ports", [])) and any(
        selector_matches(peer.get("podSelector", {}), {"k8s-app": "kube-dns"}) for peer in rule.get("to", [])
    )


def _policies_for(policies: list[Manifest], labels: dict[str, str], kind: str) -> list[Manifest]:
    return [
        p for p in policies if kind in p["spec"]["policyTypes"] and selector_matches(p["spec"]["podSelector"], labels)
    ]


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_network_policies_deny_by_default_and_open_the_nats_paths(overlay: str) -> None:
    manifests = render_overlay(overlay)
    policies = of_kind(manifests, "NetworkPolicy")
    nats = pod_labels(named(manifests, "StatefulSet", "nats"))
    for workload in workloads(manifests):
        labels = pod_labels(workload)
        egress = _policies_for(policies, labels, "Egress")
        ingress = _policies_for(policies, labels, "Ingress")
        assert any(p["spec"].get("egress") is None for p in egress), f"{name_of(workload)}: no default deny"
        assert any(p["spec"].get("ingress") is None for p in ingress), f"{name_of(workload)}: no default deny"
        assert any(_reaches_dns(rule) for p in egress for rule in p["spec"].get("egress", [])), (
            f"{name_of(workload)}: no DNS"
        )
        if labels.get(COMPONENT_LABEL) not in {"service", "bootstrap"}:
            continue
        assert any(_allows(p["spec"].get("egress", []), "to", nats, 4222) for p in egress), name_of(workload)
        nats_ingress = _policies_for(policies, nats, "Ingress")
        assert any(_allows(p["spec"].get("ingress", []), "from", labels, 4222) for p in nats_ingress), (
            f"NATS does not admit {name_of(workload)}"
        )
    routes = _policies_for(policies, nats, "Ingress")
    assert any(_allows(p["spec"].get("ingress", []), "from", nats, 6222) for p in routes), "NATS routes"
    keda = [
        rule
        for p in _policies_for(policies, nats, "Ingress")
        for rule in p["spec"].get("ingress", [])
        if any(
            peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "keda"
            for peer in rule.get("from", [])
        )
    ]
    assert any(any(port["port"] == 8222 for port in rule["ports"]) for rule in keda), "KEDA cannot read /jsz"


def test_no_scripted_worker_holds_a_gpu() -> None:
    """A GPU goes only to a worker whose engine uses one; the scripted engine never does. (GPU models come
    from models/<model> folders, checked in test_deploy_gpu.)"""
    for overlay in OVERLAYS:
        manifests = render_overlay(overlay)
        for deployment in service_deployments(manifests):
            resources = main_container(deployment)["resources"]
            gpu = GPU_RESOURCE in resources.get("limits", {}) or GPU_RESOURCE in resources.get("requests", {})
            engine = container_env(main_container(deployment), manifests).get("AGENTBUS_WORKER_ENGINE")
            assert not (gpu and engine in {None, "scripted"}), f"{overlay} {name_of(deployment)}: GPU, engine {engine}"


def _nats_config(manifests: list[Manifest]) -> dict[str, str]:
    return configmap_data(manifests, "nats-config")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_fsyncs_every_write_and_fits_the_largest_message(overlay: str) -> None:
    conf = _nats_config(render_overlay(overlay))["nats.conf"]
    jetstream = re.search(r"jetstream\s*\{(.*?)\}", conf, re.S)
    assert jetstream is not None
    assert re.search(r"^\s*sync_interval:\s*always\s*$", jetstream.group(1), re.M)
    max_payload = re.search(r"^max_payload:\s*(\d+)\s*$", conf, re.M)
    assert max_payload is not None
    assert int(max_payload.group(1)) >= max(s.max_msg_size for s in registry.STREAMS)
    assert re.search(r"^http_port:\s*8222\s*$", conf, re.M), "KEDA and the exporter read monitoring on 8222"


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_nats_is_a_three_server_cluster_with_routes_to_each(overlay: str) -> None:
    manifests = render_overlay(overlay)
    statefulset = named(manifests, "StatefulSet", "nats")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    headless = statefulset["spec"]["serviceName"]
    assert named(manifests, "Service", headless)["spec"]["clusterIP"] == "None"
    routes = re.findall(r"nats://([\w.-]+):6222", _nats_config(manifests)["cluster.conf"])
    assert routes == [f"nats-{i}.{headless}" for i in range(3)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_accepts_its_rendered_configuration(overlay: str, tmp_path: Path) -> None:
    """`nats-server -t` parses the rendered config with the variables the pod's environment provides:
    POD_NAME, and every key of the credentials Secret (a missing one stops the server)."""
    manifests = render_overlay(overlay)
    for name, content in _nats_config(manifests).items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    secret_keys = set(re.findall(r"\$([A-Z][A-Z0-9_]*_PASSWORD)", (tmp_path / "auth.conf").read_text()))
    if overlay == "dev":
        secret = next(s for s in of_kind(manifests, "Secret") if name_of(s).startswith(f"{NATS_SECRET}-"))
        env = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert secret_keys <= set(env), "the dev Secret lacks keys the NATS config reads"
    else:
        env = dict.fromkeys(secret_keys, "placeholder")
    result = subprocess.run(
        [venv_tool("nats-server"), "-t", "-c", str(tmp_path / "nats.conf")],
        env={"POD_NAME": "nats-0", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_identify_every_object(overlay: str) -> None:
    for manifest in render_overlay(overlay):
        labels = labels_of(manifest)
        assert labels.get("app.kubernetes.io/part-of") == "agentbus", f"{manifest['kind']}/{name_of(manifest)}"
        if manifest["kind"] in {"Deployment", "StatefulSet", "Job"}:
            assert NAME_LABEL in pod_labels(manifest)
            assert COMPONENT_LABEL in pod_labels(manifest)
