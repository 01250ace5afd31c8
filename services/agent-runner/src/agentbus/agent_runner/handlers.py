"""Decode messages into contract types, then call one use case. Rules live in service.py and domain.py."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from agentbus.agent_runner.domain import ErrorCode
from agentbus.agent_runner.service import RunnerService
from agentbus.contracts.common import ID_PATTERN, ErrorInfo
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.llm import LlmResult
from agentbus.contracts.registry import (
    LLM_REQUESTS,
    LLM_RESULTS,
    RUN_TIMERS,
    RUNNER_DEAD_LETTERS,
    SESSION_DELETE,
    SESSION_SHOW,
    SESSIONS_LIST,
    TASK_CANCEL,
    TASK_REPLAY,
    TASK_SUBMIT,
    TASKS,
    TOOL_CALLS,
    TOOL_UPDATES,
    SubjectSpec,
)
from agentbus.contracts.runs import RunTimer
from agentbus.contracts.sessions import (
    SessionDeleteReply,
    SessionDeleteRequest,
    SessionShowReply,
    SessionShowRequest,
    SessionsListReply,
    SessionsListRequest,
)
from agentbus.contracts.tasks import TaskCancelRequested, TaskReplayReply, TaskReplayRequest, TaskSubmitted
from agentbus.contracts.tools import ToolCallUpdate
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.replies import Request
from pydantic import BaseModel, ValidationError

_ID = re.compile(ID_PATTERN)
_Model = TypeVar("_Model", bound=BaseModel)
INVALID_SUBJECT = "invalid_subject"

# Dead letters of these streams carry a message a run waits on: giving one up must end its run.
_RUN_STREAMS = frozenset(
    {TASKS.name, LLM_REQUESTS.name, LLM_RESULTS.name, TOOL_CALLS.name, TOOL_UPDATES.name, RUN_TIMERS.name}
)

_log = get_logger(__name__)


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
    def __init__(self, code: ErrorCode, message: str, task_id: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.task_id = task_id


def _decode(model: type[_Model], data: bytes, header_id: str | None = None) -> _Model:
    try:
        raw: Any = json.loads(data)
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


def _delivered(model: type[_Model], delivery: Delivery) -> _Model:
    try:
        return _decode(model, delivery.data)
    except _UndecodableError as bad:
        raise TerminalError(bad.code, bad.message) from bad


class RunnerHandlers:
    def __init__(self, service: RunnerService) -> None:
        self._service = service

    async def on_task_submitted(self, delivery: Delivery) -> None:
        tokens = _subject_tokens(TASK_SUBMIT, delivery.subject)
        tenant, submitter = tokens["tenant"], tokens["submitter"]
        header_id = delivery.msg_id if delivery.msg_id and _ID.fullmatch(delivery.msg_id) else None
        try:
            submission = _decode(TaskSubmitted, delivery.data, header_id)
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
        if submission.submitted_by is not None and submission.submitted_by != submitter:
            # Who submitted is what the server enforced (the subject's token), never what the body claims.
            await self._service.reject(
                submission.task_id,
                tenant,
                ErrorCode.IDENTITY_MISMATCH,
                f"submitted_by {submission.submitted_by!r} differs from the submitter {submitter!r} the subject "
                "names (and nats-server binds to the publishing user)",
                delivery.trace,
            )
            return
        bind_message_context(submitted_by=submitter)
        await self._service.submit(submission.model_copy(update={"submitted_by": submitter}), delivery.trace)

    async def on_task_cancel_requested(self, delivery: Delivery) -> None:
        tokens = _subject_tokens(TASK_CANCEL, delivery.subject)
        request = _delivered(TaskCancelRequested, delivery)
        if request.tenant != tokens["tenant"]:
            raise TerminalError(
                ErrorCode.TENANT_MISMATCH,
                f"payload tenant {request.tenant!r} differs from the subject's {tokens['tenant']!r}",
            )
        await self._service.cancel(request, tokens["submitter"], delivery.trace)

    async def on_tool_update(self, delivery: Delivery) -> None:
        await self._service.apply_tool_update(_delivered(ToolCallUpdate, delivery), delivery.trace)

    async def on_llm_result(self, delivery: Delivery) -> None:
        await self._service.advance(_delivered(LlmResult, delivery), delivery.trace)

    async def on_run_timer(self, delivery: Delivery) -> None:
        await self._service.wake(_delivered(RunTimer, delivery))

    async def on_dead_letter(self, delivery: Delivery) -> None:
        """A message given up on that a run waits on ends the run `failed internal_error`, with the reason."""
        try:
            letter = DeadLetter.model_validate_json(delivery.data)
        except ValidationError:
            return  # not a dead letter of ours: nothing to act on
        if letter.stream not in _RUN_STREAMS or letter.consumer == RUNNER_DEAD_LETTERS.durable:
            return
        task_id, tenant = _task_of(letter)
        if task_id is None or tenant is None:
            return
        reason = f"a message of this task was given up on ({letter.stream}/{letter.consumer}): {letter.error.code}: "
        reason += letter.error.message
        _log.warning("run_failed_by_dead_letter", task_id=task_id, tenant=tenant, code=letter.error.code)
        # A submission given up on never started its run: the task id is taken, so its client hears why.
        await self._service.fail(tenant, task_id, reason[:2000], claim=_is_submission(letter.subject))

    async def on_replay_request(self, request: Request) -> TaskReplayReply:
        try:
            tokens = TASK_REPLAY.parse(request.subject)
        except ValueError as exc:
            return TaskReplayReply(task_id="", tenant="", error=ErrorInfo(code=INVALID_SUBJECT, message=str(exc)))
        tenant, task_id = tokens["tenant"], tokens["task_id"]
        try:
            replay = TaskReplayRequest.model_validate_json(request.data or b"{}")
        except ValidationError as exc:
            error = ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=_validation_summary(exc))
            return TaskReplayReply(task_id=task_id, tenant=tenant, error=error)
        return await self._service.replay(tenant, task_id, replay)

    # Sessions: the subject names the tenant and the submitter (bound by nats-server to the requesting user),
    # so a submitter reaches its own sessions only.

    async def on_sessions_list_request(self, request: Request) -> SessionsListReply:
        owner = _session_owner(SESSIONS_LIST, request.subject)
        if isinstance(owner, ErrorInfo):
            return SessionsListReply(error=owner)
        try:
            listing = SessionsListRequest.model_validate_json(request.data or b"{}")
        except ValidationError as exc:
            return SessionsListReply(error=ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=_validation_summary(exc)))
        return await self._service.sessions_list(*owner, listing)

    async def on_session_show_request(self, request: Request) -> SessionShowReply:
        owner = _session_owner(SESSION_SHOW, request.subject)
        if isinstance(owner, ErrorInfo):
            return SessionShowReply(error=owner)
        try:
            show = SessionShowRequest.model_validate_json(request.data or b"{}")
        except ValidationError as exc:
            return SessionShowReply(error=ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=_validation_summary(exc)))
        return await self._service.session_show(*owner, show)

    async def on_session_delete_request(self, request: Request) -> SessionDeleteReply:
        owner = _session_owner(SESSION_DELETE, request.subject)
        if isinstance(owner, ErrorInfo):
            return SessionDeleteReply(error=owner)
        try:
            delete = SessionDeleteRequest.model_validate_json(request.data or b"{}")
        except ValidationError as exc:
            error = ErrorInfo(code=ErrorCode.SCHEMA_VIOLATION, message=_validation_summary(exc))
            return SessionDeleteReply(error=error)
        return await self._service.session_delete(*owner, delete)


def _session_owner(spec: SubjectSpec, subject: str) -> tuple[str, str] | ErrorInfo:
    """The tenant and submitter a sessions request names, or why the subject is invalid."""
    try:
        tokens = spec.parse(subject)
    except ValueError as exc:
        return ErrorInfo(code=INVALID_SUBJECT, message=str(exc))
    for name, value in tokens.items():
        if not _ID.fullmatch(value):
            return ErrorInfo(code=INVALID_SUBJECT, message=f"{name} token {value!r} is not a valid identifier")
    return tokens["tenant"], tokens["submitter"]


def _is_submission(subject: str) -> bool:
    try:
        TASK_SUBMIT.parse(subject)
    except ValueError:
        return False
    return True


def _task_of(letter: DeadLetter) -> tuple[str | None, str | None]:
    """The task and tenant a dead-lettered message was about, from its payload (or its subject's tenant)."""
    try:
        raw = json.loads(letter.payload)
    except ValueError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    task_id, tenant = raw.get("task_id"), raw.get("tenant")
    if not (isinstance(task_id, str) and _ID.fullmatch(task_id)):
        return None, None
    if not (isinstance(tenant, str) and _ID.fullmatch(tenant)):
        return None, None
    if letter.stream == TASKS.name:
        # A submission's tenant is the subject's, whatever the body says.
        for spec in (TASK_SUBMIT, TASK_CANCEL):
            try:
                if spec.parse(letter.subject)["tenant"] != tenant:
                    return None, None
            except ValueError:
                continue
    return task_id, tenant
