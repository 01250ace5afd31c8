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
        ("t1.1.1", "create_ticket", "carol")
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
    assert (failed.llm_request.model, failed.llm_request.request_id) == ("small", "t1.step-1.fallback-1")
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
    verdict = BudgetReserveReply(reservation_id="x", allowed=False, budget="task", limit_usd=0.5, spent_usd=0.49)
    denied = domain.deny_budget(transition, verdict)
    assert denied.llm_request is None
    assert denied.state.status is RunStatus.BUDGET_EXCEEDED
    event = denied.events[-1]
    assert isinstance(event, TaskBudgetExceeded)
    assert (event.seq, event.budget, event.limit_usd, event.spent_usd) == (3, "task", 0.5, 0.49)


def test_the_priced_cost_lands_on_the_terminal_event() -> None:
    state = domain.start(SUBMISSION, SPEC, CATALOG, ROUTER).state
    answered = domain.apply_llm_result(state, _result(state, ChatMessage(role="assistant", content="hi")), CATALOG)
    assert answered is not None
    assert answered.state.llm_usage_ids == [f"llm:{state.awaiting_request_id}"]
    priced = domain.with_cost(answered, 0.0125)
    completed = priced.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.cost_usd == 0.0125


def test_streaming_agents_ask_for_token_events_anchored_at_the_last_event() -> None:
    spec = SPEC.model_copy(update={"stream_tokens": True})
    request = domain.start(SUBMISSION, spec, CATALOG, ROUTER).llm_request
    assert request is not None
    assert (request.stream, request.event_seq) == (True, 1)
