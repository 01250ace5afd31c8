"""Tool runners against real things: a sandboxed subprocess, a local HTTP server, a NATS responder, kubectl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from agentbus.contracts.rag import RetrievedChunk, SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_SEARCH
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.tool_executor.adapters.runners import (
    HttpRunner,
    PythonRunner,
    RetrievalRunner,
    ShellRunner,
)
from agentbus.tool_executor.adapters.sandbox import SandboxLimits, run_sandboxed
from agentbus.tool_executor.builtins.kubernetes import check_manifests, render_documents
from agentbus.tool_executor.ports import ToolInvocation, TransientToolError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg


def _invocation(arguments: dict[str, Any], tenant: str = "acme") -> ToolInvocation:
    return ToolInvocation("task-1.1.0", tenant, "task-1", "ops", "t", arguments, "sam")


def _definition(**fields: Any) -> ToolDefinition:
    base: dict[str, Any] = {"name": "t", "description": "d", "parameters": {"type": "object"}}
    return ToolDefinition.model_validate({**base, **fields})


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# --- the sandbox -----------------------------------------------------------------------------------


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sh -c 'sleep 300' & wait"
    result = await run_sandboxed(["/bin/sh", "-c", script], SandboxLimits(timeout_seconds=1))
    assert result.timed_out
    assert result.exit_code is None
    background = int(pids.read_text())
    async with asyncio.timeout(10):
        while _alive(background):
            await asyncio.sleep(0.05)


async def test_the_command_sees_none_of_the_executors_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_EXECUTOR_DATABASE_URL", "postgresql://svc:hunter2@db/x")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    result = await run_sandboxed(["/usr/bin/env"], SandboxLimits(timeout_seconds=5), env={"GREETING": "hi"})
    assert result.exit_code == 0
    assert "hunter2" not in result.stdout
    assert "sk-secret-value" not in result.stdout
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert names == {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "GREETING"}


async def test_its_own_session_limits_and_a_capped_output() -> None:
    limits = SandboxLimits(timeout_seconds=5, max_output_bytes=1000)
    result = await run_sandboxed(
        [
            "/bin/sh",
            "-c",
            "ps -o sid= -p $$; ps -o pgid= -p $$; ulimit -n; ulimit -c; head -c 5000 /dev/zero | tr '\\0' x",
        ],
        limits,
    )
    assert result.exit_code == 0
    assert result.truncated
    lines = result.stdout.splitlines()
    session, group = int(lines[0]), int(lines[1])
    assert session == group != os.getsid(0), "a session of its own, led by the command"
    assert lines[2:4] == ["256", "0"]
    assert len(result.stdout) == 1000


async def test_the_memory_limit_stops_a_greedy_command() -> None:
    python = shutil.which("python3") or "/usr/bin/python3"
    limits = SandboxLimits(timeout_seconds=10, max_memory_mb=64)
    result = await run_sandboxed([python, "-c", "x = bytearray(512 * 1024 * 1024)"], limits)
    assert result.exit_code not in (0, None)
    assert "MemoryError" in result.stderr


async def test_the_shell_runner_substitutes_arguments_and_reports_the_exit_status() -> None:
    definition = _definition(kind="shell", shell={"command": ["/bin/sh", "-c", "echo {word}; exit {code}"]})
    ok = await ShellRunner().run(definition, _invocation({"word": "hello", "code": 0}), None)
    assert ok.ok
    assert "exit status 0" in ok.content
    assert "hello" in ok.content
    failed = await ShellRunner().run(definition, _invocation({"word": "bye", "code": 3}), None)
    assert not failed.ok
    assert failed.error_code == "exit_status"
    slow = _definition(kind="shell", timeout_seconds=0.5, shell={"command": ["/bin/sleep", "30"]})
    timed_out = await ShellRunner().run(slow, _invocation({}), None)
    assert (timed_out.ok, timed_out.error_code) == (False, "timeout")


# --- http ------------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        _Recorder.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        status = 500 if "/fail" in self.path else 404 if "/missing" in self.path else 200
        payload = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _answer  # noqa: N815
    do_POST = _answer  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def http_server() -> Iterator[str]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_tools_send_arguments_secrets_and_the_idempotency_key(http_server: str) -> None:
    definition = _definition(
        kind="http",
        http={
            "method": "POST",
            "url": f"{http_server}/items/{{item}}",
            "headers": {"Authorization": {"secret_env": "ITEMS_TOKEN", "prefix": "Bearer "}, "X-Team": "ops"},
            "send_idempotency_key": True,
        },
    )
    async with httpx.AsyncClient() as client:
        runner = HttpRunner(client, environ={"ITEMS_TOKEN": "s3cret"})
        output = await runner.run(definition, _invocation({"item": "a b/c", "count": 2}), None)
        assert output.ok
        assert json.loads(output.content) == {"status": 200}
        [request] = _Recorder.seen
        assert request["path"] == "/items/a%20b%2Fc"
        assert json.loads(request["body"]) == {"count": 2}
        assert request["headers"]["Authorization"] == "Bearer s3cret"
        assert request["headers"]["Idempotency-Key"] == "task-1.1.0"
        assert request["headers"]["X-Team"] == "ops"

        get = _definition(kind="http", http={"method": "GET", "url": f"{http_server}/missing/{{id}}"})
        missing = await runner.run(get, _invocation({"id": "7", "q": "x"}), None)
        assert (missing.ok, missing.error_code) == (False, "http_404")
        assert _Recorder.seen[-1]["path"] == "/missing/7?q=x"
        failing = _definition(kind="http", http={"method": "GET", "url": f"{http_server}/fail"})
        with pytest.raises(TransientToolError):
            await runner.run(failing, _invocation({}), None)
        no_secret = await HttpRunner(client, environ={}).run(definition, _invocation({"item": "x"}), None)
        assert (no_secret.ok, no_secret.error_code) == (False, "missing_secret")


# --- retrieval -------------------------------------------------------------------------------------


async def test_retrieval_numbers_passages_and_returns_citations(
    nats_server: NatsServerProcess, nats_client: NatsClient
) -> None:
    requests: list[SearchRequest] = []

    async def retriever(msg: Msg) -> None:
        request = SearchRequest.model_validate_json(msg.data)
        requests.append(request)
        chunks = [
            RetrievedChunk(document_id="runbook", chunk_index=2, text="Restart the pod.", score=0.91),
            RetrievedChunk(document_id="faq", chunk_index=0, text="Check the logs first.", score=0.55),
        ]
        await msg.respond(SearchReply(chunks=chunks if request.query != "nothing" else []).model_dump_json().encode())

    sub = await nats_client.subscribe(RAG_SEARCH.format(tenant="acme"), cb=retriever)
    definition = _definition(kind="retrieval", timeout_seconds=5, retrieval={"top_k": 3})
    try:
        runner = RetrievalRunner(nats_client)
        output = await runner.run(definition, _invocation({"query": "pod stuck"}), None)
        empty = await runner.run(definition, _invocation({"query": "nothing"}), None)
    finally:
        await sub.unsubscribe()
    assert output.ok
    assert output.content.startswith("[1] (runbook#2, score 0.910)\nRestart the pod.")
    assert "[2] (faq#0, score 0.550)\nCheck the logs first." in output.content
    assert [c["document_id"] for c in output.citations] == ["runbook", "faq"]
    assert (requests[0].tenant, requests[0].top_k, requests[0].query) == ("acme", 3, "pod stuck")
    assert empty.ok
    assert "No matching passages" in empty.content
    with pytest.raises(TransientToolError, match="no retriever"):
        await RetrievalRunner(nats_client).run(definition, _invocation({"query": "x"}, tenant="nobody"), None)


# --- the deploy assistant's tools ------------------------------------------------------------------


def test_render_manifest_builds_a_deployment_a_service_and_a_configmap() -> None:
    documents = render_documents(
        {"name": "web", "image": "nginx:1.27", "ports": [8080], "env": {"MODE": "prod"}, "replicas": 2}
    )
    assert [d["kind"] for d in documents] == ["ConfigMap", "Deployment", "Service"]
    deployment = documents[1]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["readinessProbe"]["tcpSocket"]["port"] == 8080
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["envFrom"] == [{"configMapRef": {"name": "web-env"}}]
    text = yaml.safe_dump_all(documents)
    assert check_manifests(text)[1] == []


async def test_kubectl_apply_validates_offline_and_says_nothing_was_applied() -> None:
    python = PythonRunner()
    apply = _definition(
        kind="python",
        timeout_seconds=30,
        python={"callable": "agentbus.tool_executor.builtins.kubernetes:kubectl_apply", "options": {"mode": "offline"}},
    )
    python.register(apply)
    manifest = yaml.safe_dump_all(render_documents({"name": "web", "image": "nginx:1.27", "ports": [80]}))
    output = await python.run(apply, _invocation({"manifest": manifest}), None)
    assert output.ok, output.content
    assert "NOT applied" in output.content
    assert "deployment" in output.content
    assert "service/web" in output.content
    broken = await python.run(apply, _invocation({"manifest": "kind: Deployment\nmetadata: {name: Web_1}\n"}), None)
    assert (broken.ok, broken.error_code) == (False, "invalid_manifest")
    assert "apiVersion" in broken.content
    assert "DNS-1123" in broken.content


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_decodes_what_a_structural_check_misses() -> None:
    python = PythonRunner()
    apply = _definition(
        kind="python",
        timeout_seconds=30,
        python={"callable": "agentbus.tool_executor.builtins.kubernetes:kubectl_apply", "options": {"mode": "offline"}},
    )
    python.register(apply)
    # YAML 1.1's `y` is a boolean to kubectl (a string to PyYAML): the object's name is not a string.
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: y}\ndata: {a: b}\n"
    output = await python.run(apply, _invocation({"manifest": manifest}), None)
    assert (output.ok, output.error_code) == (False, "invalid_manifest")
    assert "kubectl could not decode" in output.content
