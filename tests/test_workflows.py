"""Workflows over the real bus: the workflow-orchestrator with the real runner, worker, tool-executor and
trace-exporter of the session. The research-report sample, retries, `onStepFailure` each way, a step waiting on
an approval, the overall timeout, each concurrency policy, cancel mid-run, one trace per run, and the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from agentbus.contracts.workflows import WorkflowCancelRequested, WorkflowSubmitted
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.trace_exporter.settings import TraceExporterSettings
from agentbus.workflow_orchestrator.app import create_app
from agentbus.workflow_orchestrator.service import run_span_id, step_span_id
from agentbus.workflow_orchestrator.settings import OrchestratorSettings
from cli_support import agentbus
from helpers import AGENTS_DIR, REPO_ROOT, approval_request, decide, task_events
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

TERMINAL = {"rejected", "completed", "failed", "cancelled"}
SUBMITTER = "acme-app"
TICKET_STEP = {
    "name": "ticket",
    "agent": "ops",
    "input": 'create_ticket(title="{{ .input.title }}", priority="high")',
    "output": [{"name": "answer", "path": ".result"}],
}
TEST_WORKFLOWS: dict[str, dict[str, Any]] = {
    # `assistant` stops after 6 steps; seven written calls make every attempt fail with step_limit_exceeded.
    "retried": {
        "input": [{"name": "n", "type": "integer", "default": 7}],
        "steps": [
            {
                "name": "count",
                "agent": "assistant",
                "input": " then ".join(f"calculator({i}+1)" for i in range(7)),
                "retries": 2,
            }
        ],
    },
    "retry-policy": {
        "steps": [{"name": "a", "agent": "echo", "input": "hello", "output": [{"name": "x", "path": ".result.nope"}]}],
        "errorHandling": {"onStepFailure": "retry", "maxRetries": 1},
    },
    "fail-policy": {
        "steps": [
            {"name": "a", "agent": "echo", "input": "hello", "output": [{"name": "x", "path": ".result.nope"}]},
            {**TICKET_STEP, "input": 'create_ticket(title="fail-policy", priority="high")'},
        ],
        "errorHandling": {"onStepFailure": "fail"},
    },
    "continue-policy": {
        "steps": [
            {"name": "a", "agent": "echo", "input": "hello", "output": [{"name": "x", "path": ".result.nope"}]},
            {"name": "b", "agent": "echo", "dependsOn": ["a"], "input": "{{ .steps.a.output.x }}"},
            {"name": "c", "agent": "echo", "input": "independent", "output": [{"name": "y", "path": ".result"}]},
        ],
        "output": {"c": "{{ .steps.c.output.y }}", "a": "{{ .steps.a.output.x }}"},
        "errorHandling": {"onStepFailure": "continue"},
    },
    "ticket": {
        "input": [{"name": "title", "required": True}],
        "steps": [TICKET_STEP],
        "output": {"answer": "{{ .steps.ticket.output.answer }}"},
    },
    "ticket-timeout": {"input": [{"name": "title", "required": True}], "steps": [TICKET_STEP], "timeout": "2s"},
    **{
        f"one-at-a-time-{policy}": {
            "input": [{"name": "title", "required": True}],
            "steps": [TICKET_STEP],
            "concurrency": {"maxConcurrent": 1, "policy": policy},
        }
        for policy in ("queue", "reject", "replace")
    },
}


@pytest_asyncio.fixture(scope="module")
async def orchestrator(
    bootstrapped_nats: NatsServerProcess, suite: list[BusService], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BusService]:
    """The workflow-orchestrator beside the session's suite: the sample workflows and this module's own."""
    folder = tmp_path_factory.mktemp("workflows")
    shutil.copy(REPO_ROOT / "workflows" / "research-report.yaml", folder)
    for name, body in TEST_WORKFLOWS.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **body}), encoding="utf-8")
    app = create_app(
        OrchestratorSettings(
            nats_url=bootstrapped_nats.url, workflows_dir=folder, agents_dir=AGENTS_DIR, drain_timeout_seconds=2
        )
    )
    await app.start()
    yield app
    await app.stop()


pytestmark = pytest.mark.usefixtures("orchestrator")


def _run_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _submit(nc: NatsClient, workflow: str, run_id: str, **fields: Any) -> None:
    body = WorkflowSubmitted(run_id=run_id, tenant="acme", workflow=workflow, **fields)
    await nc.jetstream().publish(
        f"agentbus.workflows.submit.acme.{SUBMITTER}", body.model_dump_json().encode(), headers={"Nats-Msg-Id": run_id}
    )


async def _cancel(nc: NatsClient, run_id: str, reason: str) -> None:
    request = WorkflowCancelRequested(run_id=run_id, tenant="acme", reason=reason)
    await nc.jetstream().publish(f"agentbus.workflows.cancel.acme.{SUBMITTER}", request.model_dump_json().encode())


async def _events(nc: NatsClient, run_id: str, until: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
    """A run's events from seq 1 up to its terminal event (or the first of kind `until`)."""
    sub = await nc.jetstream().subscribe(
        f"agentbus.workflows.events.acme.{run_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not events or events[-1]["kind"] not in (TERMINAL if until is None else {until, *TERMINAL}):
                events.append(json.loads((await sub.next_msg(timeout=timeout)).data))
    finally:
        await sub.unsubscribe()
    return events


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['kind']}:{e['step']}" if "step" in e else e["kind"] for e in events]


