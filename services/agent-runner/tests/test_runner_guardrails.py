"""Guardrails in the run's pure transitions: the input, each tool call's arguments and the model's output, with
each action (block, redact, require_approval), and no matched text in any event."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from agentbus.agent_runner import domain
from agentbus.agent_runner.app import create_app
from agentbus.agent_runner.domain import ErrorCode, RunStatus
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.agent_runner.specs import AgentSpec, AgentSpecError
from agentbus.agent_runner.tools import ToolCatalog
from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmResult, ToolCall, ToolSpec
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.tasks import (
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskGuardrail,
    TaskStep,
    TaskSubmitted,
)
from agentbus.contracts.tools import GUARDRAIL_REVIEW_TOOL, ToolCallUpdate
from agentbus.runtime.guardrails import GuardrailCheck, GuardrailPolicy, Guardrails

REPO = Path(__file__).resolve().parents[3]
TICKET = ToolSpec(name="create_ticket", description="Open a ticket.", parameters={"type": "object"})
CATALOG = ToolCatalog({"create_ticket": TICKET})
SPEC = AgentSpec(name="ops", model="scripted", system_prompt="Help.", tools=["create_ticket", "calculator"])
SECRET = "AKIA" + "IOSFODNN7EXAMPLE"
EMAIL = "jane.doe@example.com"


def _guardrails(*checks: GuardrailCheck) -> Guardrails:
    return Guardrails([("policy", GuardrailPolicy(checks=checks))])


def _check(detector: str, action: str, *stages: str, **fields: object) -> GuardrailCheck:
    data: dict[str, object] = {"detector": detector, "action": action, **fields}
    if stages:
        data["stages"] = list(stages)
    return GuardrailCheck.model_validate(data)


def _submit(text: str) -> TaskSubmitted:
    return TaskSubmitted(task_id="t1", tenant="acme", agent="ops", input=text, submitted_by="carol")


def _result(state: domain.RunState, message: ChatMessage) -> LlmResult:
    assert state.awaiting_request_id is not None
    return LlmResult(
        request_id=state.awaiting_request_id,
        task_id=state.task_id,
        tenant=state.tenant,
        model=state.model,
        step=state.step,
        message=message,
        usage=TokenUsage(prompt_tokens=10, completion_tokens=5),
    )


def _dumped(transition: domain.Transition) -> str:
    """Everything a transition publishes or stores, as text."""
    parts = [event.model_dump_json() for event in transition.events]
    parts += [call.model_dump_json() for call in transition.tool_calls]
    if transition.llm_request is not None:
        parts.append(transition.llm_request.model_dump_json())
    parts.append(transition.state.model_dump_json())
    return "\n".join(parts)


def _review_result(state: domain.RunState, *, approved: bool) -> ToolCallUpdate:
    assert state.review is not None
    return ToolCallUpdate(
        kind="result",
        call_id=state.review.call_id,
        tool_call_id=state.review.call_id,
        task_id=state.task_id,
        tenant=state.tenant,
        tool=GUARDRAIL_REVIEW_TOOL,
        approval_id="ap1",
        outcome="approved" if approved else "denied",
        by="alice",
        ok=approved,
        content="released" if approved else "denied",
    )


# --- the task's input ---------------------------------------------------------------------------------


def test_a_blocked_input_fails_the_task_naming_the_rule_and_asks_no_model() -> None:
    guardrails = _guardrails(_check("secrets", "block"))
    transition = domain.start(_submit(f"deploy with {SECRET}"), SPEC, CATALOG, guardrails=guardrails)
    assert [(e.kind, e.seq) for e in transition.events] == [("accepted", 1), ("guardrail", 2), ("failed", 3)]
    failed = transition.events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == "guardrail_blocked"
    assert ErrorCode.GUARDRAIL_BLOCKED.value == "guardrail_blocked"
    assert "policy/secrets" in failed.error.message
    assert "aws_access_key" in failed.error.message
    assert transition.llm_request is None
    assert transition.state.status is RunStatus.FAILED
    assert transition.close_budget
    assert SECRET not in _dumped(transition)


def test_the_guardrail_event_names_policy_check_detector_action_stage_and_kind() -> None:
    guardrails = _guardrails(_check("personal_data", "redact", name="pii"))
    transition = domain.start(_submit(f"write to {EMAIL}"), SPEC, CATALOG, guardrails=guardrails)
    event = transition.events[1]
    assert isinstance(event, TaskGuardrail)
    assert (event.stage, event.action, event.step) == ("input", "redact", 0)
    [finding] = event.findings
    assert (finding.policy, finding.check, finding.detector, finding.action, finding.kind) == (
        "policy",
        "pii",
        "personal_data",
        "redact",
        "email",
    )


def test_a_redacted_input_reaches_the_model_masked_and_nowhere_whole() -> None:
    guardrails = _guardrails(_check("personal_data", "redact"))
    transition = domain.start(_submit(f"write to {EMAIL} today"), SPEC, CATALOG, guardrails=guardrails)
    assert [e.kind for e in transition.events] == ["accepted", "guardrail"]
    assert transition.llm_request is not None
    assert transition.llm_request.messages[-1].content == "write to [REDACTED:email] today"
    assert EMAIL not in _dumped(transition)


def test_an_input_without_findings_emits_no_guardrail_event() -> None:
    guardrails = _guardrails(_check("secrets", "block"), _check("personal_data", "redact"))
    transition = domain.start(_submit("What is our refund policy?"), SPEC, CATALOG, guardrails=guardrails)
    assert [e.kind for e in transition.events] == ["accepted"]
    assert transition.llm_request is not None


def test_an_input_held_for_approval_waits_in_the_inbox_then_runs_once_approved() -> None:
    guardrails = _guardrails(_check("deny_list", "require_approval", "input", patterns=[r"(?i)\bdrop table\b"]))
    held = domain.start(_submit("please DROP TABLE orders"), SPEC, CATALOG, guardrails=guardrails)
    assert [e.kind for e in held.events] == ["accepted", "guardrail"]
    assert held.llm_request is None
    [review] = held.tool_calls
    assert review.tool == GUARDRAIL_REVIEW_TOOL
    assert review.guardrail is not None
    assert review.guardrail.action == "require_approval"
    assert "policy/deny_list: pattern 0" in review.guardrail.reason
    assert review.arguments["stage"] == "input"
    assert review.submitted_by == "carol"
    # The deadline's wake-up re-drives the review while it waits.
    timer = held.wake
    assert timer is not None
    woken = domain.wake(
        held.state, RunTimer(task_id="t1", tenant="acme", due_at=timer.due_at, kind="step", step=0), timer.due_at
    )
    assert woken is not None
    assert [c.call_id for c in woken.tool_calls] == [review.call_id]

    released = domain.apply_tool_update(held.state, _review_result(held.state, approved=True))
    assert released is not None
    assert released.llm_request is not None
    assert released.llm_request.step == 1
    assert released.llm_request.messages[-1].content == "please DROP TABLE orders"
    assert released.state.review is None
    assert [e.kind for e in released.events] == ["approval_pending", "approval_resolved"]


def test_a_held_input_that_is_denied_fails_the_task() -> None:
    guardrails = _guardrails(_check("personal_data", "require_approval"))
    held = domain.start(_submit(f"mail {EMAIL}"), SPEC, CATALOG, guardrails=guardrails)
    denied = domain.apply_tool_update(held.state, _review_result(held.state, approved=False))
    assert denied is not None
    failed = denied.events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == "guardrail_blocked"
    assert "denied by alice" in failed.error.message
    assert [e.seq for e in denied.events] == [3, 4, 5]
    assert denied.state.status is RunStatus.FAILED


# --- the model's output -------------------------------------------------------------------------------


def _started(guardrails: Guardrails) -> domain.RunState:
    return domain.start(_submit("help me"), SPEC, CATALOG, guardrails=guardrails).state


def test_a_blocked_output_fails_the_task_after_its_step() -> None:
    guardrails = _guardrails(_check("secrets", "block", "output"))
    state = _started(guardrails)
    answer = ChatMessage(role="assistant", content=f"the key is {SECRET}")
    transition = domain.apply_llm_result(state, _result(state, answer), CATALOG, guardrails=guardrails)
    assert transition is not None
    assert [(e.kind, e.seq) for e in transition.events] == [("step", 2), ("guardrail", 3), ("failed", 4)]
    failed = transition.events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == "guardrail_blocked"
    assert failed.usage == TokenUsage(prompt_tokens=10, completion_tokens=5)
    assert SECRET not in _dumped(transition)


def test_a_redacted_output_completes_masked() -> None:
    guardrails = _guardrails(_check("personal_data", "redact", "output"))
    state = _started(guardrails)
    answer = ChatMessage(role="assistant", content=f"Write to {EMAIL}.")
    transition = domain.apply_llm_result(state, _result(state, answer), CATALOG, guardrails=guardrails)
    assert transition is not None
    completed = transition.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.output == "Write to [REDACTED:email]."
    assert EMAIL not in _dumped(transition)


def test_an_answer_held_for_approval_completes_once_released() -> None:
    guardrails = _guardrails(_check("personal_data", "require_approval", "output"))
    state = _started(guardrails)
    answer = ChatMessage(role="assistant", content=f"Write to {EMAIL}.")
    held = domain.apply_llm_result(state, _result(state, answer), CATALOG, guardrails=guardrails)
    assert held is not None
    assert [e.kind for e in held.events] == ["step", "guardrail"]
    [review] = held.tool_calls
    assert review.tool == GUARDRAIL_REVIEW_TOOL
    assert review.arguments["stage"] == "output"
    assert held.state.status is RunStatus.RUNNING
    released = domain.apply_tool_update(held.state, _review_result(held.state, approved=True))
    assert released is not None
    completed = released.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.output == f"Write to {EMAIL}."
    assert released.state.status is RunStatus.COMPLETED


def test_a_held_answer_that_is_denied_fails_the_task() -> None:
    guardrails = _guardrails(_check("personal_data", "require_approval", "output"))
    state = _started(guardrails)
    held = domain.apply_llm_result(
        state, _result(state, ChatMessage(role="assistant", content=f"{EMAIL}")), CATALOG, guardrails=guardrails
    )
    assert held is not None
    denied = domain.apply_tool_update(held.state, _review_result(held.state, approved=False))
    assert denied is not None
    failed = denied.events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.error.code == "guardrail_blocked"
    assert "the model's output" in failed.error.message


def test_cancelling_while_a_review_waits_withdraws_it() -> None:
    guardrails = _guardrails(_check("personal_data", "require_approval"))
    held = domain.start(_submit(f"mail {EMAIL}"), SPEC, CATALOG, guardrails=guardrails)
    cancelled = domain.cancel(held.state, TaskCancelRequested(task_id="t1", tenant="acme"))
    assert cancelled is not None
    assert [w.call_id for w in cancelled.withdrawals] == [held.tool_calls[0].call_id]
    assert cancelled.state.review is None


# --- tool-call arguments ------------------------------------------------------------------------------


def _calls(*calls: ToolCall) -> ChatMessage:
    return ChatMessage(role="assistant", tool_calls=list(calls))


def test_redacted_arguments_are_masked_in_the_step_event_the_call_and_the_conversation() -> None:
    guardrails = _guardrails(_check("personal_data", "redact", "tool_arguments"))
    state = _started(guardrails)
    call = ToolCall(id="c1", name="create_ticket", arguments={"title": "call back", "contact": [EMAIL]})
    transition = domain.apply_llm_result(state, _result(state, _calls(call)), CATALOG, guardrails=guardrails)
    assert transition is not None
    step, event = transition.events
    assert isinstance(step, TaskStep)
    assert isinstance(event, TaskGuardrail)
    assert step.tool_calls[0].arguments == {"title": "call back", "contact": ["[REDACTED:email]"]}
    assert (event.stage, event.step) == ("tool_arguments", 1)
    assert [(f.tool, f.field) for f in event.findings] == [("create_ticket", "contact[0]")]
    [request] = transition.tool_calls
    assert request.arguments == {"title": "call back", "contact": ["[REDACTED:email]"]}
    assert request.guardrail is None
    assert EMAIL not in _dumped(transition)


def test_a_blocked_or_held_call_goes_to_the_executor_with_the_verdict() -> None:
    guardrails = _guardrails(
        _check("secrets", "block", "tool_arguments"),
        _check("deny_list", "require_approval", "tool_arguments", patterns=["(?i)urgent"]),
    )
    state = _started(guardrails)
    blocked = ToolCall(id="c1", name="create_ticket", arguments={"title": f"key {SECRET}"})
    held = ToolCall(id="c2", name="create_ticket", arguments={"title": "URGENT: disk full"})
    plain = ToolCall(id="c3", name="create_ticket", arguments={"title": "printer jam"})
    transition = domain.apply_llm_result(
        state, _result(state, _calls(blocked, held, plain)), CATALOG, guardrails=guardrails
    )
    assert transition is not None
    verdicts = [(r.tool_call_id, r.guardrail.action if r.guardrail else None) for r in transition.tool_calls]
    assert verdicts == [("c1", "block"), ("c2", "require_approval"), ("c3", None)]
    event = transition.events[-1]
    assert isinstance(event, TaskGuardrail)
    assert event.action == "block"
    assert SECRET not in "\n".join(e.model_dump_json() for e in transition.events)


def test_a_blocked_in_process_tool_call_returns_an_error_the_model_reads() -> None:
    guardrails = _guardrails(_check("deny_list", "block", "tool_arguments", patterns=[r"\*\*"]))
    state = _started(guardrails)
    call = ToolCall(id="c1", name="calculator", arguments={"expression": "2**64"})
    transition = domain.apply_llm_result(state, _result(state, _calls(call)), CATALOG, guardrails=guardrails)
    assert transition is not None
    assert transition.tool_calls == []
    assert transition.llm_request is not None
    tool_message = transition.llm_request.messages[-1]
    assert tool_message.role == "tool"
    assert tool_message.content.startswith("error: guardrail_blocked")
    assert "policy/deny_list" in tool_message.content


# --- specs --------------------------------------------------------------------------------------------


def test_an_agent_naming_an_unknown_policy_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "a.yaml").write_text("name: a\nmodel: scripted\nsystem_prompt: hi\nguardrails: [privacy, nope]\n")
    policies = tmp_path / "guardrails.yaml"
    policies.write_text("policies:\n  privacy:\n    checks:\n      - {detector: personal_data, action: redact}\n")
    settings = RunnerSettings(agents_dir=agents, guardrails_file=policies, tools_dir=tmp_path / "none")
    with pytest.raises(AgentSpecError) as raised:
        create_app(settings)
    assert "a.yaml: field 'guardrails[1]': no policy 'nope'" in str(raised.value)


def test_the_shipped_agents_name_the_shipped_policies() -> None:
    settings = RunnerSettings(
        agents_dir=REPO / "agents",
        tools_dir=REPO / "tools",
        memory_dir=REPO / "memory",
        guardrails_file=REPO / "config" / "guardrails.yaml",
    )
    create_app(settings)  # raises if an agent named a policy the file does not have
    support = AgentSpec.model_validate(yaml.safe_load((REPO / "agents" / "support.yaml").read_text()))
    assert support.guardrails == ["no-secrets", "privacy"]


# --- classifier models --------------------------------------------------------------------------------


def _judge(action: str, *stages: str) -> GuardrailCheck:
    return _check("model", action, *stages, model="judge", instructions="No insults.", name="civility")


def _answer(state: domain.RunState, text: str | None) -> LlmResult:
    assert state.awaiting_request_id is not None
    return LlmResult(
        request_id=state.awaiting_request_id,
        task_id=state.task_id,
        tenant=state.tenant,
        model="judge",
        step=max(state.step, 1),
        message=ChatMessage(role="assistant", content=text) if text is not None else None,
        error=None if text is not None else ErrorInfo(code="engine_error", message="down"),
        usage=TokenUsage(prompt_tokens=7, completion_tokens=2),
        usage_id=f"u-{state.awaiting_request_id}",
    )


def test_the_input_waits_for_its_classifier_which_is_costed_with_the_task() -> None:
    guardrails = _guardrails(_check("personal_data", "redact"), _judge("block", "input"))
    started = domain.start(_submit(f"mail {EMAIL}"), SPEC, CATALOG, guardrails=guardrails)
    request = started.llm_request
    assert request is not None
    assert (request.purpose, request.model, request.requested_model) == ("guardrail", "judge", "judge")
    assert request.messages[-1].content == "mail [REDACTED:email]"
    assert "No insults." in request.messages[0].content
    timer = started.wake
    assert timer is not None
    redriven = domain.wake(started.state, timer.model_copy(update={"kind": "step", "step": 0}), timer.due_at)
    assert redriven is not None
    assert redriven.llm_request == request
    safe = domain.apply_llm_result(started.state, _answer(started.state, "SAFE"), CATALOG, guardrails=guardrails)
    assert safe is not None
    assert safe.events == []
    assert safe.llm_request is not None
    assert (safe.llm_request.purpose, safe.llm_request.step) == ("step", 1)
    assert safe.llm_request.messages[-1].content == "mail [REDACTED:email]"
    assert safe.state.usage == TokenUsage(prompt_tokens=7, completion_tokens=2)
    assert safe.state.usage_ids == [f"u-{request.request_id}"]


def test_a_flagged_input_is_blocked_and_an_unanswered_classifier_fails_closed() -> None:
    guardrails = _guardrails(_judge("block", "input"))
    for answer, kind in (("FLAG: personal insult", "model:personal_insult"), (None, "classifier_unavailable")):
        started = domain.start(_submit("you fool"), SPEC, CATALOG, guardrails=guardrails)
        ended = domain.apply_llm_result(started.state, _answer(started.state, answer), CATALOG, guardrails=guardrails)
        assert ended is not None
        assert [e.kind for e in ended.events] == ["guardrail", "failed"]
        event, failed = ended.events
        assert isinstance(event, TaskGuardrail)
        assert [(f.detector, f.kind, f.check) for f in event.findings] == [("model", kind, "civility")]
        assert isinstance(failed, TaskFailed)
        assert failed.error.code == "guardrail_blocked"
        assert ended.llm_request is None


def test_a_final_answer_the_classifier_flags_waits_for_an_approver() -> None:
    guardrails = _guardrails(_judge("require_approval", "output"))
    state = _started(guardrails)
    answered = domain.apply_llm_result(
        state, _result(state, ChatMessage(role="assistant", content="you fool")), CATALOG, guardrails=guardrails
    )
    assert answered is not None
    assert [e.kind for e in answered.events] == ["step"]
    assert answered.llm_request is not None
    assert answered.llm_request.purpose == "guardrail"
    judged = domain.apply_llm_result(
        answered.state, _answer(answered.state, "FLAG: insult"), CATALOG, guardrails=guardrails
    )
    assert judged is not None
    assert [e.kind for e in judged.events] == ["guardrail"]
    [review] = judged.tool_calls
    assert review.arguments["stage"] == "output"
    assert review.guardrail is not None
    assert "policy/civility: model:insult" in review.guardrail.reason
    released = domain.apply_tool_update(judged.state, _review_result(judged.state, approved=True))
    assert released is not None
    completed = released.events[-1]
    assert isinstance(completed, TaskCompleted)
    assert completed.output == "you fool"
    assert completed.usage == TokenUsage(prompt_tokens=17, completion_tokens=7)


def test_a_final_answer_the_classifier_passes_completes() -> None:
    guardrails = _guardrails(_judge("block", "output"))
    state = _started(guardrails)
    answered = domain.apply_llm_result(
        state, _result(state, ChatMessage(role="assistant", content="Hello.")), CATALOG, guardrails=guardrails
    )
    assert answered is not None
    done = domain.apply_llm_result(answered.state, _answer(answered.state, "SAFE"), CATALOG, guardrails=guardrails)
    assert done is not None
    assert [(e.kind, e.seq) for e in done.events] == [("completed", 3)]
    assert done.state.status is RunStatus.COMPLETED
