"""MCP tool servers behind the executor, against a real MCP server (mcp_test_server.py, the official SDK) over
both transports, a real nats-server and real SQLite: discovery, approvals, validation, a server killed
mid-call, a server down at start-up, a tool list that changes at run time, and a misbehaving server."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import approval_id_for
from executor_harness import (
    RunnerStandIn,
    StartExecutor,
    decision_payload,
    make_call,
    new_id,
    pending_requests,
    publish_call,
    publish_decision,
    sha,
    usage_records,
    wait_until,
)
from mcp_harness import SERVER, SERVER_SCRIPT, HttpServer, http_transport, records, server_file, stdio_transport
from nats.aio.client import Client as NatsClient

ECHO = f"{SERVER}__echo"
RECORD = f"{SERVER}__record"
RECORD_AGAIN = f"{SERVER}__record_again"
CONNECT_SECONDS = 30.0


@dataclass
class Served:
    """The test server as the executor reaches it, and how a test stops and restarts it."""

    transport: str
    tools_dir: Path
    http: HttpServer | None

    def kill(self, pid: int) -> None:
        """Kill the server process that ran a call (a stdio server is started again by the executor)."""
        if self.http is not None:
            self.http.kill()
        else:
            os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        if self.http is not None:
            self.http.start()


def _serve(transport: str, root: Path, start: bool = True, **settings: Any) -> Served:
    if transport == "stdio":
        return Served(transport, server_file(root / "mcp-tools", stdio_transport(), **settings), None)
    http = HttpServer(root / "http-server.log")
    if start:
        http.start()
    return Served(transport, server_file(root / "mcp-tools", http_transport(http.port), **settings), http)


@pytest.fixture(params=["stdio", "streamable-http"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    served = _serve(request.param, tmp_path)
    yield served
    if served.http is not None:
        served.http.kill()


async def _connected(start_executor: StartExecutor, served: Served) -> ToolExecutorApp:
    app = await start_executor(tools_dir=served.tools_dir)
    assert await app.mcp_connections[SERVER].wait_connected(CONNECT_SECONDS), app.mcp_connections[SERVER].last_error
    return app


async def test_the_servers_tools_are_discovered_and_a_call_runs_once(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    app = await _connected(start_executor, served)
    connection = app.mcp_connections[SERVER]
    assert {"echo", "record", "huge", "enroll", "retire"} <= {
        name for name in ("echo", "record", "huge", "enroll", "retire") if connection.live_tool(name) is not None
    }
    assert connection.live_tool("late_tool") is None, "pinned, but the server does not list it yet"
    assert app.registry.get_sample_value("agentbus_mcp_server_up", {"server": SERVER}) == 1.0

    tenant = new_id("t")
    call = make_call(ECHO, {"text": "hello"}, tenant=tenant)
    await publish_call(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert (result.ok, result.content) == (True, "echo: hello")
    usage = await usage_records(own_client, tenant)
    assert [(u["usage_id"], u["tool"]) for u in usage] == [(f"tool:{call.call_id}", ECHO)]

    # Named as agent specs name it, `<server>.<tool>`, the call goes to the same tool.
    by_reference = make_call(f"{SERVER}.echo", {"text": "again"})
    await publish_call(own_client, by_reference)
    assert (await runner.wait_for(by_reference.call_id, "result")).content == "echo: again"


async def test_a_call_that_needs_approval_waits_then_runs_once_when_approved(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    await _connected(start_executor, served)
    tenant = new_id("t")
    trace = tmp_path / "runs.txt"
    call = make_call(RECORD, {"path": str(trace), "key": "ask-1"}, tenant=tenant)
    await publish_call(own_client, call)
    pending = await runner.wait_for(call.call_id, "approval_pending")
    [request] = await pending_requests(own_client, tenant)
    assert (request["tool"], request["reason"], request["risk"]) == (
        RECORD,
        "keys starting with ask need a person",
        "high",
    )
    assert records(trace, "ask-1") == [], "nothing reaches the server before the decision"

    approval = decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
    await publish_decision(own_client, tenant, "alice", approval)
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok, result.content
    assert (result.approval_id, result.outcome, result.by) == (pending.approval_id, "approved", "alice")
    await publish_decision(own_client, tenant, "alice", approval)
    await publish_call(own_client, call)
    await runner.settle(1.0)
    assert len(records(trace, "ask-1")) == 1, "ran exactly once"


async def test_a_denied_call_never_reaches_the_server(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    await _connected(start_executor, served)
    tenant = new_id("t")
    trace = tmp_path / "runs.txt"
    call = make_call(RECORD, {"path": str(trace), "key": "ask-2"}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    denial = decision_payload(approval_id_for(call.call_id), "bob", "deny", sha(call), reason="not now")
    await publish_decision(own_client, tenant, "bob", denial)
    result = await runner.wait_for(call.call_id, "result")
    assert result.error is not None
    assert result.error.code == "approval_denied"
    assert "not now" in result.content
    assert records(trace, "ask-2") == []


async def test_invalid_arguments_go_back_to_the_model_and_nothing_is_sent(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    await _connected(start_executor, served)
    trace = tmp_path / "runs.txt"
    call = make_call(RECORD, {"path": str(trace), "key": 7, "sleep": -1})
    await publish_call(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert result.error is not None
    assert result.error.code == "invalid_arguments"
    assert "key: 7 is not of type 'string'" in result.content
    assert "sleep: -1 is less than the minimum of 0" in result.content
    assert not trace.exists()


async def test_a_server_killed_mid_call_interrupts_a_call_and_reruns_an_idempotent_one_once(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    await _connected(start_executor, served)
    trace = tmp_path / "runs.txt"
    once = make_call(RECORD, {"path": str(trace), "key": "once", "sleep": 60})
    again = make_call(RECORD_AGAIN, {"path": str(trace), "key": "again", "sleep": 60})
    await publish_call(own_client, once)
    await publish_call(own_client, again)

    async def both_running() -> bool:
        return bool(records(trace, "once")) and bool(records(trace, "again"))

    await wait_until(both_running)
    served.kill(records(trace, "once")[0])
    interrupted = await runner.wait_for(once.call_id, "result")
    assert interrupted.error is not None
    assert interrupted.error.code == "execution_interrupted"
    assert interrupted.content.startswith("execution_interrupted: outcome unknown")

    served.restart()
    rerun = await runner.wait_for(again.call_id, "result", timeout=60)
    assert (rerun.ok, rerun.content) == (True, "recorded again")
    await runner.settle(1.0)
    assert len(records(trace, "once")) == 1, "the call that is not idempotent never ran again"
    assert len(records(trace, "again")) == 2, "the idempotent call ran once more, once"


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_a_server_down_at_start_up_is_waited_for_then_the_call_runs(
    transport: str, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    late_script = tmp_path / "late" / "server.py"
    if transport == "stdio":
        served = Served(
            transport,
            server_file(tmp_path / "mcp-tools", {"type": "stdio", "command": "{python}", "args": [str(late_script)]}),
            None,
        )
    else:
        served = _serve(transport, tmp_path, start=False)
    try:
        app = await start_executor(tools_dir=served.tools_dir)
        trace = tmp_path / "runs.txt"
        call = make_call(RECORD, {"path": str(trace), "key": "late"})
        await publish_call(own_client, call)
        await runner.settle(1.5)
        assert runner.kinds(call.call_id) == [], "a server that is down fails no call"
        assert not app.mcp_connections[SERVER].connected
        assert app.registry.get_sample_value(
            "agentbus_mcp_server_connects_total", {"server": SERVER, "outcome": "failed"}
        )

        if transport == "stdio":
            late_script.parent.mkdir()
            shutil.copy(SERVER_SCRIPT, late_script)
        else:
            served.restart()
        result = await runner.wait_for(call.call_id, "result", timeout=60)
        assert (result.ok, result.content) == (True, "recorded late")
        assert len(records(trace, "late")) == 1
    finally:
        if served.http is not None:
            served.http.kill()


async def test_a_tool_list_that_changes_at_run_time_is_followed(
    served: Served, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    app = await _connected(start_executor, served)
    connection = app.mcp_connections[SERVER]
    early = make_call(f"{SERVER}__late_tool", {"text": "early"})
    await publish_call(own_client, early)
    refused = await runner.wait_for(early.call_id, "result")
    assert refused.error is not None
    assert refused.error.code == "tool_unavailable"
    assert "does not offer the tool 'late_tool' now" in refused.content

    enroll = make_call(f"{SERVER}__enroll", {})
    await publish_call(own_client, enroll)
    assert (await runner.wait_for(enroll.call_id, "result")).ok

    async def listed() -> bool:
        return connection.live_tool("late_tool") is not None

    await wait_until(listed)
    late = make_call(f"{SERVER}__late_tool", {"text": "now"})
    await publish_call(own_client, late)
    assert (await runner.wait_for(late.call_id, "result")).content == "late: now"

    retire = make_call(f"{SERVER}__retire", {"name": "echo"})
    await publish_call(own_client, retire)
    assert (await runner.wait_for(retire.call_id, "result")).ok

    async def gone() -> bool:
        return connection.live_tool("echo") is None

    await wait_until(gone)
    echo = make_call(ECHO, {"text": "anyone?"})
    await publish_call(own_client, echo)
    result = await runner.wait_for(echo.call_id, "result")
    assert result.error is not None
    assert result.error.code == "tool_unavailable"


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_a_misbehaving_server_is_contained(
    transport: str, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    served = _serve(transport, tmp_path, max_message_bytes=65536)
    try:
        await _connected(start_executor, served)

        async def outcome(tool: str, arguments: dict[str, Any]) -> tuple[str | None, str]:
            call = make_call(f"{SERVER}__{tool}", arguments)
            await publish_call(own_client, call)
            result = await runner.wait_for(call.call_id, "result")
            return (result.error.code if result.error else None), result.content

        code, content = await outcome("huge", {"size": 1_000_000})
        assert code == "result_too_large", content
        code, content = await outcome("huge", {"size": 25_000})
        assert code is None
        assert content.endswith("more characters cut)")
        assert len(content) < 17_000
        code, content = await outcome("fail", {"message": "disk on fire"})
        assert code == "tool_error"
        assert "disk on fire" in content
        code, content = await outcome("garbled", {})
        assert code == "malformed_result", content
        code, content = await outcome("misshapen", {})
        assert code == "malformed_result", content
        # The connection survived all of it.
        assert await outcome("echo", {"text": "still here"}) == (None, "echo: still here")
    finally:
        if served.http is not None:
            served.http.kill()


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_an_idle_connection_is_probed_and_kept(
    transport: str, start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    served = _serve(transport, tmp_path, probe_every_seconds=0.2)
    try:
        app = await _connected(start_executor, served)
        await runner.settle(1.5)
        connected = {"server": SERVER, "outcome": "connected"}
        assert app.registry.get_sample_value("agentbus_mcp_server_connects_total", connected) == 1.0
        assert app.mcp_connections[SERVER].connected
        call = make_call(ECHO, {"text": "after the probes"})
        await publish_call(own_client, call)
        assert (await runner.wait_for(call.call_id, "result")).content == "echo: after the probes"
    finally:
        if served.http is not None:
            served.http.kill()


async def test_a_call_to_an_http_server_gone_while_idle_waits_for_it_and_runs_once(
    start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    # Probed rarely: no probe is what finds the server gone.
    served = _serve("streamable-http", tmp_path, probe_every_seconds=3600)
    assert served.http is not None
    try:
        await _connected(start_executor, served)
        served.http.kill()
        trace = tmp_path / "runs.txt"
        call = make_call(RECORD, {"path": str(trace), "key": "refused"})
        await publish_call(own_client, call)
        await runner.settle(1.5)
        assert runner.kinds(call.call_id) == [], "the server was gone before the call: it waits, not interrupted"
        served.restart()
        result = await runner.wait_for(call.call_id, "result", timeout=60)
        assert (result.ok, result.content) == (True, "recorded refused")
        assert len(records(trace, "refused")) == 1
    finally:
        served.http.kill()
