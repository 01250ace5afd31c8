"""The language model each environment serves, and the services whose replica count is fixed.

Staging and prod run the agents on a real model: components/llm-gpu (vLLM on GPU workers, the canary and the
fallback of config/models.yaml) by default, components/llm-external (an OpenAI-compatible API) where a cluster
has no GPUs; the `scripted` engine serves the synthetic probe alone. Every model an agent's steps can reach
(through the routing table the runner mounts) has a worker; the GPU pool, the node class its GPU-seconds are
priced at and the KEDA maxima of the GPU workers agree. The cost-accountant never runs more replicas than
there are budget partitions; the trace-exporter's replicas share one ledger."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import yaml
from agentbus.contracts import registry
from deploy.manifests import (
    AGENTS_DIR,
    COMPONENTS_DIR,
    CUSTOM_KINDS,
    GPU_RESOURCE,
    KARPENTER_DIR,
    LLM_COMPONENTS,
    OVERLAYS,
    OVERLAYS_DIR,
    REPO_ROOT,
    Manifest,
    builtin_schema_failures,
    configmap_data,
    container_env,
    is_builtin,
    main_container,
    name_of,
    named,
    of_kind,
    pod_spec,
    render,
    render_overlay,
    scaled_by_deployment,
    service_deployments,
    service_name,
)

PROBE_AGENTS = frozenset({"echo"})
"""Agents that stay on the `scripted` engine in production: synthetic probes of the bus, no model in the way."""
SCRIPTED = "scripted"
NODE_CLASS_LABEL = "agentbus.dev/node-class"
GPU_OF_INSTANCE_FAMILY: dict[str, str] = {"g6": "gpu-l4"}
"""The node class (config/prices.yaml) of the GPU each EC2 instance family carries: g6 has an NVIDIA L4."""
EXPECTED_MODEL: dict[str, str] = {"llm-gpu": "llama-3-8b", "llm-external": "hosted-llm"}
"""The model the production agents name under each language-model component."""


def _served_models(manifests: list[Manifest]) -> set[str]:
    served: set[str] = set()
    for deployment in service_deployments(manifests):
        if service_name(deployment) == registry.Service.INFERENCE_WORKER:
            env = container_env(main_container(deployment), manifests)
            served.update(json.loads(env.get("AGENTBUS_WORKER_MODELS", json.dumps(list(registry.DEFAULT_MODELS)))))
    return served


def _agents(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """The agent specs the runner mounts, by agent name."""
    specs = [yaml.safe_load(text) for text in configmap_data(manifests, "agent-specs").values()]
    return {spec["name"]: spec for spec in specs}


def _reachable(model: str, routing: dict[str, Any]) -> set[str]:
    """Every model subject a step of `model` can be sent to: its deployments and fallbacks, or itself."""
    entry = routing.get("models", {}).get(model)
    if entry is None:
        return {model}
    reached = {d["model"] for d in entry.get("deployments", [])} or {model}
    if entry.get("fallback"):
        reached |= _reachable(entry["fallback"], routing)
    return reached


def _routing(manifests: list[Manifest]) -> dict[str, Any]:
    routing: dict[str, Any] = yaml.safe_load(configmap_data(manifests, "model-routing")["models.yaml"])
    return routing


def _gpu_workers(manifests: list[Manifest]) -> list[Manifest]:
    return [
        d for d in of_kind(manifests, "Deployment") if GPU_RESOURCE in main_container(d)["resources"].get("limits", {})
    ]


@pytest.fixture(scope="module")
def external_variant(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """prod as a cluster without GPUs runs it: components/llm-external in place of components/llm-gpu."""
    prod = OVERLAYS_DIR / "prod"
    root = tmp_path_factory.mktemp("prod-without-gpus")
    kustomization = yaml.safe_load((prod / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "../../components/llm-gpu" in kustomization["components"]

    def moved(path: str) -> str:
        return os.path.relpath((prod / path).resolve(), root)

    kustomization["resources"] = [moved(p) for p in kustomization["resources"]]
    kustomization["components"] = [
        moved("../../components/llm-external" if c == "../../components/llm-gpu" else c)
        for c in kustomization["components"]
    ]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False), encoding="utf-8")
    return render(root)


def _variants(external_variant: list[Manifest]) -> dict[str, list[Manifest]]:
    return {**{o: render_overlay(o) for o in OVERLAYS}, "prod without GPUs": external_variant}


# --- every model an agent can reach is served -----------------------------------------------------------------


def test_every_model_an_agents_steps_can_reach_has_a_worker(external_variant: list[Manifest]) -> None:
    for variant, manifests in _variants(external_variant).items():
        served, routing = _served_models(manifests), _routing(manifests)
        for agent, spec in _agents(manifests).items():
            missing = _reachable(spec["model"], routing) - served
            assert not missing, f"{variant}: agent {agent} ({spec['model']}) reaches unserved models {missing}"


def test_the_bootstrap_creates_the_consumer_of_every_served_model(external_variant: list[Manifest]) -> None:
    for variant, manifests in _variants(external_variant).items():
        models = set(configmap_data(manifests, "bootstrap-config")["MODELS"].split(","))
        assert models == _served_models(manifests), variant


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_production_agents_run_on_a_language_model_served_by_gpus(overlay: str) -> None:
    manifests = render_overlay(overlay)
    agents = _agents(manifests)
    assert {name for name, spec in agents.items() if spec["model"] == SCRIPTED} == PROBE_AGENTS
    routing = _routing(manifests)
    gpu_models = {m for d in _gpu_workers(manifests) for m in json.loads(_env(d, manifests)["AGENTBUS_WORKER_MODELS"])}
    for name, spec in agents.items():
        if name in PROBE_AGENTS:
            continue
        deployments = {d["model"] for d in routing["models"][spec["model"]]["deployments"]}
        assert deployments <= gpu_models, f"{overlay}: {name}'s model {spec['model']} is not all on GPUs"


def test_without_gpus_the_agents_run_on_the_external_endpoint(external_variant: list[Manifest]) -> None:
    assert _gpu_workers(external_variant) == []
    assert not any("-gpu:" in c["image"] for d in of_kind(external_variant, "Deployment") for c in [main_container(d)])
    agents = _agents(external_variant)
    assert {name for name, spec in agents.items() if spec["model"] == SCRIPTED} == PROBE_AGENTS
    assert {spec["model"] for name, spec in agents.items() if name not in PROBE_AGENTS} == {
        EXPECTED_MODEL["llm-external"]
    }
    assert builtin_schema_failures(external_variant) == []
    assert [m for m in external_variant if not is_builtin(m) and (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS] == []


def test_dev_runs_every_agent_on_the_scripted_engine() -> None:
    manifests = render_overlay("dev")
    assert {spec["model"] for spec in _agents(manifests).values()} == {SCRIPTED}
    assert _served_models(manifests) == {SCRIPTED}


@pytest.mark.parametrize("component", LLM_COMPONENTS)
def test_production_agent_specs_are_the_repositorys_but_for_the_model(component: str) -> None:
    """The copies under components/<llm>/agents/ differ from agents/*.yaml in `model` alone, and every
    agent of the repository is either copied there or a probe that stays on the scripted engine."""
    folder = COMPONENTS_DIR / component / "agents"
    copies = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.yaml"))}
    repository = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(AGENTS_DIR.glob("*.y*ml"))}
    assert set(copies) <= set(repository), f"{component}: copies of agents the repository does not have"
    for file, repo_spec in repository.items():
        if file not in copies:
            assert repo_spec["name"] in PROBE_AGENTS, f"{component} does not give agent {repo_spec['name']} a model"
            continue
        copy = copies[file]
        assert copy["model"] == EXPECTED_MODEL[component]
        same = {k: v for k, v in copy.items() if k != "model"} == {k: v for k, v in repo_spec.items() if k != "model"}
        assert same, f"{component}/agents/{file} drifted from agents/{file}: copy the change"
    kustomization = yaml.safe_load((COMPONENTS_DIR / component / "kustomization.yaml").read_text(encoding="utf-8"))
    [generator] = [g for g in kustomization["configMapGenerator"] if g["name"] == "agent-specs"]
    assert sorted(generator["files"]) == sorted(f"agents/{file}" for file in copies)


# --- the GPU pool, the node class pricing and the KEDA maxima agree -------------------------------------------


def _env(deployment: Manifest, manifests: list[Manifest]) -> dict[str, str]:
    return container_env(main_container(deployment), manifests)


def _pools() -> list[Manifest]:
    return of_kind(render(KARPENTER_DIR), "NodePool")


def _pool_labels(pool: Manifest) -> dict[str, str]:
    labels: dict[str, str] = pool["spec"]["template"]["metadata"]["labels"]
    return labels


def _requirement(pool: Manifest, key: str) -> list[str]:
    values: list[str] = next(r["values"] for r in pool["spec"]["template"]["spec"]["requirements"] if r["key"] == key)
    return values


def test_each_gpu_pool_provides_the_node_class_it_is_labelled_with() -> None:
    prices = yaml.safe_load((REPO_ROOT / "config" / "prices.yaml").read_text(encoding="utf-8"))
    assert _pools()
    for pool in _pools():
        node_class = _pool_labels(pool)[NODE_CLASS_LABEL]
        families = _requirement(pool, "karpenter.k8s.aws/instance-family")
        assert {GPU_OF_INSTANCE_FAMILY.get(f) for f in families} == {node_class}, (
            f"NodePool {name_of(pool)}: instance families {families} do not all carry a {node_class}"
        )
        assert node_class in prices["node_classes"], f"{node_class} has no price per GPU-hour"


@pytest.mark.parametrize("overlay", ["staging", "prod"])
def test_gpu_workers_fit_their_pool_are_priced_as_its_gpu_and_keda_stays_within_its_limit(overlay: str) -> None:
    manifests = render_overlay(overlay)
    workers = _gpu_workers(manifests)
    assert workers, f"{overlay} serves no model on GPUs"
    scaled = scaled_by_deployment(manifests)
    gpus_at_most: dict[str, int] = {}
    for worker in workers:
        where = f"{overlay}: {name_of(worker)}"
        env = _env(worker, manifests)
        selector = pod_spec(worker)["nodeSelector"]
        matching = [p for p in _pools() if selector.items() <= _pool_labels(p).items()]
        assert len(matching) == 1, f"{where}: {len(matching)} GPU pools have the labels {selector}"
        pool = matching[0]
        assert env["AGENTBUS_WORKER_NODE_CLASS"] == _pool_labels(pool)[NODE_CLASS_LABEL], (
            f"{where}: priced as {env['AGENTBUS_WORKER_NODE_CLASS']}, runs on {_pool_labels(pool)[NODE_CLASS_LABEL]}"
        )
        per_pod = int(main_container(worker)["resources"]["limits"][GPU_RESOURCE])
        engine_args = json.loads(env.get("AGENTBUS_WORKER_VLLM_ENGINE_ARGS", "{}"))
        parallel = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
        assert per_pod == parallel, f"{where}: {per_pod} GPUs for an engine that uses {parallel}"
        assert str(per_pod) in _requirement(pool, "karpenter.k8s.aws/instance-gpu-count"), f"{where}: no such node"
        assert name_of(worker) in scaled, f"{where}: GPU workers are scaled by KEDA on their consumer"
        maximum = scaled[name_of(worker)]["spec"]["maxReplicaCount"]
        gpus_at_most[name_of(pool)] = gpus_at_most.get(name_of(pool), 0) + maximum * per_pod
    for pool in _pools():
        limit = int(pool["spec"]["limits"][GPU_RESOURCE])
        assert gpus_at_most.get(name_of(pool), 0) <= limit, (
            f"{overlay}: KEDA may run {gpus_at_most[name_of(pool)]} GPUs on NodePool {name_of(pool)}, "
            f"which holds at most {limit}: raise its limit or lower the workers' maxReplicaCount"
        )


# --- services with a fixed replica count ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cost_accountant_never_runs_more_replicas_than_budget_partitions(overlay: str) -> None:
    """Each budget partition has one owner at a time: replicas past BUDGET_PARTITIONS would own nothing, and
    every change of replica count moves partitions, so the accountant is never autoscaled."""
    manifests = render_overlay(overlay)
    accountant = named(manifests, "Deployment", registry.Service.COST_ACCOUNTANT.value)
    assert name_of(accountant) not in scaled_by_deployment(manifests), "the cost-accountant must not be autoscaled"
    replicas = accountant["spec"]["replicas"]
    assert 1 <= replicas <= registry.BUDGET_PARTITIONS
    if overlay != "dev":
        assert replicas >= 2, f"{overlay}: a second accountant takes over the partitions of one that fails"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trace_exporter_replicas_share_one_database_ledger(overlay: str) -> None:
    manifests = render_overlay(overlay)
    exporter = named(manifests, "Deployment", registry.Service.TRACE_EXPORTER.value)
    env = {v["name"]: v for v in main_container(exporter)["env"]}
    url = env.get("AGENTBUS_TRACES_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef")
    assert url is not None, "replicas need the shared ledger database (AGENTBUS_TRACES_DATABASE_URL)"
    assert "AGENTBUS_TRACES_LEDGER_PATH" not in _env(exporter, manifests), "a local ledger file is per pod"
    if overlay != "dev":
        assert exporter["spec"]["replicas"] >= 2, f"{overlay}: a second exporter for failover"


def test_the_llm_components_are_the_two_documented_choices() -> None:
    for component in LLM_COMPONENTS:
        assert (COMPONENTS_DIR / component / "kustomization.yaml").exists()
    used = {c for o in ("staging", "prod") for c in _components_of(o)}
    assert "../../components/llm-gpu" in used
    assert "../../components/llm-external" not in used


def _components_of(overlay: str) -> list[str]:
    kustomization = yaml.safe_load((OVERLAYS_DIR / overlay / "kustomization.yaml").read_text(encoding="utf-8"))
    components: list[str] = kustomization.get("components", [])
    return components


def test_the_readme_documents_both_ways_to_serve_the_model() -> None:
    readme = (REPO_ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    for component in LLM_COMPONENTS:
        assert f"components/{component}" in readme
    assert "`agentbus-llm-endpoint`" in readme
