"""A full agent run, with an approval, becomes one connected trace written by the real trace-exporter."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agentbus.runtime.service import BusService
from agentbus.trace_exporter.settings import TraceExporterSettings
from helpers import approval_request, decide, first_event, new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient


def _traces_file(suite: list[BusService]) -> Path:
    settings = next(s.settings for s in suite if isinstance(s.settings, TraceExporterSettings))
    assert isinstance(settings, TraceExporterSettings)
    return settings.jsonl_path


def _spans_of_task(path: Path, marker: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    spans = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    roots = [s for s in spans if s["kind"] == "task" and marker in json.dumps(s["attributes"])]
    if not roots:
        return []
    trace_id = roots[0]["trace_id"]
    return [s for s in spans if s["trace_id"] == trace_id]


async def test_an_approved_run_is_one_connected_trace_with_every_kind_of_span(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    task_id = new_task_id("traced")
    text = f'Incident {task_id}: create_ticket(title="disk full", priority="high")'
    await publish_submission(nats_client, submission(task_id, agent="ops", text=text), submitter="carol")
    pending = await first_event(nats_client, task_id, "approval_pending")
    await decide(nats_client, await approval_request(nats_client, pending["approval_id"]), "bob", "approve")
    assert (await task_events(nats_client, task_id))[-1]["kind"] == "completed"

    expected_kinds = {"task", "agent_step", "generation", "tool", "approval_wait"}
    spans: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while {s["kind"] for s in spans} < expected_kinds or len({s["span_id"] for s in spans}) < 7:
            await asyncio.sleep(0.2)
            spans = _spans_of_task(_traces_file(suite), task_id)

    ids = [s["span_id"] for s in spans]
    assert len(ids) == len(set(ids)), "a span was exported twice"
    roots = [s for s in spans if s["parent_span_id"] not in set(ids)]
    assert [r["kind"] for r in roots] == ["task"], f"orphans: {[(r['kind'], r['name']) for r in roots]}"
    assert roots[0]["parent_span_id"] is None
    by_id = {s["span_id"]: s for s in spans}
    for span in spans:
        if span["kind"] in {"generation", "tool", "approval_wait"}:
            assert by_id[span["parent_span_id"]]["kind"] == "agent_step", span
    assert {s["service"] for s in spans} >= {"agent-runner", "inference-worker", "tool-executor"}
