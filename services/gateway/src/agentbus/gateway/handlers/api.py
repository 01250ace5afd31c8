"""The HTTP API: each call decoded into one use case, which maps onto the bus subjects of the wire contract.
Request and reply bodies are built from the contract models, so the OpenAPI document says what the bus says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from agentbus.contracts.approvals import ApprovalDecision, ApprovalDecisionVerdict, ApprovalEntry
from agentbus.contracts.common import ID_PATTERN
from agentbus.contracts.tasks import TaskCancelRequested, TaskEvent, TaskSubmitted
from agentbus.gateway.domain import Identity, TaskState, last_event_id
from agentbus.gateway.handlers.auth import Context, api_identity, basic_identity, context
from agentbus.gateway.service import NewTask, TaskStreamStart
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter(prefix="/v1")

Caller = Annotated[Identity, Depends(api_identity)]
Ctx = Annotated[Context, Depends(context)]
TaskId = Annotated[str, Path(pattern=ID_PATTERN, description="The task's id.")]
ApprovalId = Annotated[str, Path(pattern=ID_PATTERN, description="The approval's id.")]
TenantQuery = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description="The tenant. May be left out by an identity of one tenant."),
]


class Problem(BaseModel):
    """Why a call failed."""

    detail: str = Field(description="What went wrong, for a person.")


def _problems(
    *codes: int, extra: dict[int | str, dict[str, Any]] | None = None, streams: bool = False
) -> dict[int | str, dict[str, Any]]:
    """The documented error answers (each a Problem), and `extra` answers of the call itself. `streams`: the
    route's own answer is an event stream, while its errors are still JSON."""
    meaning = {
        401: "No valid credentials.",
        403: "The identity may not do this (the gateway's check or nats-server's permissions).",
        404: "No such task or approval where the identity may look.",
        400: "The request names something impossible (a tenant to pick, an invalid decision).",
        503: "A service the call needs did not answer.",
    }
    as_json = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    problems: dict[int | str, dict[str, Any]] = {
        code: {"description": meaning[code], **(as_json if streams else {"model": Problem})} for code in codes
    }
    return {**(extra or {}), **problems}


_FIELDS = TaskSubmitted.model_fields
_EVENT_FRAME: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "description": "The event's kind."},
        "id": {"type": "string", "description": "The event's seq; token events have none."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in get_args(get_args(TaskEvent)[0])],
                "discriminator": {"propertyName": "kind"},
            },
        },
    },
}
"""One server-sent event of a task's stream: a TaskEvent of the wire contract as its data."""


class TaskSubmission(BaseModel):
    """A task to submit: `TaskSubmitted` of the wire contract, whose id the gateway makes up when left out.
    The submitter is the caller (the last token of the submit subject)."""

    model_config = ConfigDict(extra="forbid")

    tenant: Annotated[str, _FIELDS["tenant"]]
    agent: Annotated[str, _FIELDS["agent"]]
    input: Annotated[str, _FIELDS["input"]]
    task_id: Annotated[str | None, Field(pattern=ID_PATTERN, description=_FIELDS["task_id"].description)] = None
    budget_usd: Annotated[float | None, _FIELDS["budget_usd"]] = None
    deadline_seconds: Annotated[float | None, _FIELDS["deadline_seconds"]] = None
    metadata: Annotated[dict[str, Any], _FIELDS["metadata"]] = Field(default_factory=dict)


class SubmittedTaskReply(BaseModel):
    task: TaskSubmitted = Field(description="What was published on agentbus.tasks.submit.<tenant>.<submitter>.")
    duplicate: bool = Field(description="The id was taken before: nothing new runs.")
    first_event: TaskEvent | None = Field(
        description="The runner's first event (accepted or rejected), if it came within the wait."
    )
    events_url: str
    state_url: str


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str | None, TaskCancelRequested.model_fields["reason"]] = None