async def _approve(nc: NatsClient, waiting: dict[str, Any]) -> None:
    await decide(nc, await approval_request(nc, waiting["approval_id"]), "alice", "approve")


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


async def test_the_research_report_runs_its_analyses_in_parallel_and_assembles_its_outputs(
    nats_client: NatsClient,
) -> None:
    run_id = _run_id("report")
    await _submit(nats_client, "research-report", run_id, input={"topic": "AI agents in 2026", "depth": "deep"})
    events = await _events(nats_client, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert _kinds(events)[0] == "accepted"
    assert _kinds(events)[-1] == "completed"
    started = {e["step"]: e for e in events if e["kind"] == "step_started"}
    completed = {e["step"]: e for e in events if e["kind"] == "step_completed"}
    assert (
        set(started) == set(completed) == {"research", "analyze-trends", "analyze-sentiment", "write-report", "review"}
    )
    assert all(e["attempt"] == 1 for e in started.values())
    trends, sentiment = "analyze-trends", "analyze-sentiment"
    # The analyses overlap in time: each started before the other completed.
    assert started[trends]["seq"] < completed[sentiment]["seq"]
    assert started[sentiment]["seq"] < completed[trends]["seq"]
    assert _at(started[trends]) <= _at(completed[sentiment])
    assert _at(started[sentiment]) <= _at(completed[trends])
    assert started[trends]["seq"] > completed["research"]["seq"]
    assert started["write-report"]["seq"] > max(completed[trends]["seq"], completed[sentiment]["seq"])
    outputs = events[-1]["outputs"]
    assert outputs["metadata"]["research_sources"] == ["web", "academic", "news"]
    assert outputs["metadata"]["analysis_summary"] == "trend and sentiment analyses of AI agents in 2026"
    report = outputs["report"]
    assert report["format"] == "markdown"
    assert report["research"]["topic"] == "AI agents in 2026"
    assert report["trends"]["analysis_type"] == "trend"
    assert report["sentiment"]["analysis_type"] == "sentiment"
    # Each step is an ordinary task of its own, with its own events.
    for step in started.values():
        task = await task_events(nats_client, step["task_id"])
        assert [e["kind"] for e in task] == ["accepted", "step", "completed"]
        assert task[0]["agent"] == step["agent"]


async def test_the_run_budget_is_shared_among_its_steps_tasks_and_its_cost_is_theirs(nats_client: NatsClient) -> None:
    run_id = _run_id("budget")
    await _submit(nats_client, "research-report", run_id, input={"topic": "budgets"}, budget_usd=1.0)
    events = await _events(nats_client, run_id)
    assert events[0]["budget_usd"] == 1.0
    started = {e["step"]: e for e in events if e["kind"] == "step_started"}
    # Five steps to start: the first gets a fifth; nothing was spent (scripted is free), so each analysis
    # gets a quarter of the rest, and so on.
    assert started["research"]["budget_usd"] == pytest.approx(0.2)
    assert started["analyze-trends"]["budget_usd"] == pytest.approx(0.25)
    assert started["analyze-sentiment"]["budget_usd"] == pytest.approx(0.25)
    for step in started.values():
        accepted = (await task_events(nats_client, step["task_id"]))[0]
        assert accepted["budget_usd"] == pytest.approx(step["budget_usd"]), "the task runs under its share"
    steps_cost = sum(e["cost_usd"] for e in events if e["kind"] == "step_completed")
    assert events[-1]["cost_usd"] == pytest.approx(steps_cost)


async def test_a_failing_step_is_retried_as_a_new_task_each_time_then_the_run_fails(nats_client: NatsClient) -> None:
    run_id = _run_id("retried")
    await _submit(nats_client, "retried", run_id)
    events = await _events(nats_client, run_id)
    assert _kinds(events) == [
        "accepted",
        *["step_started:count", "step_failed:count"] * 3,
        "failed",
    ]
    failures = [e for e in events if e["kind"] == "step_failed"]
    assert [f["will_retry"] for f in failures] == [True, True, False]
    assert all("step_limit_exceeded" in f["error"]["message"] for f in failures)
    tasks = [e["task_id"] for e in events if e["kind"] == "step_started"]
    assert len(set(tasks)) == 3
    for task_id in tasks:
        assert (await task_events(nats_client, task_id))[-1]["error"]["code"] == "step_limit_exceeded"
    assert events[-1]["error"]["code"] == "step_failed"
    assert "failed after 3 attempts" in events[-1]["error"]["message"]


async def test_on_step_failure_retry_gives_steps_max_retries_then_fails_the_run(nats_client: NatsClient) -> None:
    run_id = _run_id("retry-policy")
    await _submit(nats_client, "retry-policy", run_id)
    events = await _events(nats_client, run_id)
    assert _kinds(events) == [
        "accepted",
        "step_started:a",
        "step_failed:a",
        "step_started:a",
        "step_failed:a",
        "failed",
    ]
    assert events[2]["error"]["code"] == "output_missing"


async def test_on_step_failure_fail_ends_the_run_and_cancels_the_step_still_running(nats_client: NatsClient) -> None:
    run_id = _run_id("fail-policy")
    await _submit(nats_client, "fail-policy", run_id)
    events = await _events(nats_client, run_id)
    assert _kinds(events)[:3] == ["accepted", "step_started:a", "step_started:ticket"]
    assert _kinds(events)[-2:] == ["step_failed:a", "failed"]
    ticket = next(e for e in events if e["kind"] == "step_started" and e["step"] == "ticket")
    cancelled = await task_events(nats_client, ticket["task_id"])
    assert cancelled[-1]["kind"] == "cancelled"
    assert cancelled[-1]["by"] == SUBMITTER


async def test_on_step_failure_continue_skips_dependents_and_completes_the_rest(nats_client: NatsClient) -> None:
    run_id = _run_id("continue")
    await _submit(nats_client, "continue-policy", run_id)
    events = await _events(nats_client, run_id)
    kinds = _kinds(events)
    assert kinds[0] == "accepted"
    assert kinds[-1] == "completed"
    assert sorted(kinds[1:-1]) == sorted(
        ["step_started:a", "step_started:c", "step_failed:a", "step_skipped:b", "step_completed:c"]
    )
    completed = events[-1]
    assert completed["failed_steps"] == ["a"]
    assert completed["skipped_steps"] == ["b"]
    assert completed["outputs"]["a"] is None
    assert "independent" in completed["outputs"]["c"]


async def test_a_step_waiting_on_an_approval_holds_the_run_until_it_is_approved(nats_client: NatsClient) -> None:
    run_id = _run_id("approval")
    await _submit(nats_client, "ticket", run_id, input={"title": f"disk full {run_id}"})
    waiting = (await _events(nats_client, run_id, until="step_waiting"))[-1]
    assert waiting["kind"] == "step_waiting"
    assert waiting["tool"] == "create_ticket"
    request = await approval_request(nats_client, waiting["approval_id"])
    assert request["requested_by"] == SUBMITTER, "the step's task was submitted as the run's submitter"
    assert request["arguments"]["title"] == f"disk full {run_id}"
    await _approve(nats_client, waiting)
    events = await _events(nats_client, run_id)
    assert _kinds(events) == [
        "accepted",
        "step_started:ticket",
        "step_waiting:ticket",
        "step_completed:ticket",
        "completed",
    ]
    assert f"disk full {run_id}" in events[-1]["outputs"]["answer"]


async def test_the_overall_timeout_fails_the_run_and_cancels_its_waiting_step(nats_client: NatsClient) -> None:
    run_id = _run_id("timeout")
    await _submit(nats_client, "ticket-timeout", run_id, input={"title": "never approved"})
    events = await _events(nats_client, run_id)
    assert _kinds(events)[-1] == "failed"
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    started = next(e for e in events if e["kind"] == "step_started")
    task = await task_events(nats_client, started["task_id"])
    assert task[-1]["kind"] == "cancelled"


async def test_cancel_mid_run_stops_the_run_and_its_running_step(nats_client: NatsClient) -> None:
    run_id = _run_id("cancel")
    await _submit(nats_client, "ticket", run_id, input={"title": "to be cancelled"})
    waiting = (await _events(nats_client, run_id, until="step_waiting"))[-1]
    await _cancel(nats_client, run_id, "changed my mind")
    events = await _events(nats_client, run_id)
    assert _kinds(events) == ["accepted", "step_started:ticket", "step_waiting:ticket", "cancelled"]
    assert (events[-1]["by"], events[-1]["reason"]) == (SUBMITTER, "changed my mind")
    task = await task_events(nats_client, waiting["task_id"])
    assert task[-1]["kind"] == "cancelled"
    await _cancel(nats_client, run_id, "again")
    await asyncio.sleep(0.5)
    assert len(await _events(nats_client, run_id)) == len(events), "a run ends once"


async def test_the_queue_policy_starts_a_run_beyond_the_limit_when_a_slot_frees(nats_client: NatsClient) -> None:
    first, second = _run_id("queue-a"), _run_id("queue-b")
    await _submit(nats_client, "one-at-a-time-queue", first, input={"title": "first"})
    waiting = (await _events(nats_client, first, until="step_waiting"))[-1]
    await _submit(nats_client, "one-at-a-time-queue", second, input={"title": "second"})
    assert _kinds(await _events(nats_client, second, until="queued")) == ["accepted", "queued"]
    await _approve(nats_client, waiting)
    assert _kinds(await _events(nats_client, first))[-1] == "completed"
    behind = (await _events(nats_client, second, until="step_waiting"))[-1]
    await _approve(nats_client, behind)
    assert _kinds(await _events(nats_client, second)) == [
        "accepted",
        "queued",
        "step_started:ticket",
        "step_waiting:ticket",
        "step_completed:ticket",
        "completed",
    ]


async def test_the_reject_policy_refuses_a_run_beyond_the_limit(nats_client: NatsClient) -> None:
    first, second = _run_id("reject-a"), _run_id("reject-b")
    await _submit(nats_client, "one-at-a-time-reject", first, input={"title": "first"})
    await _events(nats_client, first, until="step_waiting")
    await _submit(nats_client, "one-at-a-time-reject", second, input={"title": "second"})
    [rejected] = await _events(nats_client, second)
    assert rejected["kind"] == "rejected"
    assert rejected["error"]["code"] == "concurrency_limit"
    await _cancel(nats_client, first, "done with the test")
    assert _kinds(await _events(nats_client, first))[-1] == "cancelled"
    third = _run_id("reject-c")
    await _submit(nats_client, "one-at-a-time-reject", third, input={"title": "third"})
    assert _kinds(await _events(nats_client, third, until="step_waiting"))[-1] == "step_waiting:ticket"
    await _cancel(nats_client, third, "done with the test")


async def test_the_replace_policy_cancels_the_oldest_run_for_the_new_one(nats_client: NatsClient) -> None:
    first, second = _run_id("replace-a"), _run_id("replace-b")
    await _submit(nats_client, "one-at-a-time-replace", first, input={"title": "first"})
    waiting = (await _events(nats_client, first, until="step_waiting"))[-1]
    await _submit(nats_client, "one-at-a-time-replace", second, input={"title": "second"})
    replaced = await _events(nats_client, first)
    assert replaced[-1]["kind"] == "cancelled"
    assert replaced[-1]["reason"] == f"replaced by run {second} (concurrency policy: replace)"
    assert (await task_events(nats_client, waiting["task_id"]))[-1]["kind"] == "cancelled"
    newer = (await _events(nats_client, second, until="step_waiting"))[-1]
    await _approve(nats_client, newer)
    assert _kinds(await _events(nats_client, second))[-1] == "completed"


async def test_a_run_is_one_trace_with_each_steps_task_trace_beneath_it(
    nats_client: NatsClient, suite: list[BusService]
) -> None:
    run_id = _run_id("traced")
    await _submit(nats_client, "research-report", run_id, input={"topic": "traces"})
    events = await _events(nats_client, run_id)
    tasks = {e["step"]: e["task_id"] for e in events if e["kind"] == "step_started"}
    settings = next(s.settings for s in suite if isinstance(s.settings, TraceExporterSettings))
    assert isinstance(settings, TraceExporterSettings)
    root_id = run_span_id("acme", run_id)
    spans: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(20):
        while True:
            lines = settings.jsonl_path.read_text(encoding="utf-8").splitlines() if settings.jsonl_path.exists() else []
            spans = {s["span_id"]: s for s in map(json.loads, lines)}
            roots = {s["attributes"].get("agentbus.task_id"): s for s in spans.values() if s["kind"] == "task"}
            if root_id in spans and set(tasks.values()) <= set(roots):
                break
            await asyncio.sleep(0.2)
    root = spans[root_id]
    assert root["parent_span_id"] is None
    assert root["name"] == "workflow research-report"
    for step, task_id in tasks.items():
        step_span = spans[step_span_id("acme", run_id, step)]
        assert step_span["parent_span_id"] == root_id
        assert step_span["trace_id"] == root["trace_id"]
        task_root = roots[task_id]
        assert task_root["trace_id"] == root["trace_id"], f"{step}'s task is in the run's trace"
        assert task_root["parent_span_id"] == step_span["span_id"]


async def test_the_cli_lists_runs_and_shows_a_workflow(bootstrapped_nats: NatsServerProcess) -> None:
    url = bootstrapped_nats.url
    with tempfile.TemporaryDirectory() as empty:
        cwd = Path(empty)
        listed = await asyncio.to_thread(agentbus, "workflows", "list", "--nats-url", url, cwd=cwd)
        assert listed.returncode == 0, listed.stderr
        assert "research-report: Researches a topic" in listed.stdout
        assert "step write-report: agent writer-agent after analyze-trends, analyze-sentiment" in listed.stdout
        run_id = _run_id("cli")
        ran = await asyncio.to_thread(
            agentbus,
            "run-workflow", "research-report", "--input", "topic=CLI runs", "--run-id", run_id, "--wait",
            "--nats-url", url, cwd=cwd, timeout=120,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        lines = ran.stdout.splitlines()
        assert lines[0].split()[:2] == ["1", "accepted"]
        assert any(line.split()[1:3] == ["step_started", "analyze-trends"] for line in lines[:10])
        assert '"research_sources": [' in ran.stdout
        shown = await asyncio.to_thread(agentbus, "workflows", "status", run_id, "--nats-url", url, cwd=cwd)
        assert shown.returncode == 0, shown.stderr
        assert f"run {run_id}  workflow research-report  phase Succeeded" in shown.stdout
        rows = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines()[2:7]}
        assert rows == dict.fromkeys(
            ("research", "analyze-trends", "analyze-sentiment", "write-report", "review"), "Succeeded"
        )
        bad = await asyncio.to_thread(
            agentbus, "run-workflow", "research-report", "--input", "colour=red", "--nats-url", url, cwd=cwd
        )
        assert bad.returncode == 2, bad.stderr
        assert "has no input 'colour'" in bad.stderr


async def test_a_submission_for_another_tenant_or_identity_is_rejected(nats_client: NatsClient) -> None:
    run_id = _run_id("mismatch")
    body = WorkflowSubmitted(run_id=run_id, tenant="globex", workflow="ticket", input={"title": "x"})
    await nats_client.jetstream().publish(
        f"agentbus.workflows.submit.acme.{SUBMITTER}", body.model_dump_json().encode()
    )
    [rejected] = await _events(nats_client, run_id)
    assert rejected["error"]["code"] == "tenant_mismatch"
    other = _run_id("impostor")
    await _submit(nats_client, "ticket", other, input={"title": "x"}, submitted_by="bob")
    [refused] = await _events(nats_client, other)
    assert refused["error"]["code"] == "identity_mismatch"
