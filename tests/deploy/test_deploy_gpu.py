"""components/gpu, which no overlay includes directly: per-model folders under models/ do (components/llm-gpu
lists them for staging and prod). It is rendered here on top of base, from a kustomization written to a
temporary folder, and checked as the overlays are: the inference-worker asks for a GPU and lands on the GPU
pool of the Karpenter example, nothing else changes, and every object still matches the Kubernetes schema.
Each models/<model> folder is rendered too: a GPU folder runs a GPU engine serving exactly that model, on the
GPU class it is priced at; an endpoint folder forwards to an HTTPS API with a key and holds no GPU; each scales
on its own consumer within its limits and is a model config/models.yaml routes steps to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from agentbus.contracts import registry
from agentbus.inference_worker.settings import WorkerSettings
from deploy.manifests import (
    BASE_DIR,
    CUSTOM_KINDS,
    GPU_COMPONENT_DIR,
    GPU_RESOURCE,
    KARPENTER_DIR,
    MODEL_LABEL,
    MODELS_DIR,
    REPO_ROOT,
    Manifest,
    builtin_schema_failures,
    container_env,
    endpoint_model_folders,
    gpu_model_folders,
    is_builtin,
    main_container,
    model_folders,
    name_of,
    named,
    nats_triggers,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    selector_matches,
    workloads,
)

GPU_NODE_LABEL = "agentbus.dev/accelerator"
NODE_CLASS_LABEL = "agentbus.dev/node-class"
ENDPOINT_SECRET = "agentbus-llm-endpoint"
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


# --- the per-model worker folders of models/ ---------------------------------------------------------------
# GPU folders (vLLM in-process): llama-3-8b-stable and llama-3-8b-canary; endpoint folders (an OpenAI-compatible
# server outside the cluster): hosted-llm.


@pytest.fixture(scope="module", params=[p.name for p in gpu_model_folders()])
def model_folder(request: pytest.FixtureRequest) -> Path:
    folder: Path = MODELS_DIR / request.param
    return folder


@pytest.fixture(scope="module", params=[p.name for p in endpoint_model_folders()])
def endpoint_folder(request: pytest.FixtureRequest) -> Path:
    folder: Path = MODELS_DIR / request.param
    return folder


def test_every_model_folder_is_a_gpu_or_an_endpoint_worker() -> None:
    assert gpu_model_folders(), "models/ holds no GPU worker"
    assert endpoint_model_folders(), "models/ holds no worker for an external endpoint"
    assert set(gpu_model_folders()) | set(endpoint_model_folders()) == set(model_folders())


def _worker_settings(deployment: Manifest, manifests: list[Manifest]) -> WorkerSettings:
    env = container_env(main_container(deployment), manifests)
    with pytest.MonkeyPatch.context() as scope:
        for name in [n for n in os.environ if n.startswith("AGENTBUS_")]:
            scope.delenv(name)
        for name, value in env.items():
            scope.setenv(name, value)
        for var in main_container(deployment)["env"]:
            if "valueFrom" in var and var["name"].startswith("AGENTBUS_"):
                scope.setenv(var["name"], "placeholder")
        return WorkerSettings()


def test_a_model_folder_serves_its_model_on_a_gpu_with_a_gpu_engine(model_folder: Path) -> None:
    model = model_folder.name
    manifests = render(model_folder)
    [deployment] = of_kind(manifests, "Deployment")
    assert name_of(deployment) == f"{WORKER}-{model}"
    assert pod_labels(deployment)[MODEL_LABEL] == model
    container = main_container(deployment)
    assert container["resources"]["limits"][GPU_RESOURCE] == 1
    assert container["image"].endswith("-gpu"), "the vllm engine needs the image with vLLM installed"
    settings = _worker_settings(deployment, manifests)
    assert settings.engine == "vllm"
    assert settings.vllm_model, "the weights to load"
    assert settings.models == [model]
    assert settings.node_class is not None, "GPU-seconds are priced by node class"
    assert settings.node_class in yaml.safe_load((REPO_ROOT / "config" / "prices.yaml").read_text())["node_classes"]
    assert pod_spec(deployment)["nodeSelector"].get(NODE_CLASS_LABEL) == settings.node_class, (
        "a worker must run on the GPU class it is priced at"
    )


def test_a_model_folder_scales_on_its_own_consumer_within_its_limits(model_folder: Path) -> None:
    _scales_on_its_own_consumer(model_folder)
    manifests = render(model_folder)
    [deployment] = of_kind(manifests, "Deployment")
    drain = float(container_env(main_container(deployment), manifests)["AGENTBUS_WORKER_DRAIN_TIMEOUT_SECONDS"])
    pre_stop = main_container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= drain + pre_stop + 5


def _scales_on_its_own_consumer(folder: Path) -> None:
    model = folder.name
    manifests = render(folder)
    [deployment] = of_kind(manifests, "Deployment")
    [scaled] = of_kind(manifests, "ScaledObject")
    consumer = registry.inference_consumer(model)
    assert scaled["spec"]["scaleTargetRef"]["name"] == name_of(deployment)
    [trigger] = nats_triggers(scaled)
    assert trigger["metadata"]["consumer"] == consumer.durable
    assert trigger["metadata"]["stream"] == consumer.stream
    concurrency = int(container_env(main_container(deployment), manifests)["AGENTBUS_WORKER_MAX_CONCURRENCY"])
    assert int(trigger["metadata"]["lagThreshold"]) <= concurrency
    assert scaled["spec"]["maxReplicaCount"] * concurrency <= consumer.max_ack_pending


def _routed_models() -> set[str]:
    """Every model config/models.yaml sends steps to: the deployments of each logical model, and its fallback."""
    routing = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    routed = {d["model"] for entry in routing["models"].values() for d in entry.get("deployments", [])}
    return routed | {entry["fallback"] for entry in routing["models"].values() if entry.get("fallback")}


@pytest.mark.parametrize("folder", [p.name for p in model_folders()])
def test_a_model_folder_is_routed_and_valid(folder: str) -> None:
    """The model is a deployment or a fallback of config/models.yaml, and its objects validate."""
    manifests = render(MODELS_DIR / folder)
    assert builtin_schema_failures(manifests) == []
    assert [m for m in manifests if not is_builtin(m) and (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS] == []
    assert folder in _routed_models(), f"config/models.yaml routes no step to {folder}"


def test_an_endpoint_folder_forwards_to_an_https_api_with_a_key_and_no_gpu(endpoint_folder: Path) -> None:
    model = endpoint_folder.name
    manifests = render(endpoint_folder)
    [deployment] = of_kind(manifests, "Deployment")
    assert name_of(deployment) == f"{WORKER}-{model}"
    container = main_container(deployment)
    assert GPU_RESOURCE not in container["resources"].get("limits", {})
    assert GPU_NODE_LABEL not in pod_spec(deployment).get("nodeSelector", {})
    assert not container["image"].endswith("-gpu"), "no CUDA needed to forward requests"
    settings = _worker_settings(deployment, manifests)
    assert settings.engine == "openai"
    assert settings.models == [model]
    assert settings.openai_base_url is not None
    assert settings.openai_base_url.startswith("https://")
    assert not settings.meters_gpu, "an external API is billed per token, not per GPU-second"
    [key] = [v for v in container["env"] if v["name"] == "AGENTBUS_WORKER_OPENAI_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == ENDPOINT_SECRET
    assert not key["valueFrom"]["secretKeyRef"].get("optional", False), "without a key every step would fail"
    _scales_on_its_own_consumer(endpoint_folder)


def test_an_endpoint_folder_opens_https_egress_for_its_worker_alone(endpoint_folder: Path) -> None:
    manifests = render(endpoint_folder)
    [policy] = of_kind(manifests, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]] == [443]
    selected = [w for w in workloads(manifests) if selector_matches(policy["spec"]["podSelector"], pod_labels(w))]
    assert [name_of(w) for w in selected] == [f"{WORKER}-{endpoint_folder.name}"]
    other_worker = named(render(BASE_DIR), "Deployment", WORKER)
    assert not selector_matches(policy["spec"]["podSelector"], pod_labels(other_worker)), "the scripted worker too"
