"""components/gpu, which no overlay includes: the engines that would use a GPU (vLLM, OpenAI-compatible) are
planned, not implemented. It is rendered here on top of base, from a kustomization written to a temporary
folder, and checked as the overlays are: the inference-worker asks for a GPU and lands on the GPU pool of
the Karpenter example, nothing else changes, and every object still matches the Kubernetes schema."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from deploy.manifests import (
    BASE_DIR,
    CUSTOM_KINDS,
    GPU_COMPONENT_DIR,
    GPU_RESOURCE,
    KARPENTER_DIR,
    Manifest,
    builtin_schema_failures,
    container_env,
    is_builtin,
    main_container,
    name_of,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    selector_matches,
    workloads,
)

GPU_NODE_LABEL = "agentbus.dev/accelerator"
WORKER = "inference-worker"


@pytest.fixture(scope="module")
def gpu_kustomization(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base plus components/gpu, as a per-model worker kustomization would include it."""
    root = tmp_path_factory.mktemp("base-with-gpu")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE_DIR, root)],
        "components": [os.path.relpath(GPU_COMPONENT_DIR, root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def rendered(gpu_kustomization: Path) -> list[Manifest]:
    return render(gpu_kustomization)


@pytest.fixture(scope="module")
def worker(rendered: list[Manifest]) -> Manifest:
    return named(rendered, "Deployment", WORKER)


def test_the_worker_requests_one_gpu(worker: Manifest) -> None:
    resources = main_container(worker)["resources"]
    assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] == 1


def test_the_worker_lands_on_the_karpenter_gpu_pool(worker: Manifest) -> None:
    pool = named(render(KARPENTER_DIR), "NodePool", "agentbus-gpu")["spec"]["template"]
    node_labels: dict[str, str] = pool["metadata"]["labels"]
    spec = pod_spec(worker)
    assert spec["nodeSelector"] == {GPU_NODE_LABEL: "nvidia-gpu"}
    assert spec["nodeSelector"].items() <= node_labels.items()
    assert pool["spec"]["taints"]
    for taint in pool["spec"]["taints"]:
        assert any(
            t["key"] == taint["key"]
            and t["effect"] == taint["effect"]
            and (t["operator"] == "Exists" or t.get("value") == taint.get("value"))
            for t in spec["tolerations"]
        ), f"the GPU worker does not tolerate {taint}"


def test_the_worker_keeps_what_base_gives_it(worker: Manifest, rendered: list[Manifest]) -> None:
    """The patch merges into base's pod: its lockdown, writable /tmp, NATS password and config stay, and
    shared memory and the model cache are added beside them."""
    base_worker = named(render(BASE_DIR), "Deployment", WORKER)
    container, base_container = main_container(worker), main_container(base_worker)
    assert container["securityContext"] == base_container["securityContext"]
    assert pod_spec(worker)["securityContext"] == pod_spec(base_worker)["securityContext"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe] == base_container[probe]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    assert {m["mountPath"] for m in base_container["volumeMounts"]} <= set(mounts)
    assert volumes[mounts["/tmp"]]["emptyDir"] is not None
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts[container_env(container, rendered)["HF_HOME"]] in volumes
    env_names = {v["name"] for v in container["env"]}
    assert {v["name"] for v in base_container["env"]} <= env_names
    assert container["envFrom"] == base_container["envFrom"]


def test_only_the_inference_worker_gets_a_gpu(rendered: list[Manifest]) -> None:
    with_gpu = [
        name_of(w)
        for w in workloads(rendered)
        if any(GPU_RESOURCE in c.get("resources", {}).get("limits", {}) for c in pod_spec(w)["containers"])
    ]
    assert with_gpu == [WORKER]


def test_the_weights_egress_policy_selects_only_gpu_workers(rendered: list[Manifest], worker: Manifest) -> None:
    policy = named(rendered, "NetworkPolicy", "gpu-worker-weights-egress")
    selected = [
        name_of(w) for w in workloads(rendered) if selector_matches(policy["spec"]["podSelector"], pod_labels(w))
    ]
    assert selected == [name_of(worker)]


def test_base_with_gpu_matches_the_kubernetes_schema(rendered: list[Manifest]) -> None:
    assert of_kind(rendered, "Deployment")
    assert builtin_schema_failures(rendered) == []
    unknown = [m for m in rendered if not is_builtin(m) and (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS]
    assert unknown == []
