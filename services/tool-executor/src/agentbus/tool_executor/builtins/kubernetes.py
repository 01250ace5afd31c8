"""The deploy assistant's tools: render Kubernetes manifests from a container description, and apply them.

`render_manifest` is pure: the same description always gives the same YAML.

`kubectl_apply` works in one of four modes, set by `python.options.mode` in its tool file:

- `offline` (the default): no cluster is needed or touched. The manifests are checked structurally here,
  then decoded by `kubectl label --local -f - -o name`, which parses every object with kubectl's own types
  without contacting a server (`kubectl apply --dry-run=client` cannot: it still asks the API server for
  its resource mappings). The result says plainly that nothing was applied.
- `client` / `server`: `kubectl apply --dry-run=client|server -f -` against the configured cluster.
- `apply`: `kubectl apply -f -`, for real.

kubectl runs in the sandbox: its own process group, killed on timeout, and an environment with nothing but
PATH and, when `kubeconfig` is set, KUBECONFIG. `kubectl apply` is declarative, so running it again after an
interruption converges to the same state: the tool file declares it `idempotent: true`.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import yaml
from agentbus.tool_executor.adapters.runners import PythonToolContext, ToolFailedError
from agentbus.tool_executor.adapters.sandbox import SandboxLimits, run_sandboxed
from agentbus.tool_executor.ports import ToolOutput

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
MODES = ("offline", "client", "server", "apply")


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "agentbus"}


def render_documents(arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests of one container: a ConfigMap for its environment, a Deployment, a Service for its ports."""
    name: str = arguments["name"]
    namespace: str = arguments.get("namespace", "default")
    ports: list[int] = list(arguments.get("ports", []))
    env: dict[str, str] = dict(arguments.get("env", {}))
    cpu: str = arguments.get("cpu", "250m")
    memory: str = arguments.get("memory", "256Mi")
    labels = _labels(name)
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    container: dict[str, Any] = {
        "name": name,
        "image": arguments["image"],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if arguments.get("command"):
        container["command"] = list(arguments["command"])
    if ports:
        container["ports"] = [{"containerPort": port, "name": f"port-{port}"} for port in ports]
        probe = {"tcpSocket": {"port": ports[0]}, "periodSeconds": 10}
        container["readinessProbe"] = {**probe, "initialDelaySeconds": 5}
        container["livenessProbe"] = {**probe, "initialDelaySeconds": 15}
    documents: list[dict[str, Any]] = []
    if env:
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**metadata, "name": f"{name}-env"}, "data": env}
        )
        container["envFrom"] = [{"configMapRef": {"name": f"{name}-env"}}]
    documents.append(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": arguments.get("replicas", 1),
                "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [container],
                    },
                },
            },
        }
    )
    if ports:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata,
                "spec": {
                    "selector": {"app.kubernetes.io/name": name},
                    "ports": [{"name": f"port-{p}", "port": p, "targetPort": p} for p in ports],
                },
            }
        )
    return documents


