"""Every overlay renders, and every object in it is valid: core kinds against Kubernetes' OpenAPI schemas
(kubernetes-validate, offline), ScaledObjects against KEDA's CRD schema kept in deploy/schemas, and
nothing of an unknown kind."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from deploy.manifests import (
    COMPONENTS_DIR,
    COMPONENTS_RENDERED_APART,
    CUSTOM_KINDS,
    KARPENTER_DIR,
    KEDA_SCHEMA,
    OVERLAYS,
    OVERLAYS_DIR,
    builtin_schema_failures,
    is_builtin,
    load_json,
    name_of,
    named,
    render,
    render_overlay,
    validate_builtin,
)


def _keda_validator() -> jsonschema.Draft202012Validator:
    schema: dict[str, Any] = load_json(KEDA_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_overlay_folder_is_checked() -> None:
    folders = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").exists())
    assert folders == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    manifests = render_overlay(overlay)
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "StatefulSet", "ScaledObject", "Job", "Service"} <= kinds


def test_every_component_is_used_by_an_overlay_or_checked_apart() -> None:
    """A component no overlay includes is never rendered by the overlay checks, so it must be rendered by
    tests of its own (COMPONENTS_RENDERED_APART)."""
    used = "\n".join(p.read_text(encoding="utf-8") for p in OVERLAYS_DIR.rglob("kustomization.yaml"))
    components = [p.name for p in COMPONENTS_DIR.iterdir() if (p / "kustomization.yaml").exists()]
    assert components
    assert set(components) >= COMPONENTS_RENDERED_APART
    assert [c for c in components if f"components/{c}" not in used and c not in COMPONENTS_RENDERED_APART] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_the_kubernetes_schema(overlay: str) -> None:
    assert builtin_schema_failures(render_overlay(overlay)) == []


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(named(render_overlay("dev"), "Deployment", "agent-runner"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_objects_are_of_known_kinds(overlay: str) -> None:
    unknown = [
        f"{m['apiVersion']} {m['kind']}/{name_of(m)}"
        for m in render_overlay(overlay)
        if not is_builtin(m) and (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS
    ]
    assert unknown == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_match_the_keda_crd_schema(overlay: str) -> None:
    validator = _keda_validator()
    scaled = [m for m in render_overlay(overlay) if m["kind"] == "ScaledObject"]
    assert scaled
    errors = [
        f"{name_of(m)}: {'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for m in scaled
        for error in validator.iter_errors(m)
    ]
    assert errors == []


def test_the_keda_schema_rejects_what_the_crd_would_not_take() -> None:
    validator = _keda_validator()
    good = copy.deepcopy(named(render_overlay("prod"), "ScaledObject", "agent-runner"))
    assert validator.is_valid(good)

    misspelt = copy.deepcopy(good)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    numeric = copy.deepcopy(good)
    numeric["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 64
    no_target = copy.deepcopy(good)
    del no_target["spec"]["scaleTargetRef"]
    no_type = copy.deepcopy(good)
    del no_type["spec"]["triggers"][0]["type"]
    for broken in (misspelt, numeric, no_target, no_type):
        assert not validator.is_valid(broken)


def test_karpenter_example_renders_with_known_kinds() -> None:
    manifests = render(KARPENTER_DIR)
    assert {(m["apiVersion"], m["kind"]) for m in manifests} <= CUSTOM_KINDS
    pool = named(manifests, "NodePool", "agentbus-gpu")
    node_class = pool["spec"]["template"]["spec"]["nodeClassRef"]
    assert named(manifests, node_class["kind"], node_class["name"])
