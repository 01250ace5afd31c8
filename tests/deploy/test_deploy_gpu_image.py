"""The GPU image runs what CI resolved: vLLM is the inference-worker's locked `gpu` extra, the image installs that
extra from the lock and nothing on top of it, the CPU install (`uv sync --all-packages`) holds no torch or
vLLM, and the numpy the GPU image gets is the one the test suite runs with.

The lock is read as uv installs it on this platform (Linux): from a set of roots, each dependency whose marker
holds here, with the optional dependencies its extras name."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Iterable
from typing import Any

import pytest
from deploy.manifests import DOCKER_DIR, REPO_ROOT
from packaging.markers import Marker
from packaging.version import Version

LOCK_FILE = REPO_ROOT / "uv.lock"
WORKER_PACKAGE = "agentbus-inference-worker"
GPU_EXTRA = "gpu"
GPU_DOCKERFILE = DOCKER_DIR / "inference-worker-gpu.Dockerfile"
VLLM_SERIES = "0.33"
"""The vLLM release series engines/vllm.py is written against."""


def _lock() -> dict[str, Any]:
    with LOCK_FILE.open("rb") as handle:
        return tomllib.load(handle)


Locked = dict[tuple[str, str], dict[str, Any]]


def _packages(lock: dict[str, Any]) -> Locked:
    return {(p["name"], p.get("version", "")): p for p in lock["package"]}


def _holds_here(dependency: dict[str, Any]) -> bool:
    marker = dependency.get("marker")
    return marker is None or Marker(marker).evaluate()


def _resolve(packages: Locked, name: str, version: str | None) -> tuple[str, str]:
    candidates = [key for key in packages if key[0] == name and (version is None or key[1] == version)]
    assert len(candidates) == 1, f"uv.lock: {name} {version or ''} is locked {len(candidates)} times"
    return candidates[0]


def installed(packages: Locked, roots: Iterable[tuple[str, tuple[str, ...]]], groups: bool = False) -> dict[str, str]:
    """name -> version of everything installed from `roots` ((package, extras) pairs) on this platform."""
    found: dict[str, str] = {}
    todo = [(_resolve(packages, name, None), extras) for name, extras in roots]
    seen: set[tuple[tuple[str, str], tuple[str, ...]]] = set()
    while todo:
        key, extras = todo.pop()
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        found[key[0]] = key[1]
        package = packages[key]
        dependencies = list(package.get("dependencies", []))
        for extra in extras:
            dependencies += package.get("optional-dependencies", {}).get(extra, [])
        if groups:
            dependencies += [d for group in package.get("dev-dependencies", {}).values() for d in group]
        for dependency in dependencies:
            if _holds_here(dependency):
                target = _resolve(packages, dependency["name"], dependency.get("version"))
                todo.append((target, tuple(dependency.get("extra", ()))))
    return found


def _workspace_roots(lock: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """Every workspace member, as `uv sync --all-packages` installs them (no extras)."""
    sources = [p for p in lock["package"] if {"editable", "virtual"} & set(p["source"])]
    return [(p["name"], ()) for p in sources]


@pytest.fixture(scope="module")
def packages() -> Locked:
    return _packages(_lock())


@pytest.fixture(scope="module")
def cpu_install(packages: Locked) -> dict[str, str]:
    return installed(packages, _workspace_roots(_lock()), groups=True)


@pytest.fixture(scope="module")
def gpu_image(packages: Locked) -> dict[str, str]:
    """What `uv sync --no-dev --package agentbus-inference-worker --extra gpu` installs."""
    return installed(packages, [(WORKER_PACKAGE, (GPU_EXTRA,))])


def test_vllm_is_the_locked_gpu_extra_of_the_worker(packages: Locked, gpu_image: dict[str, str]) -> None:
    worker = packages[_resolve(packages, WORKER_PACKAGE, None)]
    extra = worker.get("optional-dependencies", {}).get(GPU_EXTRA, [])
    assert [d["name"] for d in extra] == ["vllm"], "the gpu extra is vLLM alone"
    assert Version(gpu_image["vllm"]).base_version.startswith(VLLM_SERIES + ".")
    assert "torch" in gpu_image, "vLLM brings its CUDA build of torch"


def test_the_cpu_install_holds_no_torch_and_no_vllm(cpu_install: dict[str, str]) -> None:
    assert "agentbus-inference-worker" in cpu_install
    assert not {"torch", "vllm", "triton"} & set(cpu_install), "uv sync --all-packages must stay CPU-only and small"


def test_the_gpu_image_runs_the_numpy_the_tests_run_with(
    cpu_install: dict[str, str], gpu_image: dict[str, str]
) -> None:
    assert gpu_image["numpy"] == cpu_install["numpy"]
    assert importlib.metadata.version("numpy") == gpu_image["numpy"], "the test environment is not the lock's: uv sync"
    for name, version in gpu_image.items():
        if name in cpu_install:
            assert cpu_install[name] == version, f"{name}: the GPU image gets {version}, the tests {cpu_install[name]}"


def test_the_gpu_image_installs_the_locked_extra_and_nothing_on_top() -> None:
    text = GPU_DOCKERFILE.read_text(encoding="utf-8")
    install = re.findall(r"uv sync [^\n]*", text)
    assert install == [f"uv sync --frozen --no-dev --no-editable --package {WORKER_PACKAGE} --extra {GPU_EXTRA}"]
    assert not re.search(r"\bpip3? install\b", text), "anything installed beside the lock runs untested versions"