class _ManifestDumper(yaml.SafeDumper):
    """Writes every object out in full: the documents share their labels and metadata, and a manifest a
    person reads and approves has no anchors (`&id001`) or aliases (`*id001`)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def manifest_yaml(documents: list[dict[str, Any]]) -> str:
    """Multi-document YAML as a person would write it: keys in the order given, block style, no aliases."""
    return yaml.dump_all(documents, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False)


async def render_manifest(arguments: dict[str, Any], context: PythonToolContext) -> ToolOutput:
    documents = render_documents(arguments)
    text = manifest_yaml(documents)
    kinds = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in documents)
    return ToolOutput(True, f"# {kinds}\n{text}")


def _check_object(index: int, document: Any) -> list[str]:
    where = f"document {index + 1}"
    if not isinstance(document, dict):
        return [f"{where}: not a mapping"]
    errors = []
    for key in ("apiVersion", "kind"):
        if not isinstance(document.get(key), str) or not document[key]:
            errors.append(f"{where}: '{key}' must be a non-empty string")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        errors.append(f"{where}: 'metadata.name' must be a DNS-1123 name (lower case, digits, '-', '.')")
    kind = document.get("kind")
    spec = document.get("spec")
    if kind == "Deployment":
        errors += _check_deployment(where, spec)
    elif kind == "Service":
        ports = spec.get("ports") if isinstance(spec, dict) else None
        if not isinstance(ports, list) or not all(
            isinstance(p, dict) and isinstance(p.get("port"), int) for p in ports
        ):
            errors.append(f"{where}: Service 'spec.ports' must be a list of {{port: <int>}}")
    elif kind == "ConfigMap":
        data = document.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            errors.append(f"{where}: ConfigMap 'data' values must be strings (quote numbers and booleans)")
    return errors


def _check_deployment(where: str, spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: Deployment needs a 'spec' mapping"]
    errors = []
    if "replicas" in spec and not (isinstance(spec["replicas"], int) and spec["replicas"] >= 0):
        errors.append(f"{where}: 'spec.replicas' must be a non-negative integer")
    selector = (spec.get("selector") or {}).get("matchLabels")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not isinstance(selector, dict) or not selector:
        errors.append(f"{where}: 'spec.selector.matchLabels' is required")
    elif any(labels.get(k) != v for k, v in selector.items()):
        errors.append(f"{where}: 'spec.template.metadata.labels' must include every selector label")
    containers = (template.get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(f"{where}: 'spec.template.spec.containers' must list at least one container")
    else:
        for number, container in enumerate(containers):
            if not isinstance(container, dict) or not container.get("name") or not container.get("image"):
                errors.append(f"{where}: container {number} needs a 'name' and an 'image'")
    return errors


def check_manifests(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse multi-document YAML and check each object's structure; returns the objects and the errors."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [], [f"not valid YAML: {exc}"]
    if not documents:
        return [], ["no Kubernetes objects in the manifest"]
    errors = [error for index, document in enumerate(documents) for error in _check_object(index, document)]
    return documents, errors


async def kubectl_apply(arguments: dict[str, Any], context: PythonToolContext) -> ToolOutput:
    options = context.options
    mode = options.get("mode", "offline")
    if mode not in MODES:
        raise ToolFailedError("misconfigured", f"kubectl_apply mode must be one of {MODES}, not {mode!r}")
    documents, errors = check_manifests(arguments["manifest"])
    if errors:
        raise ToolFailedError("invalid_manifest", "; ".join(errors))
    kubectl = shutil.which(str(options.get("kubectl", "kubectl")))
    env = {"KUBECONFIG": str(options["kubeconfig"])} if options.get("kubeconfig") else {}
    limits = SandboxLimits(timeout_seconds=context.timeout_seconds, max_memory_mb=1024)
    if mode == "offline":
        names = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in documents]
        checked_by = "checked structurally (kubectl not found)"
        if kubectl is not None:
            argv = [kubectl, "label", "--local", "-f", "-", "agentbus.io/validated=offline", "-o", "name"]
            result = await run_sandboxed(argv, limits, env=env, stdin=arguments["manifest"].encode())
            if result.timed_out or result.exit_code != 0:
                detail = result.stderr.strip() or "kubectl timed out"
                raise ToolFailedError("invalid_manifest", f"kubectl could not decode the manifest: {detail}")
            names = result.stdout.split()
            checked_by = "checked structurally and decoded by kubectl"
        return ToolOutput(
            True,
            f"Validated offline, NOT applied: no cluster is configured (mode: offline). Objects {checked_by}: "
            f"{', '.join(names)}.",
        )
    if kubectl is None:
        raise ToolFailedError("misconfigured", f"kubectl not found: {options.get('kubectl', 'kubectl')!r}")
    argv = [kubectl, "apply", "-f", "-"]
    if mode in ("client", "server"):
        argv.insert(2, f"--dry-run={mode}")
    result = await run_sandboxed(argv, limits, env=env, stdin=arguments["manifest"].encode())
    if result.timed_out:
        raise ToolFailedError("timeout", f"kubectl ran longer than {context.timeout_seconds:g} s and was killed")
    if result.exit_code != 0:
        raise ToolFailedError("kubectl_failed", result.stderr.strip() or f"kubectl exited with {result.exit_code}")
    label = "dry run (client)" if mode == "client" else "dry run (server)" if mode == "server" else "applied"
    return ToolOutput(True, f"kubectl apply, {label}:\n{result.stdout.strip()}")
