"""The periodic sweep: expire overdue approvals, resume executions a stopped executor left, and publish what
was committed but not published (a publish interrupted by a crash or a NATS outage)."""

from __future__ import annotations

from datetime import datetime, timedelta

from agentbus.runtime.logging import get_logger
from agentbus.tool_executor.ports import Ledger, StoreUnavailableError
from agentbus.tool_executor.service.context import Executor
from agentbus.tool_executor.service.execute import ExecuteCall
from agentbus.tool_executor.service.expiry import Expired, announce, expire_in

_log = get_logger(__name__)

UNPUBLISHED_GRACE = timedelta(seconds=1)
"""Messages younger than this are left to the publish that follows their commit, which is usually under way."""


class Sweep:
    def __init__(self, executor: Executor, execute: ExecuteCall) -> None:
        self._x = executor
        self._execute = execute

    async def __call__(self) -> None:
        """One sweep. Each step goes on if another fails; an unavailable database is only noted."""
        x = self._x
        now = x.clock()
        for step in (self._expire, self._resume, self._flush, self._count):
            try:
                await step(now)
            except StoreUnavailableError as exc:
                _log.warning("sweep_waits_for_store", step=step.__name__, error=str(exc))
            except Exception:
                _log.exception("sweep_step_failed", step=step.__name__)

    async def _expire(self, now: datetime) -> None:
        for expired in await self._x.store.transact(lambda ledger: _expire_due(ledger, now)):
            await announce(self._x, expired)

    async def _resume(self, now: datetime) -> None:
        # A call that just became ready is being run by whoever made it ready (its decision's handler): only one
        # ready for longer than a lease was left behind.
        ready_before = now - self._x.lease
        for record in await self._x.store.transact(
            lambda ledger: ledger.calls_to_resume(now, ready_before=ready_before)
        ):
            self._execute.resume(record)

    async def _flush(self, now: datetime) -> None:
        await self._x.flush(None, created_before=now - UNPUBLISHED_GRACE)

    async def _count(self, now: datetime) -> None:
        self._x.metrics.approvals_pending.set(await self._x.store.transact(lambda ledger: ledger.count_pending()))


def _expire_due(ledger: Ledger, now: datetime) -> list[Expired]:
    expired = (expire_in(ledger, approval, now) for approval in ledger.due_for_expiry(now))
    return [done for done in expired if done is not None]
