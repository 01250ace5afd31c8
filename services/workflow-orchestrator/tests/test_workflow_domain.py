"""The pure rules of a run: the graph, retries, `onStepFailure`, budgets, deadlines and concurrency slots."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from agentbus.contracts.common import ErrorInfo, TokenUsage, utc_now
from agentbus.contracts.tasks import (
    TaskApprovalPending,
    TaskCompleted,
    TaskFailed,
)
from agentbus.contracts.workflows import WorkflowCancelRequested, WorkflowSubmitted, WorkflowTimer
from agentbus.workflow_orchestrator import admission, domain
from agentbus.workflow_orchestrator.domain import RunState, RunStatus, StepPhase, Transition
from agentbus.workflow_orchestrator.specs import WorkflowSpec

NOW = utc_now()


def _spec(*steps: dict[str, Any], **extra: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {"name": "flow", "input": [{"name": "topic", "required": True}], "steps": list(steps), **extra}
    )


def _step(name: str, *after: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "agent": "echo",
        "dependsOn": list(after),
        "input": {"topic": "{{ .input.topic }}", "from": name},
        "output": [{"name": "answer", "path": ".result"}],
        **extra,
    }


DIAMOND = _spec(_step("a"), _step("b", "a"), _step("c", "a"), _step("d", "b", "c"))


def _start(spec: WorkflowSpec, **submission: Any) -> Transition:
    body = WorkflowSubmitted(
        run_id="r1", tenant="acme", workflow=spec.name, input={"topic": "ai"}, submitted_by="acme-app", **submission
    )
    return domain.start(body, spec, "nonce", now=NOW)


def _completed(state: RunState, step: str, output: Any = None, cost: float = 0.0) -> Transition:
    task_id = state.step(step).task_id
    assert task_id is not None
    answer = json.dumps(output if output is not None else {"step": step})
    event = TaskCompleted(
        task_id=task_id, tenant="acme", seq=3, output=answer, usage=TokenUsage(prompt_tokens=2), cost_usd=cost, steps=1
    )
    transition = domain.apply_task_event(state, event, NOW)
    assert transition is not None
    return transition


def _failed(state: RunState, step: str, cost: float = 0.0) -> Transition:
    task_id = state.step(step).task_id
    assert task_id is not None
    event = TaskFailed(
        task_id=task_id, tenant="acme", seq=3, error=ErrorInfo(code="llm_error", message="boom"), cost_usd=cost
    )
    transition = domain.apply_task_event(state, event, NOW)
    assert transition is not None
    return transition


def _kinds(transition: Transition) -> list[str]:
    return [f"{e.kind}:{getattr(e, 'step', '')}".rstrip(":") for e in transition.events]


def test_a_run_starts_its_first_step_and_independent_steps_start_together() -> None:
    started = _start(DIAMOND)
    assert _kinds(started) == ["accepted", "step_started:a"]
    assert [e.seq for e in started.events] == [1, 2]
    assert started.wake is not None
    assert started.wake.due_at == NOW + timedelta(seconds=DIAMOND.timeout)
    [task] = started.tasks
    assert task.submitted_by == "acme-app"
    assert json.loads(task.input) == {"topic": "ai", "from": "a"}
    assert task.metadata == {"workflow_run_id": "r1", "workflow": "flow", "workflow_step": "a", "workflow_attempt": 1}

    after_a = _completed(started.state, "a")
    assert _kinds(after_a) == ["step_completed:a", "step_started:b", "step_started:c"]
    assert [e.seq for e in after_a.events] == [3, 4, 5]
    after_b = _completed(after_a.state, "b")
    assert _kinds(after_b) == ["step_completed:b"], "d waits for c too"
    after_c = _completed(after_b.state, "c")
    assert _kinds(after_c) == ["step_completed:c", "step_started:d"]
    done = _completed(after_c.state, "d", output={"final": True})
    assert _kinds(done) == ["step_completed:d", "completed"]
    assert done.state.status is RunStatus.COMPLETED
    assert done.ended
    assert done.ended_steps == ["d"]


def test_the_same_task_event_twice_and_a_stale_attempts_event_change_nothing() -> None:
    started = _start(DIAMOND)
    after_a = _completed(started.state, "a")
    a_task = started.state.step("a").task_id
    assert a_task is not None
    again = TaskCompleted(task_id=a_task, tenant="acme", seq=3, output="{}", usage=TokenUsage(), cost_usd=0, steps=1)
    assert domain.apply_task_event(after_a.state, again, NOW) is None
    unknown = TaskFailed(task_id="wf-other", tenant="acme", seq=2, error=ErrorInfo(code="x", message="y"))
    assert domain.apply_task_event(after_a.state, unknown, NOW) is None


def test_outputs_are_extracted_by_path_and_assembled_from_templates() -> None:
    spec = _spec(
        _step("a", output=[{"name": "sources", "path": ".result.sources"}]),
        _step("b", "a", input="Use {{ .steps.a.output.sources.0 }}"),
        output={
            "first": "{{ .steps.a.output.sources.0 }}",
            "b": "{{ .steps.b.output.answer }}",
            "t": "{{ .input.topic }}",
        },
    )
    after_a = _completed(_start(spec).state, "a", output={"sources": ["web", "news"]})
    assert after_a.state.step("a").outputs == {"sources": ["web", "news"]}
    assert after_a.tasks[0].input == "Use web"
    done = _completed(after_a.state, "b", output={"ok": 1})
    [*_, completed] = done.events
    assert completed.kind == "completed"
    assert completed.outputs == {"first": "web", "b": {"ok": 1}, "t": "ai"}


def test_a_missing_output_fails_the_attempt_and_is_retried() -> None:
    spec = _spec(_step("a", output=[{"name": "x", "path": ".result.missing"}], retries=1))
    first = _completed(_start(spec).state, "a", output={"other": 1})
    assert _kinds(first) == ["step_failed:a", "step_started:a"]
    failed = first.events[0]
    assert failed.kind == "step_failed"
    assert failed.error.code == "output_missing"
    assert failed.will_retry
    second = _completed(first.state, "a", output={"other": 2})
    assert _kinds(second) == ["step_failed:a", "failed"]


def test_a_failing_step_is_retried_with_a_new_task_each_time_then_fails_the_run() -> None:
    spec = _spec(_step("a", retries=2), _step("b"), _step("c", "a"))
    state = _start(spec).state
    tasks = [state.step("a").task_id]
    outcomes = []
    for _ in range(3):
        transition = _failed(state, "a", cost=0.01)
        state = transition.state
        outcomes.append([(e.kind, getattr(e, "will_retry", None)) for e in transition.events])
        tasks.append(state.step("a").task_id)
    assert outcomes[0] == [("step_failed", True), ("step_started", None)]
    assert outcomes[1] == [("step_failed", True), ("step_started", None)]
    assert outcomes[2][0] == ("step_failed", False)
    assert outcomes[2][-1] == ("failed", None)
    assert len(set(tasks[:3])) == 3, "each attempt is a task of its own"
    assert state.status is RunStatus.FAILED
    assert state.step("a").cost_usd == pytest.approx(0.03)
    # The step that still ran in parallel is cancelled, as the run's submitter; `c` never started.
    assert [c.request.task_id for c in transition.cancels] == [state.step("b").task_id]
    assert transition.cancels[0].by == "acme-app"
    assert state.step("b").phase is StepPhase.CANCELLED
    assert state.step("c").phase is StepPhase.PENDING
    final = transition.events[-1]
    assert final.kind == "failed"
    assert final.error.code == "step_failed"
    assert "step 'a' failed after 3 attempts" in final.error.message
    assert final.cost_usd == pytest.approx(0.03)


@pytest.mark.parametrize(("policy", "attempts"), [("retry", 3), ("fail", 1)])
def test_retry_and_fail_policies_differ_in_the_retries_a_step_gets(policy: str, attempts: int) -> None:
    spec = _spec(_step("a"), errorHandling={"onStepFailure": policy, "maxRetries": 2})
    state = _start(spec).state
    made = 0
    while state.status is RunStatus.RUNNING:
        state = _failed(state, "a").state
        made += 1
    assert made == attempts
    assert state.status is RunStatus.FAILED


def test_continue_skips_what_depends_on_the_failed_step_and_completes_the_rest() -> None:
    spec = _spec(
        _step("a"),
        _step("b", "a"),
        _step("c", "b"),
        _step("d"),
        errorHandling={"onStepFailure": "continue"},
        output={"d": "{{ .steps.d.output.answer }}", "c": "{{ .steps.c.output.answer }}"},
    )
    started = _start(spec)
    assert _kinds(started) == ["accepted", "step_started:a", "step_started:d"]
    failed = _failed(started.state, "a")
    assert _kinds(failed) == ["step_failed:a", "step_skipped:b", "step_skipped:c"]
    done = _completed(failed.state, "d", output={"d": 1})
    assert _kinds(done) == ["step_completed:d", "completed"]
    completed = done.events[-1]
    assert completed.kind == "completed"
    assert completed.failed_steps == ["a"]
    assert completed.skipped_steps == ["b", "c"]
    assert completed.outputs == {"d": {"d": 1}, "c": None}


def test_the_run_budget_is_shared_among_its_steps_and_never_exceeded() -> None:
    spec = _spec(_step("a"), _step("b", "a"), _step("c", "a"), _step("d", "b", "c"))
    started = _start(spec, budget_usd=1.0)
    assert started.tasks[0].budget_usd == pytest.approx(0.25)
    after_a = _completed(started.state, "a", cost=0.05)
    shares = [t.budget_usd for t in after_a.tasks]
    assert shares == [pytest.approx(0.95 / 3), pytest.approx(0.95 / 3)]
    after_b = _completed(after_a.state, "b", cost=0.1)
    after_c = _completed(after_b.state, "c", cost=0.1)
    [d_task] = after_c.tasks
    assert d_task.budget_usd == pytest.approx(1.0 - 0.25)
    done = _completed(after_c.state, "d", cost=0.2)
    assert done.events[-1].kind == "completed"
    assert done.state.cost_usd == pytest.approx(0.45)


def test_a_step_waiting_for_an_approval_is_announced_once() -> None:
    started = _start(DIAMOND)
    task_id = started.state.step("a").task_id
    assert task_id is not None
    pending = TaskApprovalPending(task_id=task_id, tenant="acme", seq=3, approval_id="ap1", tool="create_ticket")
    waiting = domain.apply_task_event(started.state, pending, NOW)
    assert waiting is not None
    assert _kinds(waiting) == ["step_waiting:a"]
    assert domain.apply_task_event(waiting.state, pending, NOW) is None


def test_the_deadline_fails_the_run_and_cancels_its_running_steps() -> None:
    started = _start(DIAMOND, deadline_seconds=60)
    timer = WorkflowTimer(run_id="r1", tenant="acme", due_at=NOW + timedelta(seconds=60))
    early = domain.wake(started.state, timer, NOW + timedelta(seconds=30))
    assert early is not None
    assert early.events == []
    assert early.wake == timer
    expired = domain.wake(started.state, timer, NOW + timedelta(seconds=61))
    assert expired is not None
    assert _kinds(expired) == ["failed"]
    assert expired.events[0].kind == "failed"
    assert expired.events[0].error.code == "deadline_exceeded"
    assert [c.request.task_id for c in expired.cancels] == [started.state.step("a").task_id]
    assert domain.wake(expired.state, timer, NOW + timedelta(seconds=62)) is None


def test_a_step_task_gets_its_timeout_or_what_the_run_has_left_with_a_grace_for_the_runs_deadline() -> None:
    spec = _spec(_step("a", timeout="30s"), _step("b"), _step("c", timeout="1h"), timeout="10m")
    started = _start(spec)
    deadlines = {t.metadata["workflow_step"]: t.deadline_seconds for t in started.tasks}
    assert deadlines == {
        "a": 30,
        "b": 600 + domain.TASK_DEADLINE_GRACE_SECONDS,
        "c": 600 + domain.TASK_DEADLINE_GRACE_SECONDS,
    }


def test_cancel_ends_the_run_once_as_the_canceller() -> None:
    started = _start(DIAMOND)
    request = WorkflowCancelRequested(run_id="r1", tenant="acme", reason="enough")
    cancelled = domain.cancel(started.state, request, "alice-app")
    assert cancelled is not None
    assert _kinds(cancelled) == ["cancelled"]
    assert cancelled.cancels[0].by == "alice-app"
    assert cancelled.ended
    assert domain.cancel(cancelled.state, request, "alice-app") is None


def test_a_limited_workflow_asks_for_a_slot_before_anything_is_announced() -> None:
    spec = _spec(_step("a"), concurrency={"maxConcurrent": 1, "policy": "queue"})
    pending = _start(spec)
    assert pending.acquire
    assert pending.events == []
    waiting = domain.queued(pending.state, NOW)
    assert waiting is not None
    assert _kinds(waiting) == ["accepted", "queued"]
    running = domain.admitted(waiting.state, NOW)
    assert running is not None
    assert _kinds(running) == ["step_started:a"]
    assert [e.seq for e in running.events] == [3]
    done = _completed(running.state, "a")
    assert done.release
    refused = domain.refused(pending.state)
    assert refused is not None
    assert _kinds(refused) == ["rejected"]
    assert not refused.release


def test_slots_admit_up_to_the_limit_then_queue_in_order_and_admit_when_one_is_released() -> None:
    state = None
    outcomes = []
    for run in ("r1", "r2", "r3", "r4"):
        step = admission.acquire(state, "acme", "flow", run, 2, "queue")
        state = step.state
        outcomes.append(step.outcome)
    assert outcomes == ["admitted", "admitted", "queued", "queued"]
    assert admission.acquire(state, "acme", "flow", "r3", 2, "queue").outcome == "queued", "asking again"
    assert state is not None
    released = admission.release(state, "r1", 2)
    assert released is not None
    assert released.admit == ["r3"]
    assert released.state.active == ["r2", "r3"]
    assert admission.release(released.state, "r1", 2) is None, "released once"
    gone = admission.release(released.state, "r4", 2)
    assert gone is not None
    assert gone.state.queue == []
    assert gone.admit == []


def test_slots_reject_or_replace_the_oldest_run_beyond_the_limit() -> None:
    full = admission.acquire(None, "acme", "flow", "r1", 1, "reject").state
    rejected = admission.acquire(full, "acme", "flow", "r2", 1, "reject")
    assert rejected.outcome == "rejected"
    assert not rejected.changed
    replaced = admission.acquire(full, "acme", "flow", "r2", 1, "replace")
    assert replaced.outcome == "admitted"
    assert replaced.replace == [("r1", "r2")]
    assert replaced.state.active == ["r2"]
    assert admission.release(replaced.state, "r1", 1) is None, "the replaced run holds nothing any more"
