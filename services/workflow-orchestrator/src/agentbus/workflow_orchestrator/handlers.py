"""Decode messages into contract types, then call one use case. Rules live in service.py and domain.py."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from agentbus.contracts.common import ID_PATTERN, ErrorInfo
from agentbus.contracts.registry import (
    TASK_EVENT,
    WORKFLOW_CANCEL,
    WORKFLOW_REPLAY,
    WORKFLOW_SUBMIT,
    WORKFLOWS_LIST,
    SubjectSpec,
)
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER
from agentbus.contracts.workflows import (
    WorkflowAdmission,
    WorkflowCancelRequested,
    WorkflowReplayReply,
    WorkflowReplayRequest,
    WorkflowsListReply,
    WorkflowsListRequest,
    WorkflowSubmitted,
    WorkflowTimer,
)
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.logging import bind_message_context
from agentbus.runtime.replies import Request
from agentbus.workflow_orchestrator.domain import STEP_TASK_PREFIX, ErrorCode
from agentbus.workflow_orchestrator.service import OrchestratorService
from pydantic import BaseModel, ValidationError

_ID = re.compile(ID_PATTERN)
_Model = TypeVar("_Model", bound=BaseModel)
INVALID_SUBJECT = "invalid_subject"

STEP_EVENT_KINDS = frozenset({"approval_pending", "completed", "failed", "cancelled", "budget_exceeded", "rejected"})
"""The events of a step's task that move its run: an approval it waits for, and how it ended."""


def _subject_tokens(spec: SubjectSpec, subject: str) -> dict[str, str]:
    try:
        tokens = spec.parse(subject)
    except ValueError as exc:
        raise TerminalError(INVALID_SUBJECT, str(exc)) from exc
    for name, value in tokens.items():
        if not _ID.fullmatch(value):
            raise TerminalError(INVALID_SUBJECT, f"{name} token {value!r} is not a valid identifier")
    return tokens


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(p) for p in error["loc"]) or "(message)"
        parts.append(f"{location}: {error['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


class _UndecodableError(Exception):
    def __init__(self, code: ErrorCode, message: str, run_id: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.run_id = run_id


def _decode(model: type[_Model], data: bytes, header_id: str | None = None) -> _Model:
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _UndecodableError(ErrorCode.MALFORMED_JSON, f"payload is not UTF-8 JSON: {exc}", header_id) from exc
    payload_id = raw.get("run_id") if isinstance(raw, dict) else None
    run_id = payload_id if isinstance(payload_id, str) and _ID.fullmatch(payload_id) else header_id
    if not isinstance(raw, dict):
        raise _UndecodableError(ErrorCode.SCHEMA_VIOLATION, "payload must be a JSON object", run_id)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _UndecodableError(ErrorCode.SCHEMA_VIOLATION, _validation_summary(exc), run_id) from exc


def _delivered(model: type[_Model], delivery: Delivery) -> _Model:
    try:
        return _decode(model, delivery.data)
    except _UndecodableError as bad:
        raise TerminalError(bad.code, bad.message) from bad


class OrchestratorHandlers:
    def __init__(self, service: OrchestratorService) -> None:
        self._service = service

    async def on_workflow_submitted(self, delivery: Delivery) -> None:
        tokens = _subject_tokens(WORKFLOW_SUBMIT, delivery.subject)
        tenant, submitter = tokens["tenant"], tokens["submitter"]
        header_id = delivery.msg_id if delivery.msg_id and _ID.fullmatch(delivery.msg_id) else None
        try:
            submission = _decode(WorkflowSubmitted, delivery.data, header_id)
        except _UndecodableError as bad:
            if bad.run_id is None:
                # No run id anywhere: there is no event stream to answer on, so keep it as a dead letter.
                raise TerminalError(bad.code, f"{bad.message} (and no valid run_id to reject)") from bad
            await self._service.reject(bad.run_id, tenant, bad.code, bad.message, delivery.trace)
            return
        if submission.tenant != tenant:
            message = f"payload tenant {submission.tenant!r} differs from the subject's tenant {tenant!r}"
            await self._service.reject(submission.run_id, tenant, ErrorCode.TENANT_MISMATCH, message, delivery.trace)
            return
        if submission.submitted_by is not None and submission.submitted_by != submitter:
            # Who submitted is what the server enforced (the subject's token), never what the body claims.
            message = (
                f"submitted_by {submission.submitted_by!r} differs from the submitter {submitter!r} the subject "
                "names (and nats-server binds to the publishing user)"
            )
            await self._service.reject(submission.run_id, tenant, ErrorCode.IDENTITY_MISMATCH, message, delivery.trace)
            return
        bind_message_context(submitted_by=submitter)
        await self._service.submit(submission.model_copy(update={"submitted_by": submitter}), delivery.trace)

    async def on_workflow_cancel_requested(self, delivery: Delivery) -> None:
        tokens = _subject_tokens(WORKFLOW_CANCEL, delivery.subject)
        request = _delivered(WorkflowCancelRequested, delivery)
        if request.tenant != tokens["tenant"]:
            raise TerminalError(
                ErrorCode.TENANT_MISMATCH,
                f"payload tenant {request.tenant!r} differs from the subject's {tokens['tenant']!r}",
            )
        await self._service.cancel(request, tokens["submitter"], delivery.trace)

    @staticmethod
    def passes_over_task_event(subject: str) -> bool:
        """True for the events of a task that is no workflow's step (its id lacks the steps' prefix): the
        consumer acks those as they arrive, without a handler."""
        try:
            tokens = TASK_EVENT.parse(subject)
        except ValueError:
            return True
        return not tokens["task_id"].startswith(STEP_TASK_PREFIX)

    async def on_task_event(self, delivery: Delivery) -> None:
        """Every task's events pass here; only those of workflow steps' tasks, and only the kinds that move a
        run, are looked at (a step's task id has its own prefix, checked before anything is decoded)."""
        if self.passes_over_task_event(delivery.subject):
            return
        tokens = TASK_EVENT.parse(delivery.subject)
        try:
            event = TASK_EVENT_ADAPTER.validate_json(delivery.data)
        except ValidationError:
            return  # not an event of the contract: nothing to act on
        if event.kind not in STEP_EVENT_KINDS or event.task_id != tokens["task_id"]:
            return
        await self._service.task_event(tokens["tenant"], event)

    async def on_timer(self, delivery: Delivery) -> None:
        await self._service.wake(_delivered(WorkflowTimer, delivery))

    async def on_admission(self, delivery: Delivery) -> None:
        await self._service.admission(_delivered(WorkflowAdmission, delivery))

    async def on_replay_request(self, request: Request) -> WorkflowReplayReply:
        try:
            tokens = WORKFLOW_REPLAY.parse(request.subject)
        except ValueError as exc:
            return WorkflowReplayReply(run_id="", tenant="", error=ErrorInfo(code=INVALID_SUBJECT, message=str(exc)))
        tenant, run_id = tokens["tenant"], tokens["run_id"]
        try:
            replay = WorkflowReplayRequest.model_validate_json(request.data or b"{}")
        except ValidationError as exc:
            error = ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=_validation_summary(exc))
            return WorkflowReplayReply(run_id=run_id, tenant=tenant, error=error)
        return await self._service.replay(tenant, run_id, replay)

    async def on_list_request(self, request: Request) -> WorkflowsListReply:
        try:
            WORKFLOWS_LIST.parse(request.subject)
            listing = WorkflowsListRequest.model_validate_json(request.data or b"{}")
        except ValueError as exc:
            message = _validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)
            return WorkflowsListReply(error=ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=message))
        return self._service.workflows_list(listing)