class CancelReply(BaseModel):
    cancel: TaskCancelRequested = Field(description="What was published on agentbus.tasks.cancel.<tenant>.<submitter>.")
    state: TaskState = Field(description="The task's state when the cancellation was sent.")


class ApprovalsReply(BaseModel):
    approvals: list[ApprovalEntry]


_DECISION = ApprovalDecision.model_fields


class DecisionBody(BaseModel):
    """A decision on an approval: `ApprovalDecision` of the wire contract, whose approver is the caller."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "deny"]
    arguments_sha256: Annotated[str, _DECISION["arguments_sha256"]]
    reason: Annotated[str | None, _DECISION["reason"]] = None
    tenant: Annotated[
        str | None, Field(pattern=ID_PATTERN, description="The approval's tenant; found when left out.")
    ] = None


class DecisionReply(BaseModel):
    tenant: str
    task_id: str
    decision: ApprovalDecision = Field(
        description="What was published on agentbus.approvals.decisions.<tenant>.<approver>."
    )
    decision_seq: int = Field(description="The decision's stream sequence (its PubAck).")
    verdict: ApprovalDecisionVerdict | None = Field(
        description="The tool-executor's verdict on this decision; null when none came in time (HTTP 202)."
    )


class TokenReply(BaseModel):
    token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme, not a secret
    identity: str
    expires_at: datetime


class IdentityReply(BaseModel):
    identity: str
    submits_for: list[str]
    approves_for: list[str]
    operator: bool


@router.post(
    "/tokens",
    response_model=TokenReply,
    responses=_problems(401),
    summary="Issue a bearer token (HTTP Basic: identity and the password of one of its NATS users)",
)
def issue_token(identity: Annotated[Identity, Depends(basic_identity)], ctx: Ctx) -> TokenReply:
    token, expires_at = ctx.tokens.issue(identity.name)
    return TokenReply(token=token, identity=identity.name, expires_at=expires_at)


@router.get("/identity", response_model=IdentityReply, responses=_problems(401), summary="Who the token names")
def whoami(identity: Caller) -> IdentityReply:
    return IdentityReply(
        identity=identity.name,
        submits_for=list(identity.submits_for),
        approves_for=list(identity.approves_for),
        operator=identity.operator,
    )


@router.post(
    "/tasks",
    status_code=202,
    response_model=SubmittedTaskReply,
    responses=_problems(
        400, 401, 403, 503, extra={200: {"model": SubmittedTaskReply, "description": "The id was taken before."}}
    ),
    summary="Submit a task as the caller",
)
async def submit_task(body: TaskSubmission, identity: Caller, ctx: Ctx, response: Response) -> SubmittedTaskReply:
    submitted = await ctx.service.submit_task(
        identity,
        NewTask(
            tenant=body.tenant,
            agent=body.agent,
            input=body.input,
            task_id=body.task_id,
            budget_usd=body.budget_usd,
            deadline_seconds=body.deadline_seconds,
            metadata=body.metadata,
        ),
    )
    task = submitted.task
    if submitted.duplicate:
        response.status_code = 200
    query = f"?tenant={task.tenant}"
    return SubmittedTaskReply(
        task=task,
        duplicate=submitted.duplicate,
        first_event=submitted.first_event,
        events_url=f"/v1/tasks/{task.task_id}/events{query}",
        state_url=f"/v1/tasks/{task.task_id}{query}",
    )


@router.get(
    "/tasks/{task_id}",
    response_model=TaskState,
    responses=_problems(400, 401, 403, 404, 503),
    summary="A task's state, from its stored events",
)
async def get_task(task_id: TaskId, identity: Caller, ctx: Ctx, tenant: TenantQuery = None) -> TaskState:
    return await ctx.service.task_state(identity, task_id, tenant)


async def _stream_start(
    task_id: TaskId,
    identity: Caller,
    ctx: Ctx,
    tenant: TenantQuery = None,
    last_event: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=r"^[0-9]{1,15}$",
            description="The seq of the last event received: the stream resumes after it.",
        ),
    ] = None,
) -> TaskStreamStart:
    start = await ctx.service.open_task_stream(identity, task_id, tenant, last_event_id(last_event))
    if start.ended:
        # Before the stream starts: 204 also tells a browser's EventSource not to reconnect.
        raise HTTPException(status_code=204)
    return start


@router.get(
    "/tasks/{task_id}/events",
    response_class=EventSourceResponse,
    responses=_problems(
        400,
        401,
        403,
        404,
        503,
        extra={
            200: {"content": {"text/event-stream": {"itemSchema": _EVENT_FRAME}}},
            204: {"description": "The client saw the terminal event already."},
        },
        streams=True,
    ),
    summary="A task's events as server-sent events, from seq 1 or after Last-Event-ID, until its terminal event",
    description=(
        "Each numbered event is sent with `id: <seq>` and `event: <kind>`; token events carry no id, so "
        "`Last-Event-ID` always names the last numbered event and a resumed stream has no gap and no repeat."
    ),
)
async def task_events(start: Annotated[TaskStreamStart, Depends(_stream_start)], ctx: Ctx) -> AsyncIterator[TaskEvent]:
    # The annotation documents each frame's data; the frames themselves carry the id and the event name.
    frames: AsyncIterator[Any] = sse_frames(ctx.service.follow_task(start))
    async for frame in frames:
        yield frame


async def sse_frames(events: AsyncIterator[TaskEvent]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        yield ServerSentEvent(
            raw_data=event.model_dump_json(),
            event=event.kind,
            id=None if event.kind == "token" else str(event.seq),
        )


@router.post(
    "/tasks/{task_id}/cancel",
    status_code=202,
    response_model=CancelReply,
    responses=_problems(400, 401, 403, 404, 503),
    summary="Cancel a task as the caller; one that ended is left as it is",
)
async def cancel_task(
    task_id: TaskId, identity: Caller, ctx: Ctx, tenant: TenantQuery = None, body: CancelBody | None = None
) -> CancelReply:
    reason = body.reason if body else None
    state = await ctx.service.cancel_task(identity, task_id, tenant, reason)
    return CancelReply(cancel=TaskCancelRequested(task_id=task_id, tenant=state.tenant, reason=reason), state=state)


@router.get(
    "/approvals",
    response_model=ApprovalsReply,
    responses=_problems(401, 403, 503),
    summary="Approvals of the caller's tenants, oldest first, as the tool-executor lists them",
)
async def list_approvals(
    identity: Caller,
    ctx: Ctx,
    tenant: TenantQuery = None,
    include_resolved: Annotated[bool, Query(description="Also approvals that ended.")] = False,
) -> ApprovalsReply:
    return ApprovalsReply(approvals=await ctx.service.approvals(identity, tenant, include_resolved))


@router.post(
    "/approvals/{approval_id}/decision",
    response_model=DecisionReply,
    responses=_problems(
        400,
        401,
        403,
        404,
        503,
        extra={
            202: {"model": DecisionReply, "description": "Sent; the tool-executor gave no verdict in time."},
            409: {"model": DecisionReply, "description": "The tool-executor refused the decision: see the verdict."},
        },
    ),
    summary="Approve or deny as the caller, and wait for the tool-executor's verdict",
)
async def decide(
    approval_id: ApprovalId, body: DecisionBody, identity: Caller, ctx: Ctx, response: Response
) -> DecisionReply:
    outcome = await ctx.service.decide(
        identity, approval_id, body.decision, body.arguments_sha256, body.reason, body.tenant
    )
    verdict = outcome.receipt.verdict
    response.status_code = 202 if verdict is None else 409 if verdict.outcome == "refused" else 200
    return DecisionReply(
        tenant=outcome.request.tenant,
        task_id=outcome.request.task_id,
        decision=outcome.decision,
        decision_seq=outcome.receipt.decision_seq,
        verdict=verdict,
    )
