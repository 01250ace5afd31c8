"""Use cases over in-memory ports: the orchestrator killed before every single effect still finishes each run
exactly once, submits each step's task once, keeps seq gap-free and gives every concurrency slot back."""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentbus.contracts.common import TokenUsage
from agentbus.contracts.registry import TASK_SUBMIT, WORKFLOW_ADMISSION, WORKFLOW_EVENT
from agentbus.contracts.tasks import TaskCompleted, TaskEvent, TaskSubmitted
from agentbus.contracts.workflows import (
    WORKFLOW_EVENT_ADAPTER,
    WorkflowAdmission,
    WorkflowEventKind,
    WorkflowSubmitted,
)
from agentbus.workflow_orchestrator.ports import RunRecord, SlotsRecord
from agentbus.workflow_orchestrator.service import OrchestratorMetrics, OrchestratorService, slots_key
from agentbus.workflow_orchestrator.specs import WorkflowSpec, load_agent_names, load_workflow_specs
from orchestrator_fakes import CrashError, Effects, FakePublisher, FakeRecordStore, FakeStepIndex
from prometheus_client import CollectorRegistry

REPO_ROOT = Path(__file__).resolve().parents[3]
WORKFLOWS = load_workflow_specs(REPO_ROOT / "workflows", load_agent_names(REPO_ROOT / "agents"))
SINGLE = WorkflowSpec.model_validate(
    {
        "name": "single",
        "steps": [{"name": "only", "agent": "echo", "input": "hello", "output": [{"name": "x", "path": ".result"}]}],
        "concurrency": {"maxConcurrent": 1, "policy": "queue"},
    }
)

Input = tuple[str, Any]


@dataclass
class World:
    """The orchestrator's stores and the bus, which outlive any orchestrator process; and a runner that
    answers each step task once, restating its input the way the scripted engine does."""

    effects: Effects = field(default_factory=Effects)
    answered: set[str] = field(default_factory=set)
    admitted: set[str] = field(default_factory=set)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.runs: FakeRecordStore[RunRecord] = FakeRecordStore(self.effects)
        self.slots: FakeRecordStore[SlotsRecord] = FakeRecordStore(self.effects)
        self.index = FakeStepIndex(self.effects)
        self.publisher = FakePublisher(self.effects)
        self.nonces = iter(range(10_000))

    def orchestrator(self) -> OrchestratorService:
        """A fresh process: nothing in memory survives from the last one."""
        return OrchestratorService(
            self.runs,
            self.slots,
            self.index,
            self.publisher,
            {**WORKFLOWS, SINGLE.name: SINGLE},
            OrchestratorMetrics(CollectorRegistry()),
            nonce=lambda: f"n{next(self.nonces)}",
        )

    async def deliver(self, message: Input) -> None:
        service = self.orchestrator()
        kind, body = message
        if kind == "submit":
            await service.submit(body, None)
        elif kind == "task":
            await service.task_event("acme", body)
        else:
            await service.admission(body)

    def arrived(self) -> list[Input]:
        """What the bus now holds for the orchestrator: answers to new step tasks, new admissions."""
        found: list[Input] = []
        for item in self.publisher.on(TASK_SUBMIT.pattern.split("{")[0]):
            if item.msg_id in self.answered:
                continue
            self.answered.add(item.msg_id)
            task = TaskSubmitted.model_validate_json(item.payload)
            answer = f"[scripted offline engine, not an LLM] You asked: {task.input}"
            event: TaskEvent = TaskCompleted(
                task_id=task.task_id,
                tenant=task.tenant,
                seq=3,
                output=answer,
                usage=TokenUsage(prompt_tokens=3, completion_tokens=2),
                cost_usd=0.001,
                steps=1,
            )
            found.append(("task", event))
        for item in self.publisher.on(WORKFLOW_ADMISSION.pattern.split("{")[0]):
            if item.msg_id not in self.admitted:
                self.admitted.add(item.msg_id)
                found.append(("admission", WorkflowAdmission.model_validate_json(item.payload)))
        return found

    async def run(self, inputs: list[Input], crash_at: int | None = None) -> None:
        """Deliver everything until the bus is quiet; a crash redelivers the message it interrupted."""
        self.effects.crash_at = crash_at
        queue: deque[Input] = deque(inputs)
        while queue:
            message = queue.popleft()
            try:
                await self.deliver(message)
            except CrashError:
                self.restarts += 1
                queue.appendleft(message)
                continue
            queue.extend(self.arrived())

    def events(self, run_id: str) -> list[WorkflowEventKind]:
        subject = WORKFLOW_EVENT.format(tenant="acme", run_id=run_id)
        return [
            WORKFLOW_EVENT_ADAPTER.validate_json(i.payload) for i in self.publisher.published if i.subject == subject
        ]


def _submission(run_id: str, workflow: str = "research-report") -> Input:
    given = {"topic": "AI agents"} if workflow == "research-report" else {}
    body = WorkflowSubmitted(run_id=run_id, tenant="acme", workflow=workflow, input=given, submitted_by="acme-app")
    return ("submit", body)


def _shape(events: list[WorkflowEventKind]) -> Counter[tuple[str, str]]:
    return Counter((e.kind, str(getattr(e, "step", ""))) for e in events)


async def _clean(inputs: list[Input]) -> World:
    world = World()
    await world.run(inputs)
    return world


