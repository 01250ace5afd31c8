"""The gateway's HTTP API and console against a real `agentbus up` with identities enforced: tasks submitted
and followed as the caller, event streams that resume without a gap or a repeat, decisions with the
executor's verdict, nothing beyond what the person's own NATS user may do, the operator pages, and the
OpenAPI document under a property-based fuzzer."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agentbus.cli.identities import load_identities as cli_identities
from agentbus.contracts.approvals import ApprovalDecision, ApprovalsListRequest
from agentbus.gateway.adapters.identities import CredentialsFolder, load_identities
from agentbus.gateway.adapters.nats_bus import NatsBus
from agentbus.gateway.domain import Actor, ForbiddenError, Role
from gateway_support import HIGH_TICKET, IDENTITIES, TIMEOUT, EventReader, Gateway, ServerSentEvent, running_gateway

WAIT_SECONDS = 60.0
FUZZ_EXAMPLES = 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as running:
        yield running


@pytest.fixture(scope="module")
def app(gateway: Gateway) -> Iterator[httpx.Client]:
    """The application acme-app, a submitter of acme."""
    with gateway.client(gateway.token("acme-app", "submitter-acme-app")) as client:
        yield client


@pytest.fixture(scope="module")
def alice(gateway: Gateway) -> Iterator[httpx.Client]:
    """alice submits and approves for acme (she logs in with either of her users' passwords)."""
    with gateway.client(gateway.token("alice", "approver-alice")) as client:
        yield client


@pytest.fixture(scope="module")
def bob(gateway: Gateway) -> Iterator[httpx.Client]:
    """bob approves for globex only."""
    with gateway.client(gateway.token("bob", "approver-bob")) as client:
        yield client


def _all_events(client: httpx.Client, url: str, last_event_id: int | None = None) -> list[ServerSentEvent]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = EventReader(response)
        events = []
        while (event := reader.next()) is not None:
            events.append(event)
        return events


def _seqs(events: list[ServerSentEvent]) -> list[int]:
    numbered = [e for e in events if e.event != "token"]
    assert all(e.id == str(e.json()["seq"]) for e in numbered), "an event's SSE id is its seq"
    return [int(e.id or 0) for e in numbered]


def _submit(client: httpx.Client, agent: str, text: str) -> dict[str, Any]:
    reply = client.post("/v1/tasks", json={"tenant": "acme", "agent": agent, "input": text})
    assert reply.status_code == 202, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _pending_approval(client: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        listed = client.get("/v1/approvals", params={"tenant": "acme"})
        assert listed.status_code == 200, listed.text
        for entry in listed.json()["approvals"]:
            if entry["request"]["task_id"] == task_id:
                found: dict[str, Any] = entry["request"]
                return found
        time.sleep(0.2)
    raise AssertionError(f"no approval of {task_id} within {WAIT_SECONDS}s")


def _state(client: httpx.Client, task_id: str, until: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        reply = client.get(f"/v1/tasks/{task_id}", params={"tenant": "acme"})
        assert reply.status_code == 200, reply.text
        state: dict[str, Any] = reply.json()
        if state["status"] == until:
            return state
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} not {until} within {WAIT_SECONDS}s")


def test_the_gateway_reads_identities_as_agentbus_up_does(tmp_path: Path) -> None:
    path = tmp_path / "identities.yaml"
    path.write_text(IDENTITIES)
    expected = cli_identities(path)
    found = load_identities(path, ["admin"])
    assert {n: i.submits_for for n, i in found.items() if i.submits_for} == expected.submitters()
    assert {n: i.approves_for for n, i in found.items() if i.approves_for} == expected.approvers()
    assert [n for n, i in found.items() if i.operator] == ["admin"]


def test_a_task_submitted_over_http_runs_as_the_caller_and_streams_to_its_end(app: httpx.Client) -> None:
    body = _submit(app, "assistant", "What is calculator(6*7)?")
    task = body["task"]
    assert task["submitted_by"] == "acme-app"
    assert body["first_event"]["kind"] == "accepted"
    events = _all_events(app, body["events_url"])
    seqs = _seqs(events)
    assert seqs == list(range(1, len(seqs) + 1))
    assert events[-1].event == "completed"
    assert "42" in events[-1].json()["output"]
    state = app.get(body["state_url"]).json()
    assert (state["status"], state["last_seq"], state["agent"]) == ("completed", seqs[-1], "assistant")
    again = app.post("/v1/tasks", json={"tenant": "acme", "agent": "echo", "input": "x", "task_id": task["task_id"]})
    assert again.status_code == 200
    assert again.json()["duplicate"] is True


def test_an_event_stream_resumes_after_a_dropped_connection_without_a_gap_or_a_repeat(
    app: httpx.Client, alice: httpx.Client
) -> None:
    body = _submit(app, "ops", HIGH_TICKET)
    task_id = body["task"]["task_id"]
    url = body["events_url"]
    first: list[ServerSentEvent] = []
    with app.stream("GET", url) as response:
        reader = EventReader(response)
        while (event := reader.next()) is not None:
            first.append(event)
            if event.event == "approval_pending":
                break  # the connection drops here, mid-stream
    seen = _seqs(first)[-1]
    assert first[-1].event == "approval_pending"
    # Resumed while the task still waits: nothing is repeated, and what happens next arrives live.
    second: list[ServerSentEvent] = []
    with app.stream("GET", url, headers={"Last-Event-ID": str(seen)}) as response:
        assert response.status_code == 200
        reader = EventReader(response)
        request = _pending_approval(alice, task_id)
        decided = alice.post(
            f"/v1/approvals/{request['approval_id']}/decision",
            json={"decision": "approve", "arguments_sha256": request["arguments_sha256"], "reason": "on call"},
        )
        assert decided.status_code == 200, decided.text
        while (event := reader.next()) is not None:
            second.append(event)
    together = _seqs(first) + _seqs(second)
    assert together == list(range(1, len(together) + 1)), together
    assert second[-1].event == "completed"
    # Resumed after the task ended: the rest comes from the stored events; after its end, 204.
    assert _seqs(_all_events(app, url, last_event_id=2)) == list(range(3, len(together) + 1))
    ended = app.get(url, headers={"Last-Event-ID": str(together[-1])})
    assert ended.status_code == 204
    assert app.get(url, headers={"Last-Event-ID": "999"}).status_code == 404


def test_a_decision_returns_the_executors_verdict_and_a_wrong_hash_is_refused(
    app: httpx.Client, alice: httpx.Client
) -> None:
    task_id = _submit(app, "ops", HIGH_TICKET)["task"]["task_id"]
    request = _pending_approval(alice, task_id)
    url = f"/v1/approvals/{request['approval_id']}/decision"
    wrong = alice.post(url, json={"decision": "approve", "arguments_sha256": "0" * 64, "tenant": "acme"})
    assert wrong.status_code == 409, wrong.text
    refused = wrong.json()
    assert refused["verdict"]["outcome"] == "refused"
    assert refused["verdict"]["reason_code"] == "arguments_mismatch"
    assert refused["verdict"]["decision_seq"] == refused["decision_seq"]
    assert _pending_approval(alice, task_id)["approval_id"] == request["approval_id"], "still pending"
    right = alice.post(url, json={"decision": "deny", "arguments_sha256": request["arguments_sha256"]})
    assert right.status_code == 200, right.text
    assert right.json()["verdict"]["outcome"] == "accepted"
    assert right.json()["decision"]["approver"] == "alice"
    state = _state(app, task_id, "completed")
    assert state["pending_approvals"] == []


def test_nobody_does_through_the_gateway_what_their_own_nats_user_may_not(
    gateway: Gateway, app: httpx.Client, alice: httpx.Client, bob: httpx.Client
) -> None:
    task_id = _submit(app, "ops", HIGH_TICKET)["task"]["task_id"]
    request = _pending_approval(alice, task_id)
    decision = {"decision": "approve", "arguments_sha256": request["arguments_sha256"]}
    url = f"/v1/approvals/{request['approval_id']}/decision"
    assert bob.get("/v1/approvals", params={"tenant": "acme"}).status_code == 403
    assert all(e["request"]["tenant"] == "globex" for e in bob.get("/v1/approvals").json()["approvals"])
    assert bob.post(url, json={**decision, "tenant": "acme"}).status_code == 403
    assert bob.post(url, json=decision).status_code == 404, "bob finds no such approval in his tenants"
    assert bob.post("/v1/tasks", json={"tenant": "acme", "agent": "echo", "input": "x"}).status_code == 403
    assert bob.get(f"/v1/tasks/{task_id}", params={"tenant": "acme"}).status_code == 403
    assert app.post(url, json=decision).status_code == 403, "a submitter decides nothing"
    assert httpx.get(f"{gateway.url}/v1/approvals", timeout=TIMEOUT).status_code == 401
    forged = httpx.get(f"{gateway.url}/v1/approvals", headers={"Authorization": "Bearer x.y.z"}, timeout=TIMEOUT)
    assert forged.status_code == 401
    assert _pending_approval(alice, task_id)["approval_id"] == request["approval_id"], "nobody decided it"


async def test_beneath_the_gateways_checks_nats_server_refuses_what_a_user_may_not(gateway: Gateway) -> None:
    """The bus adapter as the users themselves: every refusal is the server's, reported as ForbiddenError."""
    nats_url = next(
        line.split("=", 1)[1]
        for line in (gateway.suite.state / "env").read_text().splitlines()
        if line.startswith("AGENTBUS_NATS_URL=")
    )
    bus = NatsBus(nats_url, CredentialsFolder(gateway.suite.state / "credentials"), request_timeout=20.0)
    as_bob = Actor("bob", Role.APPROVER)
    forged = ApprovalDecision(approval_id="apr_x", decision="approve", approver="bob", arguments_sha256="0" * 64)
    try:
        with pytest.raises(ForbiddenError, match="refused by NATS"):
            await bus.list_approvals(as_bob, "acme", ApprovalsListRequest())
        with pytest.raises(ForbiddenError, match="refused by NATS"):
            await bus.decide(as_bob, "acme", forged, timeout=5.0)
        with pytest.raises(ForbiddenError, match="refused by NATS"):
            async with bus.task_events(Actor("alice", Role.SUBMITTER), "globex", "t1"):
                pass
        with pytest.raises(ForbiddenError, match="no credentials"):
            await bus.replay(Actor("bob", Role.SUBMITTER), "globex", "t1", 1, 10)
        listed = await bus.list_approvals(as_bob, "globex", ApprovalsListRequest())
        assert listed.error is None
    finally:
        await bus.close()


@contextlib.contextmanager
def _login(gateway: Gateway, name: str, password: str) -> Iterator[tuple[httpx.Client, httpx.Response]]:
    """A browser-like client that logged in through the console's form (with its CSRF token)."""
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as client:
        page = client.get("/login")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found is not None
        yield client, client.post("/login", data={"csrf_token": found.group(1), "name": name, "password": password})


def test_console_logins_need_the_identitys_own_password_and_a_csrf_token(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as client:
        no_token = client.post("/login", data={"name": "alice", "password": gateway.password("approver-alice")})
        assert no_token.status_code == 403
    with _login(gateway, "bob", gateway.password("approver-alice")) as (client, wrong):
        assert wrong.status_code == 401
        assert client.get("/inbox").status_code == 303
    with _login(gateway, "alice", gateway.password("submitter-alice")) as (client, right):
        assert right.status_code == 303
        inbox = client.get("/inbox")
        assert inbox.status_code == 200
        assert 'id="identity">alice<' in inbox.text
        assert gateway.password("approver-alice") not in inbox.text
        assert gateway.password("submitter-alice") not in inbox.text
        assert "default-src 'self'" in inbox.headers["content-security-policy"]
        assert client.get("/cost").status_code == 403, "alice is no operator"


def test_operators_see_spend_against_budgets_and_every_services_readiness(gateway: Gateway, app: httpx.Client) -> None:
    _all_events(app, _submit(app, "assistant", "What is calculator(2+3)?")["events_url"])
    with _login(gateway, "admin", gateway.password("admin")) as (client, login):
        assert login.status_code == 303
        health = client.get("/health")
        assert health.status_code == 200
        rows = re.findall(r'data-service="([^"]+)"><td>[^<]*</td><td class="ready">([^<]+)<', health.text)
        assert {service for service, _ in rows} >= {
            "agent-runner",
            "inference-worker",
            "tool-executor",
            "retriever",
            "cost-accountant",
            "trace-exporter",
        }
        assert all(ready == "ready" for _, ready in rows), rows
        consumers = re.findall(r'data-consumer="([^"]+)"[^>]*>.*?class="pending">(\d+)<', health.text, re.S)
        assert "agent-runner-submissions" in {name for name, _ in consumers}
        cost = client.get("/cost", params={"tenant": "acme"})
        assert cost.status_code == 200
        tenant_chart = cost.text.split('id="chart-tenant"')[1].split("</section>")[0]
        assert re.search(r'<tr data-key="acme"><td>acme</td><td>[1-9]\d*</td>', tenant_chart), "acme's calls"
        assert "<td>400.00</td><td>500.00</td>" in tenant_chart, "acme's soft and hard monthly limits"
        agents = cost.text.split('id="chart-agent"')[1].split("</section>")[0]
        assert '<tr data-key="assistant">' in agents
        assert "<td>80.00</td><td>100.00</td>" in agents, "the assistant's limits in acme"


def test_the_openapi_document_holds_under_a_property_based_fuzzer(gateway: Gateway) -> None:
    """Every operation of the document, with generated valid and invalid requests as alice: no 5xx, and every
    answer has a documented status, content type, headers and body."""
    token = gateway.token("alice", "approver-alice")
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{gateway.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance",
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--seed",
        "20261206",
        "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"\b\d+ passed\b", output) or "No issues found" in output, output[-3000:]
