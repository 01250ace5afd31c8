"""Decode messages into contract types, then call one use case. Rules live in service.py and domain.py."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from agentbus.agent_runner.domain import ErrorCode
from agentbus.agent_runner.service import RunnerService
from agentbus.contracts.common import ID_PATTERN
from agentbus.contracts.llm import LlmResult
from agentbus.contracts.registry import TASK_CANCEL, TASK_SUBMIT, SubjectSpec
from agentbus.contracts.tasks import TaskCancelRequested, TaskSubmitted
from agentbus.contracts.tools import ToolCallUpdate
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from pydantic import BaseModel, ValidationError

_ID = re.compile(ID_PATTERN)
_Model = TypeVar("_Model", bound=BaseModel)
INVALID_SUBJECT = "invalid_subject"


def _subject_tenant(spec: SubjectSpec, subject: str) -> str:
    try:
        tenant = spec.parse(subject)["tenant"]
    except ValueError as exc:
        raise TerminalError(INVALID_SUBJECT, str(exc)) from exc
    if not _ID.fullmatch(tenant):
        raise TerminalError(INVALID_SUBJECT, f"tenant token {tenant!r} is not a valid identifier")
    return tenant


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(p) for p in error["loc"]) or "(message)"
        parts.append(f"{location}: {error['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


class _UndecodableError(Exception):
    def __init__(self, code: ErrorCode, message: str, task_id: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.task_id = task_id


def _decode(model: type[_Model], delivery: Delivery) -> _Model:
    header_id = delivery.msg_id if delivery.msg_id and _ID.fullmatch(delivery.msg_id) else None
    try:
        raw: Any = json.loads(delivery.data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _UndecodableError(ErrorCode.MALFORMED_JSON, f"payload is not UTF-8 JSON: {exc}", header_id) from exc
    payload_id = raw.get("task_id") if isinstance(raw, dict) else None
    task_id = payload_id if isinstance(payload_id, str) and _ID.fullmatch(payload_id) else header_id
    if not isinstance(raw, dict):
        raise _UndecodableError(ErrorCode.SCHEMA_VIOLATION, "payload must be a JSON object", task_id)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _UndecodableError(ErrorCode.SCHEMA_VIOLATION, _validation_summary(exc), task_id) from exc


class RunnerHandlers:
    def __init__(self, service: RunnerService) -> None:
        self._service = service

    async def on_task_submitted(self, delivery: Delivery) -> None:
        tenant = _subject_tenant(TASK_SUBMIT, delivery.subject)
        try:
            submission = _decode(TaskSubmitted, delivery)
        except _UndecodableError as bad:
            if bad.task_id is None:
                # No task id anywhere: there is no event stream to answer on, so keep it as a dead letter.
                raise TerminalError(bad.code, f"{bad.message} (and no valid task_id to reject)") from bad
            await self._service.reject(bad.task_id, tenant, bad.code, bad.message, delivery.trace)
            return
        if submission.tenant != tenant:
            await self._service.reject(
                submission.task_id,
                tenant,
                ErrorCode.TENANT_MISMATCH,
                f"payload tenant {submission.tenant!r} differs from the subject's tenant {tenant!r}",
                delivery.trace,
            )
            return
        await self._service.submit(submission, delivery.trace)

    async def on_task_cancel_requested(self, delivery: Delivery) -> None:
        tenant = _subject_tenant(TASK_CANCEL, delivery.subject)
        try:
            request = _decode(TaskCancelRequested, delivery)
        except _UndecodableError as bad:
            raise TerminalError(bad.code, bad.message) from bad
        if request.tenant != tenant:
            raise TerminalError(
                ErrorCode.TENANT_MISMATCH, f"payload tenant {request.tenant!r} differs from subject's {tenant!r}"
            )
        await self._service.cancel(request, delivery.trace)

    async def on_tool_update(self, delivery: Delivery) -> None:
        try:
            update = _decode(ToolCallUpdate, delivery)
        except _UndecodableError as bad:
            raise TerminalError(bad.code, bad.message) from bad
        await self._service.apply_tool_update(update, delivery.trace)

    async def on_llm_result(self, delivery: Delivery) -> None:
        try:
            result = _decode(LlmResult, delivery)
        except _UndecodableError as bad:
            raise TerminalError(bad.code, bad.message) from bad
        await self._service.advance(result, delivery.trace)
