"""The agent loop's pure transitions."""

from __future__ import annotations

from agentbus.agent_runner import domain
from agentbus.agent_runner.domain import ErrorCode, RunStatus
from agentbus.agent_runner.specs import AgentSpec
from agentbus.agent_runner.tools import BuiltinToolbox
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmResult, ToolCall
from agentbus.contracts.tasks import TaskCancelRequested, TaskCompleted, TaskFailed, TaskSubmitted

SPEC = AgentSpec(name="calc", model="scripted", system_prompt="Be exact.", tools=["calculator"], max_steps=2)
SUBMISSION = TaskSubmitted(task_id="t1", tenant="acme", agent="calc", input="calculator(1+2)")


def _result(state: domain.RunState, message: ChatMessage | None, error: ErrorInfo | None = None) -> LlmResult:
    assert state.awaiting_request_id is not None
    return LlmResult(
        request_id=state.awaiting_request_id,
        task_id=state.task_id,
        tenant=state.tenant,
        model=state.model,
        step=state.step,
        message=message,
        usage=TokenUsage(prompt_tokens=10, completion_tokens=5),
        error=error,
    )


def _tool_call(expression: str, call_id: str = "c1") -> ChatMessage:
    return ChatMessage(
        role="assistant", tool_calls=[ToolCall(id=call_id, name="calculator", arguments={"expression": expression})]
    )


def test_start_accepts_and_requests_the_first_step() -> None:
    transition = domain.start(SUBMISSION, SPEC, BuiltinToolbox())
    assert [e.kind for e in transition.events] == ["accepted"]
    assert transition.events[0].seq == 1
    assert transition.llm_request is not None
    assert transition.llm_request.step == 1
    assert [t.name for t in transition.llm_request.tools] == ["calculator"]
    assert transition.state.awaiting_request_id == transition.llm_request.request_id
    assert transition.state.next_seq == 2


def test_tool_call_runs_the_tool_and_asks_for_the_next_step() -> None:
    started = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    transition = domain.apply_llm_result(started, _result(started, _tool_call("1+2")), BuiltinToolbox())
    assert transition is not None
    assert [e.kind for e in transition.events] == ["step"]
    assert transition.llm_request is not None
    assert transition.llm_request.step == 2
    tool_message = transition.llm_request.messages[-1]
    assert (tool_message.role, tool_message.content, tool_message.tool_call_id) == ("tool", "3", "c1")


def test_answer_completes_with_the_whole_runs_usage_and_gap_free_seq() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    first = domain.apply_llm_result(state, _result(state, _tool_call("1+2")), BuiltinToolbox())
    assert first is not None
    second = domain.apply_llm_result(
        first.state, _result(first.state, ChatMessage(role="assistant", content="3")), BuiltinToolbox()
    )
    assert second is not None
    assert [(e.kind, e.seq) for e in second.events] == [("step", 3), ("completed", 4)]
    completed = second.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.output == "3"
    assert completed.steps == 2
    assert completed.usage == TokenUsage(prompt_tokens=20, completion_tokens=10)
    assert second.state.status is RunStatus.COMPLETED
    assert second.llm_request is None


def test_a_repeated_or_stale_result_changes_nothing() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    result = _result(state, _tool_call("1+2"))
    advanced = domain.apply_llm_result(state, result, BuiltinToolbox())
    assert advanced is not None
    assert domain.apply_llm_result(advanced.state, result, BuiltinToolbox()) is None


def test_tools_past_max_steps_fail_the_run() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    events = []
    for step in range(SPEC.max_steps):
        transition = domain.apply_llm_result(state, _result(state, _tool_call("1", f"c{step}")), BuiltinToolbox())
        assert transition is not None
        state = transition.state
        events = transition.events
    assert state.status is RunStatus.FAILED
    failed = events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == ErrorCode.STEP_LIMIT


def test_an_llm_error_fails_the_run_with_the_engines_reason() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    error = ErrorInfo(code="overloaded", message="try later")
    transition = domain.apply_llm_result(state, _result(state, None, error), BuiltinToolbox())
    assert transition is not None
    failed = transition.events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == ErrorCode.LLM_ERROR
    assert "overloaded" in failed.error.message


def test_cancel_ends_a_running_task_once_and_ignores_later_results() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    request = TaskCancelRequested(task_id="t1", tenant="acme", reason="user asked")
    cancelled = domain.cancel(state, request)
    assert cancelled is not None
    assert [(e.kind, e.seq) for e in cancelled.events] == [("cancelled", 2)]
    assert domain.cancel(cancelled.state, request) is None
    assert domain.apply_llm_result(cancelled.state, _result(state, _tool_call("1")), BuiltinToolbox()) is None


def test_unknown_tool_from_the_model_becomes_an_error_it_can_read() -> None:
    state = domain.start(SUBMISSION, SPEC, BuiltinToolbox()).state
    message = ChatMessage(role="assistant", tool_calls=[ToolCall(id="c1", name="rm_rf", arguments={})])
    transition = domain.apply_llm_result(state, _result(state, message), BuiltinToolbox())
    assert transition is not None
    assert transition.llm_request is not None
    assert "unknown tool 'rm_rf'" in transition.llm_request.messages[-1].content
