"""Guardrails end to end: the real runner, scripted worker, tool-executor (SQLite) and trace-exporter (JSONL) on
a nats-server of this module, with an agent that names a policy of every action at every stage.

Each action is seen from outside, as a client, an approver and an operator see it: the events, the approval
inbox, the tool's effect, the trace file and the services' logs. A redacted value must appear in none of
them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.cli.tasks import describe
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import configure_logging
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanAttribute
from agentbus.testing import nats_server_or_skip
from agentbus.tool_executor.adapters.schema import tickets
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.app import create_app as create_executor
from agentbus.tool_executor.settings import ExecutorSettings
from agentbus.trace_exporter.app import create_app as create_trace_exporter
from agentbus.trace_exporter.settings import TraceExporterSettings
from helpers import (
    REPO_ROOT,
    approval_request,
    decide,
    first_message,
    new_task_id,
    publish_submission,
    submission,
    task_events,
)
from nats.aio.client import Client as NatsClient

AGENT = """
name: guarded
model: scripted
system_prompt: Help.
tools: [create_ticket, calculator]
max_steps: 4
guardrails: [test-policy]
"""

JUDGED = """
name: judged
model: scripted
system_prompt: Help.
guardrails: [tone]
"""

STREAMED = """
name: streamed
model: scripted
system_prompt: Help.
stream_tokens: true
guardrails: [answer-privacy]
"""

POLICIES = r"""
policies:
  answer-privacy:
    checks:
      - detector: personal_data
        kinds: [email]
        action: redact
        stages: [output]
  tone:
    checks:
      - detector: model
        name: civility
        model: scripted
        instructions: Flag insults.
        action: block
  test-policy:
    checks:
      - detector: secrets
        action: block
        stages: [input]
      - detector: personal_data
        kinds: [email]
        action: redact
      - detector: personal_data
        kinds: [phone]
        action: redact
        stages: [tool_arguments]
      - detector: deny_list
        name: destructive
        patterns: ['(?i)\bdrop\s+table\b']
        action: require_approval
        stages: [input]
      - detector: deny_list
        name: forbidden
        patterns: ['(?i)\bforbidden-word\b']
        action: block
        stages: [tool_arguments]
      - detector: deny_list
        name: review-call
        patterns: ['(?i)\bneeds-review\b']
        action: require_approval
        stages: [tool_arguments]
      - detector: deny_list
        name: review-answer
        patterns: ['(?i)\bhold-this-answer\b']
        action: require_approval
        stages: [output]
