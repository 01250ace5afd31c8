"""Rendering and reading the Kustomize tree: the shared helpers of the deploy checks.

Everything here is read-only: kustomize renders offline (`kubectl kustomize`), nothing talks to a cluster.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from agentbus.contracts.registry import Service
from agentbus.runtime.settings import ServiceSettings
from agentbus.testing import skip_outside_ci

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS_DIR = KUSTOMIZE / "overlays"
BASE_DIR = KUSTOMIZE / "base"
COMPONENTS_DIR = KUSTOMIZE / "components"
GPU_COMPONENT_DIR = COMPONENTS_DIR / "gpu"
KARPENTER_DIR = GPU_COMPONENT_DIR / "karpenter"
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject.json"
DEPLOY_README = DEPLOY / "README.md"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKER_DIR = REPO_ROOT / "docker"
AGENTS_DIR = REPO_ROOT / "agents"
MODELS_DIR = KUSTOMIZE / "models"
SPECS_DIR = BASE_DIR / "specs"

OVERLAYS: tuple[str, ...] = ("dev", "staging", "prod")
"""Every overlay, in promotion order. A test checks this list matches the folders."""

COMPONENTS_RENDERED_APART: frozenset[str] = frozenset({"gpu", "llm-external"})
"""Components no overlay includes, each rendered and checked by tests of its own (gpu: test_deploy_gpu.py,
through base and through the per-model folders of models/; llm-external: test_deploy_models.py, in prod's
place of llm-gpu)."""

LLM_COMPONENTS: tuple[str, ...] = ("llm-gpu", "llm-external")
"""The components that give the agents a language model: GPU workers (staging and prod), or an external
OpenAI-compatible endpoint for clusters without GPUs."""

KUBERNETES_VERSION = "1.33"
"""The API version manifests are validated against (strict: unknown fields are errors)."""

GPU_RESOURCE = "nvidia.com/gpu"

CUSTOM_KINDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("karpenter.sh/v1", "NodePool"),
        ("karpenter.k8s.aws/v1", "EC2NodeClass"),
    }
)
"""Kinds from CRDs the deployment may use. Anything else not built into Kubernetes is a mistake."""

Manifest = dict[str, Any]

SERVICE_COMPONENT = "service"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_LABEL = "agentbus.dev/model"
NATS_SECRET = "agentbus-nats-credentials"
NATS_SERVICE = "nats"

NOT_AUTOSCALED_ANNOTATION = "agentbus.dev/consumers-without-trigger"
"""On a ScaledObject, or on a Deployment that no ScaledObject scales: a JSON object {durable: reason} for the
consumers of its service that no trigger watches. Scale-to-zero makes this dangerous: a consumer nobody
watches never wakes its service."""


def _settings_class(service: Service) -> type[ServiceSettings] | None:
    """The one ServiceSettings subclass defined in `agentbus.<service>.settings`, or None without that module."""
    module_name = f"agentbus.{service.value.replace('-', '_')}.settings"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise
    found = [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, ServiceSettings) and obj is not ServiceSettings and obj.__module__ == module_name
    ]
    return found[0] if len(found) == 1 else None


SETTINGS: dict[str, type[ServiceSettings]] = {
    service.value: found for service in Service if (found := _settings_class(service)) is not None
}
"""Each service's settings class (found in `agentbus.<service>.settings`), whose env prefix and fields the
manifests must use."""


def settings_of(service: str) -> type[ServiceSettings]:
    """A service's settings class, or a test failure that says which module is missing."""
    found = SETTINGS.get(service)
    if found is None:
        module = f"agentbus.{service.replace('-', '_')}.settings"
        pytest.fail(f"{service}: no settings class in {module} (one ServiceSettings subclass)", pytrace=False)
    return found


def env_prefix(service: str) -> str:
    """The environment prefix of a service's settings (AGENTBUS_RUNNER_, ...)."""
    prefix: str = settings_of(service).model_config["env_prefix"]
    return prefix


def kubectl() -> str:
    """The kubectl binary, or a skip; in CI (CI=true) a missing kubectl fails instead of skipping."""
    path = shutil.which("kubectl")
    if path is None:
        skip_outside_ci("kubectl (>= 1.27, kustomize v5) not found on PATH: the Kustomize overlays cannot be rendered")
    return path


