"""docker-compose.yml and the Dockerfiles: valid against the compose spec, every service built from its
own Dockerfile with uv from the workspace, infrastructure health-checked, and nothing started before
what it needs is healthy and the streams exist."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentbus.contracts import registry
from agentbus.contracts.registry import Service
from deploy.manifests import COMPOSE_FILE, DEPLOY_README, DOCKER_DIR, REPO_ROOT, SETTINGS, settings_of, venv_tool

BOOTSTRAP = "bootstrap"
PROFILE_ONLY = {"langfuse", "gpu"}
IMAGE_VARIANTS = ("-gpu",)
"""Dockerfile name suffixes of another image of the same package (docker/inference-worker-gpu.Dockerfile)."""
COMPOSE_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


def _compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        compose: dict[str, Any] = yaml.safe_load(handle)
    return compose


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _workspace_packages() -> set[str]:
    names = set()
    for path in [REPO_ROOT / "contracts", *REPO_ROOT.glob("libs/*"), *REPO_ROOT.glob("services/*")]:
        pyproject = path / "pyproject.toml"
        if pyproject.exists():
            names.add(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"])
    return names


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_registry_service_is_built_from_its_own_dockerfile() -> None:
    services = _services()
    for service in Service:
        assert service.value in services, f"docker-compose.yml lacks {service.value}"
        build = services[service.value]["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == f"docker/{service.value}.Dockerfile"


@pytest.mark.parametrize("dockerfile", sorted(DOCKER_DIR.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_install_one_workspace_package_with_uv(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    match = re.search(r"uv sync --frozen --no-dev --no-editable --package (\S+)", text)
    assert match is not None, "install with uv from the lock: uv sync --frozen --no-dev --no-editable --package"
    image = dockerfile.name.removesuffix(".Dockerfile")
    package = next((image.removesuffix(v) for v in IMAGE_VARIANTS if image.endswith(v)), image)
    assert match.group(1) == f"agentbus-{package}"
    assert match.group(1) in _workspace_packages()
    for member in ("contracts", "libs", "services"):
        assert f"COPY {member} ./{member}" in text, f"the workspace member folder {member} must be in the build"
    assert re.search(r"^USER 10001:10001$", text, re.M), "run as the non-root uid the manifests expect"
    assert (DOCKER_DIR / f"{dockerfile.name}.dockerignore").exists(), "keep .venv and .git out of the context"


def test_each_dockerfile_is_used() -> None:
    """By compose, or (images compose does not run, like the in-process vLLM worker) by the build commands
    of deploy/README.md."""
    built = {s["build"]["dockerfile"] for s in _services().values() if "build" in s}
    dockerfiles = {f"docker/{p.name}" for p in DOCKER_DIR.glob("*.Dockerfile")}
    assert built <= dockerfiles
    readme = DEPLOY_README.read_text(encoding="utf-8")
    assert [d for d in sorted(dockerfiles - built) if f"docker build -f {d} " not in readme] == []


def test_infrastructure_is_health_checked() -> None:
    for name, service in _services().items():
        if service.get("restart") == "no":
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}


def test_services_start_after_healthy_dependencies_and_the_bootstrap() -> None:
    services = _services()
    for name, definition in services.items():
        for dependency, condition in definition.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == BOOTSTRAP else "service_healthy"
            assert condition["condition"] == expected, f"{name} -> {dependency}"
    for service in Service:
        depends = services[service.value]["depends_on"]
        assert depends[BOOTSTRAP]["condition"] == "service_completed_successfully"
        assert depends["nats"]["condition"] == "service_healthy"


def test_bootstrap_applies_the_streams_once() -> None:
    bootstrap = _services()[BOOTSTRAP]
    assert bootstrap["restart"] == "no"
    assert bootstrap["command"][:2] == ["streams", "apply"]
    command = bootstrap["command"]
    models = command[command.index("--models") + 1].split(",")
    worker_models = [
        model
        for service in _services().values()
        if "AGENTBUS_WORKER_MODELS" in service.get("environment", {})
        for model in yaml.safe_load(service["environment"]["AGENTBUS_WORKER_MODELS"])
    ]
    assert sorted(models) == sorted(worker_models), "one consumer for each model a worker serves, in any profile"


def test_optional_backends_sit_behind_profiles() -> None:
    services = _services()
    assert services["langfuse"]["profiles"] == ["langfuse"]
    assert all(set(s.get("profiles", [])) <= PROFILE_ONLY for s in services.values())
    core = {n for n, s in services.items() if not s.get("profiles")}
    assert {"nats", "postgres", "milvus", "etcd", "minio", BOOTSTRAP, *(s.value for s in Service)} <= core
    assert services["vllm"]["profiles"] == ["gpu"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_nats_fsyncs_and_fits_the_largest_message() -> None:
    nats = _services()["nats"]
    config_mount = next(v for v in nats["volumes"] if v.endswith(":/etc/nats/nats.conf:ro"))
    conf = (REPO_ROOT / config_mount.split(":")[0]).read_text(encoding="utf-8")
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    max_payload = re.search(r"^max_payload:\s*(\d+)\s*$", conf, re.M)
    assert max_payload is not None
    assert int(max_payload.group(1)) >= max(s.max_msg_size for s in registry.STREAMS)


def _agentbus_services() -> dict[str, tuple[str, dict[str, str | None]]]:
    """Compose services that run an agentbus service: name -> (registry service, environment)."""
    found = {}
    for name, definition in _services().items():
        dockerfile = definition.get("build", {}).get("dockerfile", "")
        image = dockerfile.removeprefix("docker/").removesuffix(".Dockerfile")
        if image in {s.value for s in Service}:
            found[name] = (image, definition["environment"])
    return found


def test_every_settings_class_is_known() -> None:
    assert set(SETTINGS) == {s.value for s in Service}


def test_service_environments_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AGENTBUS_<SERVICE>_* variable of each compose service (the gpu profile's worker too) is a field of
    its settings, and the environment, with compose's defaults filled in, parses."""
    services = _agentbus_services()
    assert {service for service, _ in services.values()} == {s.value for s in Service}
    for name, (service, environment) in services.items():
        settings = settings_of(service)
        prefix: str = settings.model_config["env_prefix"]
        fields = set(settings.model_fields)
        unknown = [k for k in environment if k.startswith(prefix) and k[len(prefix) :].lower() not in fields]
        assert unknown == [], f"{name}: {unknown} are not settings"
        assert environment[f"{prefix}HTTP_HOST"] == "0.0.0.0"
        with monkeypatch.context() as scope:
            for variable in [v for v in os.environ if v.startswith("AGENTBUS_")]:
                scope.delenv(variable)
            for variable, value in environment.items():
                if value is not None:  # no value: passed through from the caller's environment, when set
                    scope.setenv(variable, COMPOSE_DEFAULT.sub(lambda m: m.group(1), str(value)))
            settings()
