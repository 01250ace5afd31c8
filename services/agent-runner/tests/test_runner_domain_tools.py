"""Pure transitions of tool calls through the tool-executor, approvals, budgets, routing and cancellation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentbus.agent_runner import domain
from agentbus.agent_runner.domain import RunStatus
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import ToolCatalog
from agentbus.contracts.budget import BudgetReserveReply
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmResult, ToolCall, ToolSpec
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.tasks import (
    TaskApprovalPending,
    TaskApprovalResolved,
    TaskBudgetExceeded,
    TaskCompleted,
    TaskSubmitted,
)
from agentbus.contracts.tools import ToolCallUpdate

TICKET = ToolSpec(name="create_ticket", description="Open a ticket.", parameters={"type": "object"})
CATALOG = ToolCatalog({"create_ticket": TICKET})
SPEC = AgentSpec(name="ops", model="big", system_prompt="Help.", tools=["create_ticket", "calculator"], max_steps=4)
SUBMISSION = TaskSubmitted(task_id="t1", tenant="acme", agent="ops", input="go", submitted_by="carol")


class CanaryRouter:
    """`big` has deployments big-a and big-b (by request id parity) and falls back to `small`."""

    def choose(self, model: str, request_id: str, pinned: str | None = None) -> str:
        if model != "big":
            return model
        return pinned or ("big-a" if len(request_id) % 2 == 0 else "big-b")

    def fallback(self, model: str) -> str | None:
        return "small" if model == "big" else None

    def pinned_deployment(self, metadata: Mapping[str, Any]) -> str | None:
        value = metadata.get("pin")
        return value if isinstance(value, str) else None


ROUTER = CanaryRouter()


def _result(state: domain.RunState, message: ChatMessage | None, error: ErrorInfo | None = None) -> LlmResult:
    assert state.awaiting_request_id is not None
    assert state.requested_model is not None
    return LlmResult(
        request_id=state.awaiting_request_id,
        task_id=state.task_id,
        tenant=state.tenant,
        model=state.requested_model,
        step=state.step,
        message=message,
        usage=TokenUsage(prompt_tokens=10, completion_tokens=5),
        error=error,
    )


def _calls(*calls: ToolCall) -> ChatMessage:
    return ChatMessage(role="assistant", tool_calls=list(calls))


def _update(state: domain.RunState, kind: str, **fields: Any) -> ToolCallUpdate:
    call = next(c for c in state.pending_calls if c.remote)
    return ToolCallUpdate.model_validate(
        {
            "kind": kind,
            "call_id": call.call_id,
            "tool_call_id": call.tool_call_id,
            "task_id": state.task_id,
            "tenant": state.tenant,
            "tool": call.name,
            **fields,
        }
    )


def _waiting_for_ticket() -> domain.RunState:
    started = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER).state
    message = _calls(
        ToolCall(id="a", name="calculator", arguments={"expression": "6*7"}),
        ToolCall(id="b", name="create_ticket", arguments={"priority": "high"}),
    )
    transition = domain.apply_llm_result(started, _result(started, message), CATALOG, ROUTER)
    assert transition is not None
    assert [e.kind for e in transition.events] == ["step"]
    assert transition.llm_request is None
    assert [(c.call_id, c.tool, c.submitted_by) for c in transition.tool_calls] == [
        ("acme.t1.1.1", "create_ticket", "carol")
    ]
    return transition.state


def test_a_remote_tool_goes_to_the_executor_while_a_builtin_runs_at_once() -> None:
    state = _waiting_for_ticket()
    local, remote = state.pending_calls
    assert (local.remote, local.result) == (False, "42")
    assert (remote.remote, remote.result) == (True, None)
    assert state.awaiting_request_id is None


def test_approval_progress_becomes_task_events_once_and_the_result_asks_for_the_next_step() -> None:
    state = _waiting_for_ticket()
    pending = domain.apply_tool_update(state, _update(state, "approval_pending", approval_id="ap1"), ROUTER)
    assert pending is not None
    assert [(e.kind, e.seq) for e in pending.events] == [("approval_pending", 3)]
    assert domain.apply_tool_update(pending.state, _update(state, "approval_pending", approval_id="ap1")) is None

    resolved = domain.apply_tool_update(
        pending.state, _update(state, "approval_resolved", approval_id="ap1", outcome="approved", by="alice"), ROUTER
    )
    assert resolved is not None
    event = resolved.events[0]
    assert isinstance(event, TaskApprovalResolved)
    assert (event.seq, event.outcome, event.by) == (4, "approved", "alice")
    assert resolved.llm_request is None

    done = domain.apply_tool_update(resolved.state, _update(state, "result", content="ticket T-1"), ROUTER)
    assert done is not None
    assert done.events == []
    request = done.llm_request
    assert request is not None
    assert request.step == 2
    assert request.event_seq == 4
    assert [(m.role, m.content, m.tool_call_id) for m in request.messages[-2:]] == [
        ("tool", "42", "a"),
        ("tool", "ticket T-1", "b"),
    ]
    assert domain.apply_tool_update(done.state, _update(state, "result", content="again")) is None


def test_a_result_that_overtakes_its_approval_updates_still_announces_them_in_order() -> None:
    state = _waiting_for_ticket()
    denied = _update(state, "result", ok=False, content="denied by bob", approval_id="ap1", outcome="denied", by="bob")
    transition = domain.apply_tool_update(state, denied, ROUTER)
    assert transition is not None
    assert [(e.kind, e.seq) for e in transition.events] == [("approval_pending", 3), ("approval_resolved", 4)]
    assert isinstance(transition.events[0], TaskApprovalPending)
    assert transition.llm_request is not None
    late = _update(state, "approval_resolved", approval_id="ap1", outcome="denied", by="bob")
    assert domain.apply_tool_update(transition.state, late) is None


def test_citations_from_tool_results_reach_the_completed_event() -> None:
    state = _waiting_for_ticket()
    chunk = RetrievedChunk(document_id="kb-1", chunk_index=0, text="Refunds take 5 days.", score=0.9)
    after = domain.apply_tool_update(state, _update(state, "result", content="[1] ...", citations=[chunk]), ROUTER)
    assert after is not None
    answer = domain.apply_llm_result(
        after.state, _result(after.state, ChatMessage(role="assistant", content="5 days [1]")), CATALOG, ROUTER
    )
    assert answer is not None
    completed = answer.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.citations == [chunk]


def test_updates_for_unknown_calls_or_ended_runs_change_nothing() -> None:
    state = _waiting_for_ticket()
    stray = _update(state, "result", content="x").model_copy(update={"call_id": "t1.9.9"})
    assert domain.apply_tool_update(state, stray) is None
    from agentbus.contracts.tasks import TaskCancelRequested

    cancelled = domain.cancel(state, TaskCancelRequested(task_id="t1", tenant="acme"))
    assert cancelled is not None
    assert domain.apply_tool_update(cancelled.state, _update(state, "result", content="x")) is None


def test_routing_picks_a_deployment_and_an_error_falls_back_under_a_new_request_id() -> None:
    transition = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER)
    request = transition.llm_request
    assert request is not None
    assert request.model in {"big-a", "big-b"}
    assert request.requested_model == "big"
    state = transition.state
    failed = domain.apply_llm_result(
        state, _result(state, None, ErrorInfo(code="timeout", message="slow")), CATALOG, ROUTER
    )
    assert failed is not None
    assert failed.llm_request is not None
    assert failed.events == []
    assert (failed.llm_request.model, failed.llm_request.request_id) == ("small", "acme.t1.step-1.fallback-1")
    assert failed.llm_request.step == 1
    again = domain.apply_llm_result(
        failed.state, _result(failed.state, None, ErrorInfo(code="engine", message="down")), CATALOG, ROUTER
    )
    assert again is not None
    assert [e.kind for e in again.events] == ["failed"]
    assert again.state.usage == TokenUsage(prompt_tokens=20, completion_tokens=10)


def test_a_pin_in_the_metadata_routes_every_step_to_that_deployment() -> None:
    pinned = SUBMISSION.model_copy(update={"metadata": {"pin": "big-b"}})
    request = domain.start(pinned, SPEC, CATALOG, ROUTER).llm_request
    assert request is not None
    assert request.model == "big-b"


def test_cancel_while_generating_aborts_the_request_on_its_deployment() -> None:
    from agentbus.contracts.tasks import TaskCancelRequested

    state = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER).state
    cancelled = domain.cancel(state, TaskCancelRequested(task_id="t1", tenant="acme", reason="stop"))
    assert cancelled is not None
    assert cancelled.abort is not None
    assert cancelled.abort.request_id == state.awaiting_request_id
    assert cancelled.abort_model == state.requested_model


def test_a_denied_reservation_ends_the_run_with_budget_exceeded_after_the_steps_events() -> None:
    state = _waiting_for_ticket()
    transition = domain.apply_tool_update(state, _update(state, "result", content="ok"), ROUTER)
    assert transition is not None
    assert transition.llm_request is not None
    verdict = BudgetReserveReply(
        reservation_id="x", allowed=False, budget="task", limit_usd=0.5, spent_usd=0.49, requested_usd=0.02
    )
    denied = domain.deny_budget(transition.state, verdict)
    assert denied is not None
    assert denied.llm_request is None
    assert denied.close_budget
    assert denied.state.status is RunStatus.BUDGET_EXCEEDED
    event = denied.events[-1]
    assert isinstance(event, TaskBudgetExceeded)
    assert (event.seq, event.budget, event.limit_usd, event.spent_usd, event.requested_usd) == (
        3,
        "task",
        0.5,
        0.49,
        0.02,
    )


def test_the_priced_cost_lands_on_the_terminal_event_and_the_run_knows_every_usage_record() -> None:
    state = _waiting_for_ticket()
    after_tool = domain.apply_tool_update(
        state, _update(state, "result", content="ok", usage_ids=["tool:acme.t1.1.1"]), ROUTER
    )
    assert after_tool is not None
    waiting = after_tool.state
    answer = _result(waiting, ChatMessage(role="assistant", content="hi")).model_copy(
        update={"usage_id": f"llm:{waiting.awaiting_request_id}"}
    )
    answered = domain.apply_llm_result(waiting, answer, CATALOG, ROUTER)
    assert answered is not None
    assert answered.state.usage_ids == ["tool:acme.t1.1.1", f"llm:{waiting.awaiting_request_id}"]
    completed = domain.with_cost(answered.events[-1], 0.0125)
    assert isinstance(completed, TaskCompleted)
    assert completed.cost_usd == 0.0125


def test_an_ending_run_withdraws_its_calls_closes_its_budget_and_aborts_its_step() -> None:
    from agentbus.contracts.tasks import TaskCancelRequested

    waiting = _waiting_for_ticket()
    cancelled = domain.cancel(waiting, TaskCancelRequested(task_id="t1", tenant="acme"), "carol")
    assert cancelled is not None
    assert [w.call_id for w in cancelled.withdrawals] == ["acme.t1.1.1"]
    assert cancelled.close_budget
    assert cancelled.events[-1].kind == "cancelled"
    generating = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER).state
    failed = domain.fail_internal(generating, "the worker gave up")
    assert failed is not None
    assert failed.abort is not None
    assert failed.abort.request_id == generating.awaiting_request_id
    assert failed.withdrawals == []


def test_the_deadline_ends_a_waiting_run_once() -> None:
    from datetime import timedelta

    waiting = _waiting_for_ticket()
    assert waiting.deadline_at is not None
    assert waiting.started_at is not None
    assert waiting.deadline_at - waiting.started_at == timedelta(seconds=domain.DEFAULT_TIMING.default_deadline_seconds)
    assert domain.expire(waiting, waiting.deadline_at - timedelta(seconds=1)) is None
    expired = domain.expire(waiting, waiting.deadline_at)
    assert expired is not None
    failed = expired.events[-1]
    assert failed.kind == "failed"
    assert failed.error.code == "deadline_exceeded"
    assert [w.call_id for w in expired.withdrawals] == ["acme.t1.1.1"]
    assert domain.expire(expired.state, waiting.deadline_at) is None


def test_a_submission_or_agent_deadline_overrides_the_default() -> None:
    from datetime import timedelta

    spec = SPEC.model_copy(update={"timeout_seconds": 30.0})
    by_agent = domain.start(SUBMISSION, spec, CATALOG, ROUTER).state
    assert by_agent.deadline_at is not None
    assert by_agent.started_at is not None
    assert by_agent.deadline_at - by_agent.started_at == timedelta(seconds=30)
    submission = SUBMISSION.model_copy(update={"deadline_seconds": 5.0})
    by_submission = domain.start(submission, spec, CATALOG, ROUTER)
    assert by_submission.state.deadline_at is not None
    assert by_submission.state.started_at is not None
    assert by_submission.state.deadline_at - by_submission.state.started_at == timedelta(seconds=5)
    assert by_submission.wake is not None
    assert (by_submission.wake.kind, by_submission.wake.due_at) == ("deadline", by_submission.state.deadline_at)


def test_a_wake_up_redrives_a_step_that_still_waits_and_sleeps_again_otherwise() -> None:
    from datetime import timedelta

    timing = domain.RunTiming(default_deadline_seconds=3600, redrive_seconds=10, max_redrive_seconds=40)
    started = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER, timing=timing)
    assert started.wake is not None
    assert started.wake.kind == "step"
    assert started.wake.step == 1
    assert started.state.started_at is not None
    now = started.state.started_at + timedelta(seconds=10)
    redriven = domain.wake(started.state, started.wake, now, timing)
    assert redriven is not None
    assert redriven.redrive == 1
    assert redriven.llm_request is not None
    assert redriven.llm_request.request_id == started.state.awaiting_request_id
    assert redriven.wake is not None
    assert redriven.wake.due_at == now + timedelta(seconds=20)
    moved_on = started.wake.model_copy(update={"step": 0})
    asleep = domain.wake(started.state, moved_on, now, timing)
    assert asleep is not None
    assert (asleep.redrive, asleep.llm_request, asleep.events) == (0, None, [])
    waiting = _waiting_for_ticket()
    assert waiting.started_at is not None
    timer = RunTimer(task_id="t1", tenant="acme", due_at=now, kind="step", step=waiting.step)
    calls = domain.wake(waiting, timer, waiting.started_at + timedelta(seconds=61))
    assert calls is not None
    assert [(c.call_id, c.arguments) for c in calls.tool_calls] == [("acme.t1.1.1", {"priority": "high"})]


def test_streaming_agents_ask_for_token_events_anchored_at_the_last_event() -> None:
    spec = SPEC.model_copy(update={"stream_tokens": True})
    request = domain.start(SUBMISSION, spec, CATALOG, ROUTER).llm_request
    assert request is not None
    assert (request.stream, request.event_seq) == (True, 1)
