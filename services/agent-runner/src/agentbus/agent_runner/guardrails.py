"""The agent's guardrails in a run: what a verdict becomes (events, masked text, held calls, reviews).

Pure, like the domain that uses it. A finding turns into a `guardrail` event that names the policy, the check,
the detector and the kind of thing found, never the text itself. A task input or final answer that a
`require_approval` check holds goes to the tool-executor's approval inbox as a call of the
`guardrail_review` tool: approvers see it there like any risky call (same identities, expiry, audit trail);
approving it releases the text, denying it or letting it expire fails the task `guardrail_blocked`.

A `model` check asks a classifier model through the inference-worker (an LLM request of purpose `guardrail`,
costed, budgeted and traced like any step) about the input, or the final answer, after the stage's pattern
detectors masked it; its findings are a `guardrail` event of their own.
"""

from __future__ import annotations

from typing import Literal

from agentbus.agent_runner.sessions import SessionTurn
from agentbus.contracts.llm import ChatMessage, LlmRequest
from agentbus.contracts.tasks import GuardrailFinding, TaskGuardrail
from agentbus.contracts.tools import GUARDRAIL_REVIEW_TOOL, ToolCallGuardrail, ToolCallRequested
from agentbus.runtime.guardrails import ACTION_PRECEDENCE, Action, Finding, ModelCheck, Verdict
from pydantic import BaseModel, ConfigDict, Field

REVIEW_TEXT_CHARS = 4000
"""Most characters of the held text an approver is shown in the review call's arguments."""
MAX_REASON_CHARS = 2000

ReviewStage = Literal["input", "output"]


class GuardrailReview(BaseModel):
    """A task input or final answer held for an approver, and what the run goes on with once it is released."""

    model_config = ConfigDict(frozen=True)

    call_id: str = Field(description="The review call's id: the executor's exactly-once key.")
    stage: ReviewStage
    step: int = Field(ge=0, description="0 for the input; the step of the held answer.")
    reason: str
    text: str = Field(description="The held text (masked where a check redacts).")
    requested: bool = Field(default=False, description="The review call went out.")
    history_summary: str | None = Field(default=None, description="Input: the session's summary when it began.")
    history: list[SessionTurn] = Field(default_factory=list, description="Input: the session's turns when it began.")


class Flag(BaseModel):
    """What a classifier found, as the event shows it and as a reason says it."""

    model_config = ConfigDict(frozen=True)

    finding: GuardrailFinding
    reason: str


class Classification(BaseModel):
    """A task input or final answer that waits for the stage's classifier models, asked one after another."""

    model_config = ConfigDict(frozen=True)

    stage: ReviewStage
    step: int = Field(ge=0, description="0 for the input; the step of the answer.")
    text: str = Field(description="The text judged (masked where a pattern check redacts).")
    checks: list[ModelCheck] = Field(min_length=1)
    index: int = Field(default=0, description="The check whose classifier is asked now.")
    requested: bool = False
    flags: list[Flag] = Field(default_factory=list)
    held: str | None = Field(default=None, description="A pattern check's reason to hold the text for review.")
    history_summary: str | None = None
    history: list[SessionTurn] = Field(default_factory=list)

    @property
    def check(self) -> ModelCheck:
        return self.checks[self.index]

    def answered(self, answer: str | None) -> Classification:
        """The current check answered (None: its classifier gave no answer)."""
        finding = self.check.finding(self.stage, answer, self.text)
        flags = self.flags
        if finding is not None:
            flags = [*flags, Flag(finding=_finding(finding, None), reason=finding.describe())]
        return self.model_copy(update={"flags": flags, "index": self.index + 1, "requested": False})

    @property
    def done(self) -> bool:
        return self.index >= len(self.checks)

    def action(self) -> Action | None:
        actions: list[Action] = [flag.finding.action for flag in self.flags]
        if not actions:
            return None
        strongest: Action = max(actions, key=ACTION_PRECEDENCE.__getitem__)
        return strongest

    def reason(self, action: Action) -> str:
        return "; ".join(flag.reason for flag in self.flags if flag.finding.action == action)[:MAX_REASON_CHARS]


def classification_request_id(tenant: str, task_id: str, plan: Classification) -> str:
    return f"{tenant}.{task_id}.guard-{plan.stage}-{plan.step}-{plan.index}"


def classification_request(
    plan: Classification, *, request_id: str, deployment: str, task_id: str, tenant: str, agent: str, event_seq: int
) -> LlmRequest:
    """Ask the current check's classifier about the text."""
    check = plan.check
    return LlmRequest(
        request_id=request_id,
        task_id=task_id,
        tenant=tenant,
        agent=agent,
        model=deployment,
        requested_model=check.model,
        step=max(plan.step, 1),
        messages=[
            ChatMessage(role="system", content=check.prompt()),
            ChatMessage(role="user", content=plan.text),
        ],
        max_tokens=64,
        purpose="guardrail",
        event_seq=event_seq,
    )


def review_call_id(tenant: str, task_id: str, stage: ReviewStage, step: int) -> str:
    return f"{tenant}.{task_id}.review-{stage}-{step}"


def findings_of(verdict: Verdict, tool: str | None = None) -> list[GuardrailFinding]:
    """The verdict's findings as the event shows them (with the tool, for a tool call's arguments)."""
    return [_finding(finding, tool) for finding in verdict.findings]


def _finding(finding: Finding, tool: str | None) -> GuardrailFinding:
    return GuardrailFinding(
        policy=finding.policy,
        check=finding.check,
        detector=finding.detector,
        action=finding.action,
        kind=finding.kind,
        field=finding.field,
        tool=tool,
    )


def guardrail_event(
    task_id: str,
    tenant: str,
    seq: int,
    stage: Literal["input", "tool_arguments", "output"],
    findings: list[GuardrailFinding],
    step: int,
) -> TaskGuardrail:
    """One stage's findings; its action is the strongest of theirs."""
    action = max((f.action for f in findings), key=lambda a: ACTION_PRECEDENCE[a])
    return TaskGuardrail(
        task_id=task_id, tenant=tenant, seq=seq, stage=stage, action=action, step=step, findings=findings
    )


def reason_of(verdict: Verdict) -> str:
    return verdict.reason()[:MAX_REASON_CHARS]


def review_request(
    review: GuardrailReview, *, task_id: str, tenant: str, agent: str, submitted_by: str | None
) -> ToolCallRequested:
    """The call that puts a held input or answer into the approval inbox."""
    return ToolCallRequested(
        call_id=review.call_id,
        tool_call_id=review.call_id,
        task_id=task_id,
        tenant=tenant,
        agent=agent,
        tool=GUARDRAIL_REVIEW_TOOL,
        arguments={"stage": review.stage, "findings": review.reason, "text": review.text[:REVIEW_TEXT_CHARS]},
        step=max(review.step, 1),
        submitted_by=submitted_by,
        guardrail=ToolCallGuardrail(action="require_approval", reason=review.reason),
    )
