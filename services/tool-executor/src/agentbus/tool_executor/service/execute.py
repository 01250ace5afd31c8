"""Execute a call exactly once: claim it, run its tool under a renewed lease, record the outcome, publish it.

A call runs only from READY. The claim (READY -> RUNNING, under this executor and an attempt number) commits
before the tool starts; the outcome and its messages commit together, only while the claim still holds.
A claim found RUNNING with a lapsed lease was left by a stopped executor: it is taken over, and the call is run
again only when that is safe (see `ToolDefinition.rerun_safe`); otherwise it ends `interrupted`.

A call whose tool has a gate (an MCP server's connection) is not claimed while the gate is closed: it stays
READY and waits in the background, so nothing was sent and any tool may run once the server is back; if this
executor stops meanwhile, the sweep of the next one finds it ready. A tool that is safe to run again and finds
what it needs unavailable while it runs (no retriever answering, an MCP server gone mid-call) waits for it
rather than failing the call; any other tool whose dependency went away mid-call ends `interrupted`. That wait
goes on in the background under the same claim, its lease renewed, so the message that started the call is
acked and no other executor takes the call over while this one lives;
if this one stops, the lease lapses and another executor runs the call again. It stops waiting when the
call's task ends (the call is withdrawn).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Coroutine, Mapping
from datetime import datetime
from typing import Any

from agentbus.runtime.logging import get_logger
from agentbus.runtime.spans import SpanAttribute
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.runtime.tracing import TraceContext
from agentbus.tool_executor.domain import (
    CallRecord,
    CallStatus,
    Withdrawal,
    abandoned_wait_result,
    interrupted_result,
    unknown_tool_result,
)
from agentbus.tool_executor.ports import (
    Claim,
    Completion,
    DependencyGate,
    EffectConnection,
    StoreUnavailableError,
    ToolInterruptedError,
    ToolInvocation,
    ToolNotStartedError,
    ToolOutput,
    ToolRunner,
    ToolUnavailableError,
    TransientToolError,
)
from agentbus.tool_executor.service.context import Executor, LoadedTool
from agentbus.tool_executor.service.messages import completion_of, failed_completion, trace_of

_log = get_logger(__name__)

_RETRY_FIRST_DELAY_SECONDS = 0.2
_RETRY_MAX_DELAY_SECONDS = 5.0
_WAIT_FIRST_DELAY_SECONDS = 0.5
_WAIT_MAX_DELAY_SECONDS = 30.0
_TIMEOUT_GRACE_SECONDS = 1.0


def _wait_delay(waits: int) -> float:
    """Exponential backoff with jitter in its upper half, so that waiting calls do not all come back at once."""
    ceiling = min(_WAIT_MAX_DELAY_SECONDS, _WAIT_FIRST_DELAY_SECONDS * 2.0 ** min(waits, 16))
    return ceiling * (0.5 + 0.5 * random.random())


def _timed_out(definition: ToolDefinition) -> ToolOutput:
    return ToolOutput.failure("timeout", f"{definition.name!r} ran longer than {definition.timeout_seconds:g} s")


def _interrupted(definition: ToolDefinition, why: str) -> ToolOutput:
    result = interrupted_result(definition.name, why)
    return ToolOutput(False, result.content, result.error_code, result.error_message)


def _crashed(exc: Exception) -> ToolOutput:
    return ToolOutput.failure("tool_failed", f"{type(exc).__name__}: {exc}")


class _Lease:
    """Renews a claim's lease while its tool runs; notes when the claim was lost to another executor."""

    def __init__(self, executor: Executor, claim: Claim) -> None:
        self._executor = executor
        self._claim = claim
        self.lost = False
        self._task = asyncio.create_task(self._keep(), name=f"lease:{claim.call_id}")

    async def _keep(self) -> None:
        executor, claim = self._executor, self._claim
        interval = executor.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self._renew(executor.clock() + executor.lease)
            except Exception as exc:
                # The claim holds as long as no one else takes it; keep trying.
                _log.warning("execution_lease_renewal_failed", call_id=claim.call_id, error=repr(exc))
                continue
            if not renewed:
                self.lost = True
                _log.error("execution_lease_lost", call_id=claim.call_id)
                return

    async def _renew(self, until: datetime) -> bool:
        return await self._executor.store.transact(lambda ledger: ledger.renew_lease(self._claim, until))

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class ExecuteCall:
    def __init__(
        self,
        executor: Executor,
        runners: Mapping[str, ToolRunner],
        *,
        max_running_tools: int,
        gates: Mapping[str, DependencyGate] | None = None,
    ) -> None:
        self._x = executor
        self._runners = runners
        self._gates = gates or {}
        self._background: dict[str, asyncio.Task[None]] = {}
        self._executing: set[str] = set()
        """Calls this process holds a claim on. The sweep leaves them alone even when their lease lapsed (its
        renewal failed while the database was away): their outcome is on its way here."""
        self._slots = asyncio.Semaphore(max_running_tools)

    async def drive(self, call_id: str, *, tool: str | None = None, in_background: bool = False) -> None:
        """Claim a ready call (or one a stopped executor left running) and finish it. A call whose tool's gate is
        closed is left ready and waits for it in the background first."""
        if tool is not None and self._closed_gate(tool) is not None:
            if in_background:
                if not await self._through_gate(call_id, tool):
                    return
            else:
                if call_id not in self._background:
                    self._spawn(call_id, self._drive_logged(call_id, tool))
                return
        x = self._x
        now = x.clock()
        claimed = await x.store.claim(call_id, x.owner, now, now + x.lease)
        if claimed is None:
            return
        claim = Claim(call_id, x.owner, claimed.attempts)
        self._executing.add(call_id)
        try:
            await self._run_claimed(claimed, claim, in_background=in_background)
        finally:
            self._executing.discard(call_id)

    async def _run_claimed(self, claimed: CallRecord, claim: Claim, *, in_background: bool) -> None:
        x = self._x
        call_id = claimed.call_id
        tool = x.tools.get(claimed.tool)
        if tool is None:
            result = unknown_tool_result(claimed.tool, list(x.tools))
            await self._record_and_publish(claimed, claim, failed_completion(claimed, CallStatus.FAILED, result))
            return
        if claimed.attempts > 1:
            # A stopped executor left it running. Its task may have ended meanwhile: then it is not run again.
            if not tool.definition.rerun_safe or claimed.withdrawn is not None:
                x.metrics.executions_resumed.labels(claimed.tool, "interrupted").inc()
                _log.warning("execution_interrupted", call_id=call_id, tool=claimed.tool)
                interrupted = failed_completion(claimed, CallStatus.INTERRUPTED, interrupted_result(claimed.tool))
                await self._record_and_publish(claimed, claim, interrupted)
                return
            x.metrics.executions_resumed.labels(claimed.tool, "rerun").inc()
            _log.info("execution_resumed", call_id=call_id, tool=claimed.tool)
        await self._execute(claimed, claim, tool, in_background=in_background)

    def resume(self, record: CallRecord) -> None:
        """Drive, in the background, a call the sweep found ready or left running; once per process."""
        if record.call_id not in self._background and record.call_id not in self._executing:
            self._spawn(record.call_id, self._drive_logged(record.call_id, record.tool))

    def _closed_gate(self, tool: str) -> str | None:
        """What the tool waits for before a call of it may start, when that is not available now."""
        loaded = self._x.tools.get(tool)
        gate = self._gates.get(loaded.definition.kind) if loaded is not None else None
        return None if gate is None or loaded is None else gate.unavailable(loaded.definition)

    async def _through_gate(self, call_id: str, tool: str) -> bool:
        """Wait, with backoff, until the tool's gate opens; False when the call's task ended meanwhile."""
        loaded = self._x.tools[tool]
        gate = self._gates[loaded.definition.kind]
        waits = 0
        while (waiting_for := gate.unavailable(loaded.definition)) is not None:
            delay = _wait_delay(waits)
            waits += 1
            self._x.metrics.dependency_waits.labels(tool).inc()
            # One line per attempt, no traceback: an outage is a state, not a bug.
            _log.warning(
                "tool_dependency_unavailable",
                call_id=call_id,
                tool=tool,
                waiting_for=waiting_for,
                started=False,
                retry_in_seconds=round(delay, 2),
            )
            if await gate.wait(loaded.definition, delay):
                return True
            if await self._withdrawal(call_id) is not None:
                return False
        return True

    async def cancel_background(self) -> None:
        """Stop what runs in the background; the claims lapse and another executor (or a restart) finishes."""
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- running -----------------------------------------------------------------------------------------

    async def _execute(self, record: CallRecord, claim: Claim, tool: LoadedTool, *, in_background: bool) -> None:
        definition = tool.definition
        span_trace, parent_span = trace_of(record)
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
        started = self._x.clock()
        lease: _Lease | None = _Lease(self._x, claim)
        try:
            if definition.kind == "python" and definition.python is not None and definition.python.transactional:
                # The slot first: the store's writer is held for the whole transaction, so nothing in it may wait.
                async with self._slots:
                    completion = await self._x.store.complete_with_effects(
                        claim, lambda connection: self._in_transaction(record, definition, invocation, connection)
                    )
            else:
                try:
                    output = await self._run(definition, invocation)
                except ToolUnavailableError as exc:
                    assert lease is not None
                    waiting = self._wait_then_finish(record, claim, tool, invocation, lease, started, exc)
                    if in_background:
                        lease = None
                        await waiting
                    else:
                        # Hand the claim and its lease over to the background, so the message is acked.
                        self._spawn(record.call_id, waiting)
                        lease = None
                    return
                await self._x.faults.reach("execution_finished")
                completion = await self._record(claim, completion_of(record, definition, output))
        finally:
            if lease is not None:
                await lease.stop()
        await self._finished(record, definition, completion, started, span_trace, parent_span)

    async def _in_transaction(
        self, record: CallRecord, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection
    ) -> Completion:
        try:
            # A tool that fails halfway leaves none of its writes; its failure is still recorded.
            async with connection.savepoint():
                output = await self._invoke(definition, invocation, connection)
        except StoreUnavailableError:
            raise
        except TransientToolError as exc:
            output = ToolOutput.failure(exc.code, exc.message)
        except TimeoutError:
            output = _timed_out(definition)
        except Exception as exc:
            output = _crashed(exc)
        await self._x.faults.reach("effect_applied")
        return completion_of(record, definition, output)

    async def _invoke(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        async with asyncio.timeout(definition.timeout_seconds + _TIMEOUT_GRACE_SECONDS):
            return await self._runners[definition.kind].run(definition, invocation, connection)

    async def _run(self, definition: ToolDefinition, invocation: ToolInvocation) -> ToolOutput:
        """Run the tool, trying again as its `retries` allow. Raises ToolUnavailableError for a tool that is safe
        to run again, or for a call that was not sent at all: that one waits instead."""
        # Only a tool that is safe to run twice is tried again: for the others, a transient failure may still
        # have had its effect.
        attempts = 1 + (definition.retries if definition.rerun_safe else 0)
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                async with self._slots:
                    return await self._invoke(definition, invocation, None)
            except ToolUnavailableError as exc:
                # Not sent at all: any tool may wait. Lost mid-call: only one that is safe to run twice.
                if definition.rerun_safe or isinstance(exc, ToolNotStartedError):
                    raise
                if isinstance(exc, ToolInterruptedError):
                    return _interrupted(definition, exc.message)
                if last:
                    return ToolOutput.failure(exc.code, exc.message)
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

    async def _wait_then_finish(
        self,
        record: CallRecord,
        claim: Claim,
        tool: LoadedTool,
        invocation: ToolInvocation,
        lease: _Lease,
        started: datetime,
        unavailable: ToolUnavailableError,
    ) -> None:
        definition = tool.definition
        self._executing.add(record.call_id)
        try:
            completion = await self._wait(record, definition, invocation, lease, unavailable)
            if completion is not None:
                await self._x.faults.reach("execution_finished")
                completion = await self._record(claim, completion)
        finally:
            await lease.stop()
            self._executing.discard(record.call_id)
        span_trace, parent_span = trace_of(record)
        await self._finished(record, definition, completion, started, span_trace, parent_span)

    async def _wait(
        self,
        record: CallRecord,
        definition: ToolDefinition,
        invocation: ToolInvocation,
        lease: _Lease,
        unavailable: ToolUnavailableError,
    ) -> Completion | None:
        """Run the tool again until what it needs answers. None when the claim was lost meanwhile."""
        waits = 0
        while True:
            delay = _wait_delay(waits)
            waits += 1
            self._x.metrics.dependency_waits.labels(record.tool).inc()
            # One line per attempt, no traceback: an outage is a state, not a bug.
            _log.warning(
                "tool_dependency_unavailable",
                call_id=record.call_id,
                tool=record.tool,
                waiting_for=unavailable.waiting_for,
                code=unavailable.code,
                retry_in_seconds=round(delay, 2),
            )
            await asyncio.sleep(delay)
            if lease.lost:
                return None
            withdrawal = await self._withdrawal(record.call_id)
            if withdrawal is not None:
                result = abandoned_wait_result(record.tool, withdrawal, unavailable.waiting_for)
                return failed_completion(record, CallStatus.WITHDRAWN, result)
            try:
                output = await self._run(definition, invocation)
            except ToolUnavailableError as exc:
                unavailable = exc
                continue
            return completion_of(record, definition, output)

    async def _withdrawal(self, call_id: str) -> Withdrawal | None:
        try:
            return await self._x.store.transact(lambda ledger: ledger.withdrawal(call_id))
        except StoreUnavailableError:
            return None

    # --- recording ---------------------------------------------------------------------------------------

    async def _record(self, claim: Claim, completion: Completion) -> Completion | None:
        """Record how the execution ended; None if the claim was lost. While the database is unavailable the
        outcome exists only in this process, so it is kept (and the recording retried) until it is back."""
        delay = _WAIT_FIRST_DELAY_SECONDS
        while True:
            try:
                recorded = await self._x.store.finish(claim, completion)
            except StoreUnavailableError as exc:
                _log.warning("execution_outcome_waits_for_store", call_id=claim.call_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WAIT_MAX_DELAY_SECONDS)
                continue
            return completion if recorded else None

    async def _record_and_publish(self, record: CallRecord, claim: Claim, completion: Completion) -> None:
        if await self._record(claim, completion) is not None:
            self._x.metrics.calls.labels(record.tool, completion.status.value).inc()
            await self._x.publish(completion.outbox)

    async def _finished(
        self,
        record: CallRecord,
        definition: ToolDefinition,
        completion: Completion | None,
        started: datetime,
        span_trace: TraceContext,
        parent_span: str | None,
    ) -> None:
        x = self._x
        ended = x.clock()
        if completion is None:
            _log.error("execution_claim_lost", call_id=record.call_id, tool=record.tool)
            return
        result = completion.result
        x.metrics.execution_seconds.labels(record.tool).observe((ended - started).total_seconds())
        x.metrics.calls.labels(record.tool, completion.status.value).inc()
        x.spans.record(
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
        await x.faults.reach("execution_committed")
        await x.publish(completion.outbox)

    # --- background --------------------------------------------------------------------------------------

    def _spawn(self, call_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._logged(call_id, work), name=f"call:{call_id}")
        self._background[call_id] = task
        task.add_done_callback(lambda done: self._forget(call_id, done))

    def _forget(self, call_id: str, task: asyncio.Task[None]) -> None:
        if self._background.get(call_id) is task:
            del self._background[call_id]

    async def _drive_logged(self, call_id: str, tool: str | None) -> None:
        await self.drive(call_id, tool=tool, in_background=True)

    @staticmethod
    async def _logged(call_id: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            _log.exception("background_execution_failed", call_id=call_id)