"""

SECRET = "AKIA" + "QWERTYUIOPASDFGH"
EMAIL = "jane.doe.guardrails@example.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    with nats_server_or_skip(tmp_path_factory.mktemp("guardrails-nats")) as nats:
        yield nats


@pytest_asyncio.fixture(scope="module")
async def guarded(
    server: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[NatsClient, list[BusService], Path]]:
    root = tmp_path_factory.mktemp("guardrails")
    (root / "agents").mkdir()
    (root / "agents" / "guarded.yaml").write_text(AGENT, encoding="utf-8")
    (root / "agents" / "judged.yaml").write_text(JUDGED, encoding="utf-8")
    (root / "agents" / "streamed.yaml").write_text(STREAMED, encoding="utf-8")
    (root / "guardrails.yaml").write_text(POLICIES, encoding="utf-8")
    traces = root / "traces.jsonl"
    nc = await connect_nats(server.url, "guardrails-test")
    await apply_topology(nc.jetstream())
    services: list[BusService] = [
        create_runner(
            RunnerSettings(
                nats_url=server.url,
                agents_dir=root / "agents",
                tools_dir=REPO_ROOT / "tools",
                memory_dir=root / "no-memory",
                routing_file=root / "no-routing.yaml",
                guardrails_file=root / "guardrails.yaml",
                budgets_enabled=False,
                drain_timeout_seconds=2,
            )
        ),
        create_worker(WorkerSettings(nats_url=server.url, drain_timeout_seconds=2)),
        create_executor(
            ExecutorSettings(
                nats_url=server.url,
                tools_dir=REPO_ROOT / "tools",
                approvers_file=REPO_ROOT / "config" / "approvers.yaml",
                database_url=f"sqlite+aiosqlite:///{root / 'tool-executor.db'}",
                drain_timeout_seconds=2,
            )
        ),
        create_trace_exporter(
            TraceExporterSettings(
                nats_url=server.url,
                jsonl_path=traces,
                ledger_path=root / "ledger.sqlite3",
                flush_interval_seconds=0.2,
                drain_timeout_seconds=2,
            )
        ),
    ]
    for service in services:
        await service.start()
    try:
        yield nc, services, traces
    finally:
        for service in services:
            await service.stop()
        await nc.close()


async def _run(nc: NatsClient, text: str, task_id: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    task_id = task_id or new_task_id("guarded")
    await publish_submission(nc, submission(task_id, agent="guarded", text=text), submitter="carol")
    return task_id, await task_events(nc, task_id, timeout=30)


async def _first(nc: NatsClient, task_id: str, kind: str) -> dict[str, Any]:
    return await first_message(nc, f"agentbus.tasks.events.acme.{task_id}", lambda e: e["kind"] == kind, timeout=30)


def _guardrail_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "guardrail"]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


async def _trace_of(path: Path, marker: str, kinds: set[str]) -> list[dict[str, Any]]:
    """The spans of the trace whose task span mentions `marker`, once spans of every one of `kinds` are there."""
    async with asyncio.timeout(20):
        while True:
            await asyncio.sleep(0.2)
            spans = [json.loads(line) for line in _read(path).splitlines() if line.strip()]
            roots = [s for s in spans if s["kind"] == "task" and marker in json.dumps(s["attributes"])]
            if not roots:
                continue
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if kinds <= {s["kind"] for s in trace} | {s["name"] for s in trace}:
                return trace


async def _ticket_titles(services: list[BusService], task_id: str) -> list[str]:
    executor = next(s for s in services if isinstance(s, ToolExecutorApp))
    rows = await executor.store.query(sa.select(tickets.c.title).where(tickets.c.task_id == task_id))
    return [str(row[0]) for row in rows]


async def test_a_secret_in_the_input_fails_the_task_guardrail_blocked_naming_the_rule(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, services, _ = guarded
    runner = services[0]
    labels = {"policy": "test-policy", "detector": "secrets", "action": "block", "stage": "input"}
    before = runner.registry.get_sample_value("agentbus_guardrail_findings_total", labels) or 0.0
    _, events = await _run(nc, f"deploy with key {SECRET} please")
    assert [e["kind"] for e in events] == ["accepted", "guardrail", "failed"]
    [finding] = events[1]["findings"]
    assert (finding["policy"], finding["detector"], finding["kind"], finding["action"]) == (
        "test-policy",
        "secrets",
        "aws_access_key",
        "block",
    )
    assert events[1]["stage"] == "input"
    assert events[-1]["error"]["code"] == "guardrail_blocked"
    assert "test-policy/secrets" in events[-1]["error"]["message"]
    assert SECRET not in json.dumps(events)
    assert runner.registry.get_sample_value("agentbus_guardrail_findings_total", labels) == before + 1
    line = describe(TASK_EVENT_ADAPTER.validate_python(events[1]))
    assert line.endswith("input block: test-policy/secrets:aws_access_key"), line


async def test_a_redacted_email_appears_nowhere_in_events_logs_or_the_trace(
    guarded: tuple[NatsClient, list[BusService], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    nc, services, traces = guarded
    configure_logging("INFO", "guardrails-test")  # as a service logs, whatever an earlier test configured
    task_id = new_task_id("redacted")
    text = f'Customer {EMAIL} of {task_id}: create_ticket(title="printer jam for {EMAIL}", priority="low")'
    _, events = await _run(nc, text, task_id)
    assert events[-1]["kind"] == "completed", events[-1]
    assert "[REDACTED:email]" in events[-1]["output"]
    [guardrail] = _guardrail_events(events)
    assert (guardrail["stage"], guardrail["action"]) == ("input", "redact")
    assert await _ticket_titles(services, task_id) == ["printer jam for [REDACTED:email]"]
    spans = await _trace_of(traces, task_id, {"task", "generation", "tool", "guardrail input"})
    guardrail_span = next(s for s in spans if s["name"] == "guardrail input")
    assert guardrail_span["attributes"]["agentbus.guardrail.action"] == "redact"
    everything = json.dumps(events) + _read(traces)
    logged = capfd.readouterr()
    everything += logged.out + logged.err
    assert "guardrail_findings" in everything, "the finding was logged"
    assert EMAIL not in everything


async def test_an_output_that_guardrails_check_is_neither_streamed_nor_traced_before_its_check(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, _, traces = guarded
    email = "answer.only.guardrails@example.com"  # checked in the answer only: the input keeps it
    task_id = new_task_id("streamed")
    await publish_submission(nc, submission(task_id, agent="streamed", text=f"write to {email}"), submitter="carol")
    events = await task_events(nc, task_id, timeout=30)
    assert events[-1]["kind"] == "completed", events[-1]
    assert email not in events[-1]["output"]
    assert "[REDACTED:email]" in events[-1]["output"]
    # The agent asks for tokens, but what its guardrails check first is never streamed past them.
    assert "token" not in {e["kind"] for e in events}
    spans = await _trace_of(traces, task_id, {"task", "generation"})
    generation = next(s for s in spans if s["kind"] == "generation")
    assert SpanAttribute.OUTPUT not in generation["attributes"], generation  # the prompt (with the input) stays
    assert generation["attributes"][SpanAttribute.OUTPUT_TOKENS] > 0, "its token counts are kept"
    outputs = [s["attributes"].get(key) for s in spans for key in (SpanAttribute.OUTPUT, "langfuse.trace.output")]
    assert "[REDACTED:email]" in json.dumps(outputs)
    assert email not in json.dumps(outputs), "no span's output holds the checked text whole"


async def test_redacted_tool_arguments_reach_the_tool_and_the_events_masked(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, services, _ = guarded
    task_id, events = await _run(nc, 'create_ticket(title="call back +1 415 555 0100 today", priority="low")')
    assert events[-1]["kind"] == "completed", events[-1]
    [guardrail] = _guardrail_events(events)
    assert (guardrail["stage"], guardrail["action"]) == ("tool_arguments", "redact")
    assert [(f["tool"], f["field"], f["kind"]) for f in guardrail["findings"]] == [("create_ticket", "title", "phone")]
    step = next(e for e in events if e["kind"] == "step" and e["tool_calls"])
    assert step["tool_calls"][0]["arguments"]["title"] == "call back [REDACTED:phone] today"
    assert await _ticket_titles(services, task_id) == ["call back [REDACTED:phone] today"]


async def test_a_blocked_tool_call_never_runs_and_the_model_reads_why(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, services, _ = guarded
    task_id, events = await _run(nc, 'create_ticket(title="forbidden-word in the title", priority="low")')
    assert events[-1]["kind"] == "completed", events[-1]
    [guardrail] = _guardrail_events(events)
    assert (guardrail["stage"], guardrail["action"]) == ("tool_arguments", "block")
    assert "guardrail_blocked" in events[-1]["output"] or "guardrails block" in events[-1]["output"]
    assert await _ticket_titles(services, task_id) == []


async def test_a_held_tool_call_of_a_tool_that_needs_no_approval_waits_for_an_approver(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, services, _ = guarded
    task_id = new_task_id("held-call")
    text = 'create_ticket(title="needs-review: printer", priority="low")'
    await publish_submission(nc, submission(task_id, agent="guarded", text=text), submitter="carol")
    pending = await _first(nc, task_id, "approval_pending")
    request = await approval_request(nc, pending["approval_id"])
    assert request["tool"] == "create_ticket"
    assert "test-policy/review-call" in request["reason"]
    assert await _ticket_titles(services, task_id) == []
    await decide(nc, request, "alice", "approve")
    events = await task_events(nc, task_id, timeout=30)
    assert events[-1]["kind"] == "completed", events[-1]
    assert await _ticket_titles(services, task_id) == ["needs-review: printer"]


async def test_an_input_held_for_review_runs_once_approved_and_fails_once_denied(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, _, _ = guarded
    outcomes = {}
    for decision in ("approve", "deny"):
        task_id = new_task_id(f"held-input-{decision}")
        payload = submission(task_id, agent="guarded", text="please DROP TABLE orders")
        await publish_submission(nc, payload, submitter="carol")
        pending = await _first(nc, task_id, "approval_pending")
        request = await approval_request(nc, pending["approval_id"])
        assert request["tool"] == "guardrail_review"
        assert request["arguments"]["stage"] == "input"
        assert "test-policy/destructive" in request["reason"]
        await decide(nc, request, "bob", decision, reason="checked")
        outcomes[decision] = await task_events(nc, task_id, timeout=30)
    approved, denied = outcomes["approve"], outcomes["deny"]
    assert approved[-1]["kind"] == "completed", approved[-1]
    assert "DROP TABLE" in approved[-1]["output"]
    assert [e["kind"] for e in denied][-3:] == ["approval_pending", "approval_resolved", "failed"]
    assert denied[-1]["error"]["code"] == "guardrail_blocked"
    assert "denied by bob" in denied[-1]["error"]["message"]


async def test_an_answer_held_for_review_is_released_by_an_approver(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    nc, _, _ = guarded
    task_id = new_task_id("held-answer")
    payload = submission(task_id, agent="guarded", text="say hold-this-answer to the customer")
    await publish_submission(nc, payload, submitter="carol")
    pending = await _first(nc, task_id, "approval_pending")
    request = await approval_request(nc, pending["approval_id"])
    assert (request["tool"], request["arguments"]["stage"]) == ("guardrail_review", "output")
    await decide(nc, request, "alice", "approve")
    events = await task_events(nc, task_id, timeout=30)
    assert events[-1]["kind"] == "completed", events[-1]
    assert "hold-this-answer" in events[-1]["output"]
    [guardrail] = _guardrail_events(events)
    assert (guardrail["stage"], guardrail["action"]) == ("output", "require_approval")


async def test_a_classifier_model_judges_input_and_answer_costed_and_traced(
    guarded: tuple[NatsClient, list[BusService], Path],
) -> None:
    """The `scripted` engine restates what it is given, so as a classifier it flags a text that says FLAG."""
    nc, _, traces = guarded
    task_id = new_task_id("judged")
    await publish_submission(nc, submission(task_id, agent="judged", text=f"hello from {task_id}"), submitter="carol")
    events = await task_events(nc, task_id, timeout=30)
    assert [e["kind"] for e in events] == ["accepted", "step", "completed"], events
    step_tokens = events[1]["usage"]["prompt_tokens"] + events[1]["usage"]["completion_tokens"]
    run_tokens = events[-1]["usage"]["prompt_tokens"] + events[-1]["usage"]["completion_tokens"]
    assert run_tokens > step_tokens, "the classifiers' tokens count with the task"
    spans = await _trace_of(traces, task_id, {"task", "generation"})
    async with asyncio.timeout(20):
        while len([s for s in spans if s["kind"] == "generation"]) < 3:
            await asyncio.sleep(0.2)
            spans = await _trace_of(traces, task_id, {"task", "generation"})
    generations = [s for s in spans if s["kind"] == "generation"]
    assert len(generations) == 3, [g["name"] for g in generations]  # input judged, the step, the answer judged

    flagged = new_task_id("judged")
    text = f"FLAG: rude (ref {flagged})"
    await publish_submission(nc, submission(flagged, agent="judged", text=text), submitter="carol")
    events = await task_events(nc, flagged, timeout=30)
    assert [e["kind"] for e in events] == ["accepted", "guardrail", "failed"], events
    [finding] = events[1]["findings"]
    assert (finding["policy"], finding["check"], finding["detector"], finding["kind"]) == (
        "tone",
        "civility",
        "model",
        "model:rude",
    )
    assert events[-1]["error"]["code"] == "guardrail_blocked"
    assert events[-1]["usage"]["prompt_tokens"] > 0, "the classification is costed"