@functools.cache
def _render(directory: Path) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}", pytrace=False)
    if "deprecated" in result.stderr.lower():
        pytest.fail(f"kubectl kustomize {directory} uses deprecated fields:\n{result.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> list[Manifest]:
    """Every object `kubectl kustomize directory` renders (cached per directory for the session)."""
    return list(_render(directory.resolve()))


def overlay_dir(overlay: str) -> Path:
    """An overlay's folder, from its name (dev, staging, prod) or a path."""
    named = OVERLAYS_DIR / overlay
    return named if named.is_dir() else Path(overlay)


def render_overlay(overlay: str) -> list[Manifest]:
    return render(overlay_dir(overlay))


def model_folders() -> list[Path]:
    """The per-model worker kustomizations under deploy/kustomize/models/."""
    return sorted(p for p in MODELS_DIR.iterdir() if (p / "kustomization.yaml").exists())


def model_engine(folder: Path) -> str | None:
    """The engine a models/ folder sets in its inference-worker-config (read from the file, not rendered)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    for generator in kustomization.get("configMapGenerator", []):
        for literal in generator.get("literals", []):
            name, _, value = str(literal).partition("=")
            if name == "AGENTBUS_WORKER_ENGINE":
                return value
    return None


def gpu_model_folders() -> list[Path]:
    """The models/ folders whose workers run vLLM in-process on a GPU."""
    return [folder for folder in model_folders() if model_engine(folder) == "vllm"]


def endpoint_model_folders() -> list[Path]:
    """The models/ folders whose workers forward to an OpenAI-compatible server (no GPU of their own)."""
    return [folder for folder in model_folders() if model_engine(folder) == "openai"]


def scaled_by_deployment(manifests: Iterable[Manifest]) -> dict[str, Manifest]:
    """ScaledObjects by the name of the Deployment they scale."""
    return {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(manifests, "ScaledObject")}


def nats_triggers(scaled_object: Manifest) -> list[dict[str, Any]]:
    """The nats-jetstream triggers of a ScaledObject (the others, cpu, read no consumer)."""
    return [t for t in scaled_object["spec"]["triggers"] if t["type"] == "nats-jetstream"]


def untriggered_consumers(annotated: Manifest) -> dict[str, str]:
    """The {durable: reason} annotation of a ScaledObject or an unscaled Deployment."""
    reasons: dict[str, str] = json.loads(
        annotated["metadata"].get("annotations", {}).get(NOT_AUTOSCALED_ANNOTATION, "{}")
    )
    return reasons


def of_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: Iterable[Manifest], kind: str, name: str) -> Manifest:
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    raise KeyError(f"{kind}/{name} is not rendered")


def name_of(manifest: Manifest) -> str:
    name: str = manifest["metadata"]["name"]
    return name


def labels_of(manifest: Manifest) -> dict[str, str]:
    labels: dict[str, str] = manifest["metadata"].get("labels", {})
    return labels


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(manifests: Iterable[Manifest]) -> list[Manifest]:
    """Deployments, StatefulSets and Jobs."""
    return [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet", "Job"}]


def service_deployments(manifests: Iterable[Manifest]) -> list[Manifest]:
    """The Deployments of agentbus services (not infrastructure)."""
    return [m for m in of_kind(manifests, "Deployment") if pod_labels(m).get(COMPONENT_LABEL) == SERVICE_COMPONENT]


def service_name(deployment: Manifest) -> str:
    """The registry service a Deployment runs (its app.kubernetes.io/name label)."""
    return pod_labels(deployment)[NAME_LABEL]


def container_env(container: Mapping[str, Any], manifests: Iterable[Manifest]) -> dict[str, str]:
    """A container's literal environment: its ConfigMaps (envFrom) overlaid by its literal `env` values.

    Values from Secrets or field references are unknown offline and left out.
    """
    configmaps = {name_of(m): m.get("data", {}) for m in of_kind(manifests, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is not None:
            env.update(configmaps[ref["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            env.pop(var["name"], None)
    return env


def main_container(workload: Manifest) -> dict[str, Any]:
    """The container named `service` (agentbus services), else the first."""
    candidates = pod_spec(workload)["containers"]
    for container in candidates:
        if container["name"] == SERVICE_COMPONENT:
            found: dict[str, Any] = container
            return found
    first: dict[str, Any] = candidates[0]
    return first


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions); `{}` matches everything."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def configmap_data(manifests: Iterable[Manifest], prefix: str) -> dict[str, str]:
    """The data of the one ConfigMap whose (hashed) name starts with `prefix`."""
    found = [m for m in of_kind(manifests, "ConfigMap") if name_of(m).rsplit("-", 1)[0] == prefix]
    assert len(found) == 1, f"expected one ConfigMap generated as {prefix!r}, found {[name_of(m) for m in found]}"
    data: dict[str, str] = found[0].get("data", {})
    return data


def iter_secret_refs(workload: Manifest) -> Iterator[tuple[str, str | None]]:
    """(secret name, key or None for a whole Secret) for every Secret the pod template uses."""
    spec = pod_spec(workload)
    for container in containers(workload):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                yield source["secretRef"]["name"], None
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                yield ref["name"], ref["key"]
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            yield volume["secret"]["secretName"], None


def unhashed(name: str, known: Iterable[str]) -> str:
    """The generator name of a kustomize-hashed name (`agentbus-postgres-5f8h...` -> `agentbus-postgres`)."""
    for candidate in known:
        if name == candidate or name.rsplit("-", 1)[0] == candidate:
            return candidate
    return name


def is_builtin(manifest: Manifest) -> bool:
    """Whether the object's kind is built into Kubernetes (core, apps, *.k8s.io, ...), not from a CRD."""
    group = manifest["apiVersion"].rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def validate_builtin(manifest: Manifest) -> None:
    """Validate one built-in object against Kubernetes' OpenAPI schema (offline, strict)."""
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def builtin_schema_failures(manifests: Iterable[Manifest]) -> list[str]:
    """`Kind/name: path: message` for every built-in object that does not match the Kubernetes schema."""
    failures = []
    for manifest in manifests:
        if not is_builtin(manifest):
            continue
        try:
            validate_builtin(manifest)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{manifest['kind']}/{name_of(manifest)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{manifest['kind']}/{name_of(manifest)}: {exc.message}")
    return failures


def venv_tool(name: str) -> str:
    """A console script installed beside the running interpreter (the workspace's .venv)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {path.parent}: run `uv sync`", pytrace=False)
    return str(path)


def load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)