async def test_the_research_report_completes_with_its_analyses_in_parallel_and_its_outputs_assembled() -> None:
    world = await _clean([_submission("r1")])
    events = world.events("r1")
    kinds = [(e.kind, getattr(e, "step", "")) for e in events]
    assert kinds[:2] == [("accepted", ""), ("step_started", "research")]
    started = {getattr(e, "step", ""): e.seq for e in events if e.kind == "step_started"}
    completed = {getattr(e, "step", ""): e.seq for e in events if e.kind == "step_completed"}
    # Both analyses start in one transition, before either completes.
    assert started["analyze-sentiment"] == started["analyze-trends"] + 1
    assert max(started["analyze-trends"], started["analyze-sentiment"]) < min(
        completed["analyze-trends"], completed["analyze-sentiment"]
    )
    final = events[-1]
    assert final.kind == "completed"
    assert final.outputs["metadata"]["research_sources"] == ["web", "academic", "news"]
    assert final.outputs["report"]["format"] == "markdown"
    assert final.outputs["report"]["trends"]["analysis_type"] == "trend"
    assert final.cost_usd == pytest.approx(0.005)
    assert final.usage == TokenUsage(prompt_tokens=15, completion_tokens=10)


SCENARIOS = {
    "research-report": [_submission("r1")],
    "queued-behind-a-limit": [_submission("q1", "single"), _submission("q2", "single"), _submission("q3", "single")],
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_a_crash_before_any_single_effect_still_finishes_every_run_exactly_once(scenario: str) -> None:
    inputs = SCENARIOS[scenario]
    clean = await _clean(inputs)
    run_ids = [body.run_id for _, body in inputs]
    expected = {run_id: _shape(clean.events(run_id)) for run_id in run_ids}
    assert all(shape[("completed", "")] == 1 for shape in expected.values())
    total = clean.effects.count
    for crash_at in range(total):
        world = World()
        await world.run(inputs, crash_at=crash_at)
        assert world.restarts == 1, f"crash {crash_at} happened"
        for run_id in run_ids:
            events = world.events(run_id)
            assert [e.seq for e in events] == list(range(1, len(events) + 1)), f"crash {crash_at}: gaps in {run_id}"
            assert _shape(events) == expected[run_id], f"crash {crash_at}: {run_id} differs"
            final, expected_final = events[-1], clean.events(run_id)[-1]
            assert final.kind == "completed"
            assert expected_final.kind == "completed"
            assert final.outputs == expected_final.outputs
        submitted = [TaskSubmitted.model_validate_json(i.payload) for i in world.publisher.on("agentbus.tasks.submit")]
        steps = [(t.metadata["workflow_run_id"], t.metadata["workflow_step"]) for t in submitted]
        assert len(steps) == len(set(steps)), f"crash {crash_at}: a step's task was submitted twice"
        assert len(world.index.runs) == len(submitted)
        for record, _ in world.slots.records.values():
            assert record.state.active == [], f"crash {crash_at}: a slot was never given back"
            assert record.state.queue == []
            assert record.outbox == []


async def test_runs_beyond_the_limit_wait_in_order_and_start_as_slots_free() -> None:
    world = World()
    await world.run([_submission("q1", "single"), _submission("q2", "single")])
    first, second = world.events("q1"), world.events("q2")
    assert [e.kind for e in first] == ["accepted", "step_started", "step_completed", "completed"]
    assert [e.kind for e in second] == ["accepted", "queued", "step_started", "step_completed", "completed"]
    record, _ = world.slots.records[slots_key("acme", "single")]
    assert record.state.active == []


async def test_a_resubmitted_run_id_runs_nothing_new() -> None:
    world = await _clean([_submission("r1")])
    before = len(world.publisher.published)
    await world.run([_submission("r1"), ("submit", WorkflowSubmitted(run_id="r1", tenant="acme", workflow="single"))])
    assert len(world.publisher.published) == before


async def test_an_unknown_workflow_is_rejected_with_the_known_ones() -> None:
    world = await _clean([_submission("u1", "no-such-flow")])
    [rejected] = world.events("u1")
    assert rejected.kind == "rejected"
    assert rejected.error.code == "unknown_workflow"
    assert "research-report" in rejected.error.message


async def test_each_step_task_hangs_under_its_step_span_in_the_run_trace() -> None:
    world = await _clean([_submission("r1")])
    spans = [json.loads(i.payload) for i in world.publisher.on("agentbus.spans.")]
    root = next(s for s in spans if s["parent_span_id"] is None)
    assert root["kind"] == "task"
    assert root["task_id"] == "r1"
    steps = {s["name"]: s for s in spans if s["kind"] == "agent_step"}
    assert set(steps) == {f"step {name}" for name in ("research", "analyze-trends", "analyze-sentiment")} | {
        "step write-report",
        "step review",
    }
    assert {s["parent_span_id"] for s in steps.values()} == {root["span_id"]}
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}
    for item in world.publisher.on("agentbus.tasks.submit"):
        task = TaskSubmitted.model_validate_json(item.payload)
        assert item.traceparent is not None
        _, trace_id, parent, _ = item.traceparent.split("-")
        assert trace_id == root["trace_id"]
        assert parent == steps[f"step {task.metadata['workflow_step']}"]["span_id"]
