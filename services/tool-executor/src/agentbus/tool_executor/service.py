"""Use cases of the tool-executor: accept a call, decide on an approval, execute exactly once, sweep.

Exactly-once execution
----------------------
Every call has one row in the execution ledger, keyed by `call_id`, whose status only moves forward by
compare-and-set, in the same transaction as the messages it must publish (an outbox, published after the
commit with deterministic `Nats-Msg-Id`s, so a re-publish is a no-op):

    awaiting_approval --approve--> ready --claim--> running --record--> succeeded | failed
            |--deny--> denied      |--expire--> expired          \\--(executor lost)--> see below

- A call runs only from `ready`, which only a policy that needs no approval, or an accepted decision, sets.
- `running` is a claim under a lease the executor renews while the tool runs. A redelivered call or decision
  finds the row and runs nothing; it only re-publishes what is not yet published.
- An executor killed while a tool ran leaves `running` with a lapsing lease. The next executor to see it (on a
  redelivery or in its periodic sweep) takes it over, and then:
  * re-runs it when a re-run is safe: the effect commits in the ledger's own transaction (python tools
    declared `transactional`, like create_ticket: an interrupted run left nothing), or the tool is declared
    idempotent (an HTTP tool sending `Idempotency-Key: <call_id>`, kubectl apply, retrieval);
  * otherwise (shell commands, plain HTTP) it does NOT run it again: the call ends `interrupted` and the model
    reads "execution_interrupted: outcome unknown". Nothing is lost, nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agentbus.contracts.approvals import ApprovalDecision, ApprovalRequested, ApprovalResolved, arguments_sha256
from agentbus.contracts.common import ErrorInfo, utc_now
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.registry import APPROVAL_PENDING, APPROVAL_RESOLVED, TOOL_UPDATE, USAGE_RECORDED
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate
from agentbus.contracts.usage import UsageRecorded
from agentbus.runtime.logging import get_logger
from agentbus.runtime.spans import SpanAttribute, SpanEmitter
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.runtime.tracing import TraceContext
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    ApproverDirectory,
    CallRecord,
    CallStatus,
    CompiledPolicy,
    DecisionFacts,
    Refusal,
    ToolResult,
    approval_id_for,
    approval_need,
    argument_errors,
    check_decision,
    denied_result,
    expired_result,
    interrupted_result,
    invalid_arguments_result,
    unknown_tool_result,
)
from agentbus.tool_executor.ports import (
    AuditEntry,
    Completion,
    ExecutorStore,
    OutgoingMessage,
    Publisher,
    Resolution,
    ToolInvocation,
    ToolOutput,
    ToolRunner,
    TransientToolError,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

_log = get_logger(__name__)

_RETRY_FIRST_DELAY_SECONDS = 0.2
_RETRY_MAX_DELAY_SECONDS = 5.0
_TIMEOUT_GRACE_SECONDS = 1.0
_MARK_DELAY_SECONDS = 0.05


class ExecutorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "agentbus_tool_calls_total",
            "Tool calls finished, by tool and outcome.",
            ["tool", "outcome"],
            registry=registry,
        )
        self.execution_seconds = Histogram(
            "agentbus_tool_execution_seconds", "Time a tool took to run.", ["tool"], registry=registry
        )
        self.approvals_requested = Counter(
            "agentbus_approvals_requested_total", "Calls that waited for approval.", ["tool"], registry=registry
        )
        self.approvals_resolved = Counter(
            "agentbus_approvals_resolved_total",
            "Approvals resolved, by outcome.",
            ["tool", "outcome"],
            registry=registry,
        )
        self.decisions_refused = Counter(
            "agentbus_approval_decisions_refused_total",
            "Decisions refused (and audited), by reason; the approval stays pending.",
            ["reason"],
            registry=registry,
        )
        self.executions_resumed = Counter(
            "agentbus_tool_executions_resumed_total",
            "Executions a stopped executor left unfinished, by what was done: rerun or interrupted.",
            ["tool", "action"],
            registry=registry,
        )
        self.approvals_pending = Gauge(
            "agentbus_approvals_pending", "Approvals waiting for a decision (as of the last sweep).", registry=registry
        )


class FaultPoints:
    """Test-only fault injection: stop forever at a named point, so a test can SIGKILL the process exactly there.

    The points are the moments that matter for exactly-once: `call_published` (approval request published,
    call not acked), `decision_committed` (approval committed, tool not started), `effect_applied` (a
    transactional tool's effect written, not committed), `execution_finished` (a tool finished, its outcome not
    recorded), `execution_committed` (outcome recorded, not published), and `call_before_ack` /
    `decision_before_ack` (everything published, the call or decision message not acked). A marker file named
    after the point is written first, so the test knows it was reached.
    """

    def __init__(self, pause_at: str | None = None, marker_dir: Path | None = None) -> None:
        self._pause_at = pause_at
        self._marker_dir = marker_dir

    async def reach(self, point: str) -> None:
        if point != self._pause_at:
            return
        if self._marker_dir is not None:
            (self._marker_dir / point).write_text(str(os.getpid()))
        _log.warning("fault_pause_reached", point=point)
        await asyncio.Event().wait()


@dataclass(frozen=True)
class LoadedTool:
    definition: ToolDefinition
    policy: CompiledPolicy


class DecisionOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    MALFORMED = "malformed"
    REPLAYED = "replayed"
    """The decision that resolved the approval, delivered again: what it started was finished."""


@dataclass(frozen=True)
class DecisionReport:
    outcome: DecisionOutcome
    detail: str = ""
    refusal: Refusal | None = None


def _trace_of(record: CallRecord) -> tuple[TraceContext, str | None]:
    """A new span of the call's trace, and its parent: the runner's span that asked for the call."""
    incoming = TraceContext.parse(record.traceparent)
    if incoming is None:
        return TraceContext.new(), None
    return incoming.child(), incoming.span_id


class ToolExecutorService:
    def __init__(
        self,
        tools: Mapping[str, LoadedTool],
        approvers: ApproverDirectory,
        store: ExecutorStore,
        publisher: Publisher,
        runners: Mapping[str, ToolRunner],
        metrics: ExecutorMetrics,
        spans: SpanEmitter,
        *,
        lease_seconds: float,
        faults: FaultPoints | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._tools = tools
        self._approvers = approvers
        self._store = store
        self._publisher = publisher
        self._runners = runners
        self._metrics = metrics
        self._spans = spans
        self._lease = timedelta(seconds=lease_seconds)
        self._faults = faults or FaultPoints()
        self._clock = clock
        self._owner = f"executor-{uuid.uuid4().hex[:16]}"
        self._background: dict[str, asyncio.Task[None]] = {}
        self._to_mark: list[str] = []
        self._marker: asyncio.Task[None] | None = None

    @property
    def owner(self) -> str:
        """This process's identity in execution claims."""
        return self._owner

    # --- tool calls --------------------------------------------------------------------------------

    async def handle_call(self, call: ToolCallRequested, trace: TraceContext | None) -> None:
        """Register a call (once), ask for approval or run it, and publish what follows."""
        record = await self._store.get_call(call.call_id)
        fresh: list[OutgoingMessage] | None = None
        if record is None:
            record, fresh = await self._register(call, trace)
        if fresh is not None:
            await self._publish(fresh)
        else:
            await self._flush(call.call_id)
        await self._faults.reach("call_published")
        if record.status is CallStatus.AWAITING_APPROVAL and record.approval_id is not None:
            approval = await self._store.get(record.approval_id)
            if (
                approval is not None
                and approval.status is ApprovalStatus.PENDING
                and self._clock() >= approval.expires_at
            ):
                await self._expire(approval)
        elif record.status in (CallStatus.READY, CallStatus.RUNNING):
            await self._drive(record.call_id)
        await self._faults.reach("call_before_ack")

    async def _register(
        self, call: ToolCallRequested, trace: TraceContext | None
    ) -> tuple[CallRecord, list[OutgoingMessage] | None]:
        """Store a new call; returns it with the messages to publish, or the stored call (and None) when a
        concurrent delivery of the same call stored it first."""
        now = self._clock()
        record = CallRecord(
            call_id=call.call_id,
            tool_call_id=call.tool_call_id,
            tenant=call.tenant,
            task_id=call.task_id,
            agent=call.agent,
            tool=call.tool,
            step=call.step,
            arguments=dict(call.arguments),
            submitted_by=call.submitted_by,
            status=CallStatus.READY,
            approval_id=None,
            traceparent=trace.traceparent if trace else None,
            created_at=now,
        )
        approval: ApprovalRecord | None = None
        outbox: list[OutgoingMessage] = []
        tool = self._tools.get(call.tool)
        result: ToolResult | None = None
        if tool is None:
            result = unknown_tool_result(call.tool, list(self._tools))
        elif errors := argument_errors(tool.definition.parameters, call.arguments):
            result = invalid_arguments_result(call.tool, errors)
        if result is not None:
            record = replace(record, status=CallStatus.FAILED, result=result)
            outbox.append(self._result_message(record, result))
        elif tool is not None and (need := approval_need(tool.policy, tool.definition.risk, call.arguments)):
            approval = ApprovalRecord(
                approval_id=approval_id_for(call.call_id),
                call_id=call.call_id,
                tenant=call.tenant,
                task_id=call.task_id,
                agent=call.agent,
                tool=call.tool,
                arguments=dict(call.arguments),
                arguments_sha256=arguments_sha256(call.arguments),
                risk=need.risk,
                reason=need.reason,
                requested_by=call.submitted_by,
                requested_at=now,
                expires_at=now + timedelta(seconds=tool.definition.approval.expires_after_seconds),
            )
            record = replace(record, status=CallStatus.AWAITING_APPROVAL, approval_id=approval.approval_id)
            outbox += self._pending_messages(record, approval)
        if not await self._store.insert_call(record, approval, outbox):
            existing = await self._store.get_call(call.call_id)
            assert existing is not None
            return existing, None
        if result is not None:
            self._metrics.calls.labels(call.tool if tool else "(unknown)", result.error_code or "failed").inc()
        if approval is not None:
            self._metrics.approvals_requested.labels(call.tool).inc()
        return record, outbox

    # --- decisions ---------------------------------------------------------------------------------

    async def handle_decision(
        self, tenant: str, subject_approver: str, payload: bytes, message_seq: int
    ) -> DecisionReport:
        """Check a decision; apply it (and run an approved call) or refuse it. Every decision is audited."""
        now = self._clock()
        try:
            decision = ApprovalDecision.model_validate_json(payload)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
            await self._refuse(
                AuditEntry(
                    message_seq=message_seq,
                    tenant=tenant,
                    subject_approver=subject_approver,
                    outcome="refused",
                    received_at=now,
                    reason_code=Refusal.MALFORMED.value,
                    detail=detail,
                    payload=payload.decode("utf-8", errors="replace"),
                )
            )
            return DecisionReport(DecisionOutcome.MALFORMED, detail, Refusal.MALFORMED)

        approval, call = await self._store.get_with_call(decision.approval_id)
        if approval is not None and approval.tenant != tenant:
            approval, call = None, None
        if approval is not None and approval.decision_seq == message_seq:
            await self._finish_started(approval)
            return DecisionReport(DecisionOutcome.REPLAYED)

        tool = self._tools.get(approval.tool) if approval is not None else None
        audit = AuditEntry(
            message_seq=message_seq,
            tenant=tenant,
            subject_approver=subject_approver,
            outcome="refused",
            received_at=now,
            approver=decision.approver,
            approval_id=decision.approval_id,
            decision=decision.decision,
            payload=payload.decode("utf-8", errors="replace"),
        )
        refusal = check_decision(
            DecisionFacts(
                subject_tenant=tenant,
                subject_approver=subject_approver,
                approver=decision.approver,
                decision=decision.decision,
                arguments_sha256=decision.arguments_sha256,
                approval=approval,
                approver_allowed=tool is not None
                and self._approvers.may_approve(tool.definition.approval, tenant, decision.approver),
                allow_self_approval=tool is not None and tool.definition.approval.allow_self_approval,
                submitted_by=call.submitted_by if call is not None else None,
                now=now,
            )
        )
        if refusal is not None:
            reason, detail = refusal
            if reason is Refusal.EXPIRED and approval is not None:
                await self._expire(approval)
            await self._refuse(replace(audit, reason_code=reason.value, detail=detail))
            return DecisionReport(DecisionOutcome.REFUSED, detail, reason)

        assert approval is not None
        assert call is not None
        approved = decision.decision == "approve"
        status = ApprovalStatus.APPROVED if approved else ApprovalStatus.DENIED
        result = None if approved else denied_result(approval.tool, decision.approver, decision.reason)
        outbox = self._resolved_messages(call, approval, status, decision.approver, now)
        if result is not None:
            outbox.append(self._result_message(call, result))
        resolution = Resolution(
            approval_id=approval.approval_id,
            status=status,
            by=decision.approver,
            at=now,
            reason=decision.reason,
            decision_seq=message_seq,
            call_status=CallStatus.READY if approved else CallStatus.DENIED,
            call_result=result,
            outbox=outbox,
            audit=replace(audit, outcome="accepted"),
        )
        if not await self._store.resolve_approval(resolution):
            detail = "another decision resolved this approval first"
            await self._refuse(replace(audit, reason_code=Refusal.ALREADY_RESOLVED.value, detail=detail))
            return DecisionReport(DecisionOutcome.REFUSED, detail, Refusal.ALREADY_RESOLVED)
        self._resolved(call, approval, status, decision.approver, now)
        if not approved:
            self._metrics.calls.labels(approval.tool, "denied").inc()
        await self._faults.reach("decision_committed")
        await self._publish(outbox)
        if approved:
            await self._drive(approval.call_id)
        await self._faults.reach("decision_before_ack")
        return DecisionReport(DecisionOutcome.ACCEPTED)

    async def _finish_started(self, approval: ApprovalRecord) -> None:
        await self._flush(approval.call_id)
        if approval.status is ApprovalStatus.APPROVED:
            await self._drive(approval.call_id)

    async def _refuse(self, entry: AuditEntry) -> None:
        await self._store.audit(entry)
        self._metrics.decisions_refused.labels(entry.reason_code or "unknown").inc()
        _log.warning(
            "approval_decision_refused",
            reason=entry.reason_code,
            detail=entry.detail,
            approval_id=entry.approval_id,
            approver=entry.subject_approver,
            tenant=entry.tenant,
        )

    # --- expiry ------------------------------------------------------------------------------------

    async def _expire(self, approval: ApprovalRecord) -> None:
        call = await self._store.get_call(approval.call_id)
        if call is None:
            return
        now = self._clock()
        result = expired_result(approval.tool, approval.expires_at)
        outbox = self._resolved_messages(call, approval, ApprovalStatus.EXPIRED, None, now)
        outbox.append(self._result_message(call, result))
        resolution = Resolution(
            approval_id=approval.approval_id,
            status=ApprovalStatus.EXPIRED,
            by=None,
            at=now,
            reason="no decision before the approval expired",
            decision_seq=None,
            call_status=CallStatus.EXPIRED,
            call_result=result,
            outbox=outbox,
        )
        if await self._store.resolve_approval(resolution):
            self._resolved(call, approval, ApprovalStatus.EXPIRED, None, now)
            self._metrics.calls.labels(approval.tool, "expired").inc()
            await self._publish(outbox)

    # --- execution ---------------------------------------------------------------------------------

    async def _drive(self, call_id: str) -> None:
        """Claim a ready call (or one a stopped executor left running) and finish it."""
        now = self._clock()
        before = await self._store.claim(call_id, self._owner, now, now + self._lease)
        if before is None:
            return
        tool = self._tools.get(before.tool)
        if tool is None:
            result = unknown_tool_result(before.tool, list(self._tools))
            await self._record(before, Completion(CallStatus.FAILED, result, [self._result_message(before, result)]))
            return
        if before.status is CallStatus.RUNNING:
            if not tool.definition.rerun_safe:
                self._metrics.executions_resumed.labels(before.tool, "interrupted").inc()
                _log.warning("execution_interrupted", call_id=before.call_id, tool=before.tool)
                result = interrupted_result(before.tool)
                completion = Completion(CallStatus.INTERRUPTED, result, [self._result_message(before, result)])
                await self._record(before, completion)
                return
            self._metrics.executions_resumed.labels(before.tool, "rerun").inc()
            _log.info("execution_resumed", call_id=before.call_id, tool=before.tool)
        await self._execute(before, tool)

    async def _execute(self, record: CallRecord, tool: LoadedTool) -> None:
        definition = tool.definition
        span_trace, parent_span = _trace_of(record)
        invocation = ToolInvocation(
            call_id=record.call_id,
            tenant=record.tenant,
            task_id=record.task_id,
            agent=record.agent,
            tool=record.tool,
            arguments=record.arguments,
            submitted_by=record.submitted_by,
            traceparent=span_trace.traceparent,
        )
        started = self._clock()
        renewing = asyncio.create_task(self._keep_lease(record.call_id), name=f"lease:{record.call_id}")
        try:
            if definition.kind == "python" and definition.python is not None and definition.python.transactional:

                async def in_transaction(connection: AsyncConnection) -> Completion:
                    try:
                        async with connection.begin_nested():
                            output = await self._invoke(definition, invocation, connection)
                    except TransientToolError as exc:
                        output = ToolOutput.failure(exc.code, exc.message)
                    except TimeoutError:
                        output = _timed_out(definition)
                    except Exception as exc:
                        output = _crashed(exc)
                    await self._faults.reach("effect_applied")
                    return self._completion(record, definition, output)

                completion = await self._store.complete(record.call_id, self._owner, in_transaction)
            else:
                output = await self._run_with_retries(definition, invocation)
                await self._faults.reach("execution_finished")
                finished = self._completion(record, definition, output)

                async def record_only(_: AsyncConnection) -> Completion:
                    return finished

                completion = await self._store.complete(record.call_id, self._owner, record_only)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        ended = self._clock()
        if completion is None:
            _log.error("execution_claim_lost", call_id=record.call_id, tool=record.tool)
            return
        result = completion.result
        self._metrics.execution_seconds.labels(record.tool).observe((ended - started).total_seconds())
        self._metrics.calls.labels(record.tool, "succeeded" if result.ok else "failed").inc()
        self._spans.record(
            name=f"tool {record.tool}",
            kind="retrieval" if definition.kind == "retrieval" else "tool",
            trace=span_trace,
            parent_span_id=parent_span,
            start=started,
            end=ended,
            task_id=record.task_id,
            tenant=record.tenant,
            status="ok" if result.ok else "error",
            status_message=None if result.ok else f"{result.error_code}: {result.error_message}",
            attributes={
                SpanAttribute.TOOL.value: record.tool,
                SpanAttribute.AGENT.value: record.agent,
                SpanAttribute.INPUT.value: record.arguments,
                SpanAttribute.OUTPUT.value: result.content,
                "agentbus.call_id": record.call_id,
            },
        )
        await self._faults.reach("execution_committed")
        await self._publish(completion.outbox)

    async def _invoke(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: AsyncConnection | None
    ) -> ToolOutput:
        async with asyncio.timeout(definition.timeout_seconds + _TIMEOUT_GRACE_SECONDS):
            return await self._runners[definition.kind].run(definition, invocation, connection)

    async def _run_with_retries(self, definition: ToolDefinition, invocation: ToolInvocation) -> ToolOutput:
        # Only a tool that is safe to run twice is tried again: for the others, a transient failure may
        # still have had its effect.
        attempts = 1 + (definition.retries if definition.rerun_safe else 0)
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                return await self._invoke(definition, invocation, None)
            except TransientToolError as exc:
                if last:
                    return ToolOutput.failure(exc.code, exc.message)
            except TimeoutError:
                if last:
                    return _timed_out(definition)
            except Exception as exc:
                _log.exception("tool_crashed", tool=definition.name, call_id=invocation.call_id)
                return _crashed(exc)
            await asyncio.sleep(min(_RETRY_FIRST_DELAY_SECONDS * 2**attempt, _RETRY_MAX_DELAY_SECONDS))
        raise AssertionError("unreachable")

    async def _keep_lease(self, call_id: str) -> None:
        interval = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._store.renew_lease(call_id, self._owner, self._clock() + self._lease):
                    _log.error("execution_lease_lost", call_id=call_id)
                    return
            except Exception as exc:
                _log.warning("execution_lease_renewal_failed", call_id=call_id, error=repr(exc))

    async def _record(self, record: CallRecord, completion: Completion) -> None:
        async def fixed(_: AsyncConnection) -> Completion:
            return completion

        if await self._store.complete(record.call_id, self._owner, fixed) is not None:
            self._metrics.calls.labels(record.tool, completion.status.value).inc()
            await self._publish(completion.outbox)

    def _completion(self, record: CallRecord, definition: ToolDefinition, output: ToolOutput) -> Completion:
        result = output.to_result()
        usage = UsageRecorded(
            usage_id=f"tool:{record.call_id}",
            kind="retrieval" if definition.kind == "retrieval" else "tool",
            tenant=record.tenant,
            task_id=record.task_id,
            agent=record.agent,
            tool=record.tool,
            reservation_id=f"tool:{record.call_id}",
        )
        trace, _ = _trace_of(record)
        outbox = [
            self._result_message(record, result),
            OutgoingMessage(
                USAGE_RECORDED.format(tenant=record.tenant), usage.usage_id, usage.model_dump_json(), trace.traceparent
            ),
        ]
        return Completion(CallStatus.SUCCEEDED if result.ok else CallStatus.FAILED, result, outbox)

    # --- the sweep ---------------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire overdue approvals, resume executions left unfinished, publish what was not published."""
        now = self._clock()
        for approval in await self._store.due_for_expiry(now):
            try:
                await self._expire(approval)
            except Exception:
                _log.exception("expiry_failed", approval_id=approval.approval_id)
        for record in await self._store.calls_to_resume(now):
            if record.call_id not in self._background:
                task = asyncio.create_task(self._drive_logged(record), name=f"resume:{record.call_id}")
                self._background[record.call_id] = task
                task.add_done_callback(self._forget)
        try:
            await self._flush(None)
        except Exception as exc:
            _log.warning("outbox_publish_failed", error=repr(exc))
        self._metrics.approvals_pending.set(await self._store.count_pending())

    def _forget(self, task: asyncio.Task[None]) -> None:
        for call_id, running in list(self._background.items()):
            if running is task:
                del self._background[call_id]

    async def _drive_logged(self, record: CallRecord) -> None:
        try:
            await self._drive(record.call_id)
        except Exception:
            _log.exception("resume_failed", call_id=record.call_id)

    async def cancel_resumed(self) -> None:
        """Cancel executions the sweep resumed; their claims lapse and another executor finishes them."""
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def flush_marks(self) -> None:
        """Record the publications not yet marked (at shutdown, after the consumers drained)."""
        while self._marker is not None and not self._marker.done():
            await asyncio.gather(self._marker, return_exceptions=True)

    # --- messages ----------------------------------------------------------------------------------

    async def _flush(self, call_id: str | None) -> None:
        """Publish what a call (or every call) still has unpublished, oldest first."""
        await self._publish([stored.message for stored in await self._store.unpublished(call_id)])

    async def _publish(self, messages: list[OutgoingMessage]) -> None:
        """Publish committed outbox messages, in order; they are marked published shortly after, in batches.

        A mark lost in a crash only means a re-publish, which the stream drops as a duplicate; batching the
        marks saves a durable commit per message.
        """
        for message in messages:
            await self._publisher.publish(message)
            self._to_mark.append(message.msg_id)
            if self._marker is None or self._marker.done():
                self._marker = asyncio.create_task(self._mark_published(), name="outbox-marks")

    async def _mark_published(self) -> None:
        await asyncio.sleep(_MARK_DELAY_SECONDS)
        while self._to_mark:
            batch, self._to_mark = self._to_mark, []
            try:
                await self._store.mark_published(batch)
            except Exception as exc:
                _log.warning("outbox_mark_failed", count=len(batch), error=repr(exc))

    def _update(self, record: CallRecord, kind: str, **fields: Any) -> OutgoingMessage:
        update = ToolCallUpdate(
            kind=kind,  # type: ignore[arg-type]
            call_id=record.call_id,
            tool_call_id=record.tool_call_id,
            task_id=record.task_id,
            tenant=record.tenant,
            tool=record.tool,
            **fields,
        )
        trace, _ = _trace_of(record)
        return OutgoingMessage(
            TOOL_UPDATE.format(tenant=record.tenant),
            f"tool:{record.call_id}:{kind}",
            update.model_dump_json(),
            trace.traceparent,
        )

    def _result_message(self, record: CallRecord, result: ToolResult) -> OutgoingMessage:
        error = (
            ErrorInfo(code=result.error_code, message=result.error_message or result.error_code)
            if result.error_code
            else None
        )
        citations = [RetrievedChunk.model_validate(c) for c in result.citations]
        return self._update(record, "result", ok=result.ok, content=result.content, error=error, citations=citations)

    def _pending_messages(self, record: CallRecord, approval: ApprovalRecord) -> list[OutgoingMessage]:
        requested = ApprovalRequested(
            approval_id=approval.approval_id,
            task_id=approval.task_id,
            tenant=approval.tenant,
            agent=approval.agent,
            tool=approval.tool,
            arguments=approval.arguments,
            arguments_sha256=approval.arguments_sha256,
            risk=approval.risk,
            reason=approval.reason,
            requested_by=approval.requested_by,
            requested_at=approval.requested_at,
            expires_at=approval.expires_at,
        )
        trace, _ = _trace_of(record)
        return [
            OutgoingMessage(
                APPROVAL_PENDING.format(tenant=approval.tenant),
                f"approval:{approval.approval_id}:requested",
                requested.model_dump_json(),
                trace.traceparent,
            ),
            self._update(record, "approval_pending", approval_id=approval.approval_id, expires_at=approval.expires_at),
        ]

    def _resolved_messages(
        self, record: CallRecord, approval: ApprovalRecord, status: ApprovalStatus, by: str | None, at: datetime
    ) -> list[OutgoingMessage]:
        outcome = status.value
        resolved = ApprovalResolved(
            approval_id=approval.approval_id,
            task_id=approval.task_id,
            tenant=approval.tenant,
            outcome=outcome,  # type: ignore[arg-type]
            by=by,
            at=at,
        )
        trace, _ = _trace_of(record)
        return [
            OutgoingMessage(
                APPROVAL_RESOLVED.format(tenant=approval.tenant),
                f"approval:{approval.approval_id}:resolved",
                resolved.model_dump_json(),
                trace.traceparent,
            ),
            self._update(record, "approval_resolved", approval_id=approval.approval_id, outcome=outcome, by=by),
        ]

    def _resolved(
        self, record: CallRecord, approval: ApprovalRecord, status: ApprovalStatus, by: str | None, at: datetime
    ) -> None:
        self._metrics.approvals_resolved.labels(approval.tool, status.value).inc()
        trace, parent = _trace_of(record)
        self._spans.record(
            name=f"approval {approval.tool}",
            kind="approval_wait",
            trace=trace,
            parent_span_id=parent,
            start=approval.requested_at,
            end=at,
            task_id=approval.task_id,
            tenant=approval.tenant,
            status="ok" if status is ApprovalStatus.APPROVED else "error",
            status_message=None if status is ApprovalStatus.APPROVED else status.value,
            attributes={
                SpanAttribute.TOOL.value: approval.tool,
                SpanAttribute.AGENT.value: approval.agent,
                "agentbus.approval_id": approval.approval_id,
                "agentbus.approval.outcome": status.value,
                "agentbus.approval.by": by,
                "agentbus.approval.risk": approval.risk,
            },
        )


def _timed_out(definition: ToolDefinition) -> ToolOutput:
    return ToolOutput.failure("timeout", f"{definition.name!r} ran longer than {definition.timeout_seconds:g} s")


def _crashed(exc: Exception) -> ToolOutput:
    return ToolOutput.failure("tool_failed", f"{type(exc).__name__}: {exc}")
