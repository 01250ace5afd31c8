"""Sessions kept in their memory stores: tasks join and leave them compare-and-set; people list, show, delete.

Every change is read, decided by the pure rules of `sessions`, and written with the revision it read: a
write that lost a race is read and decided again, so two runners (or a runner and a person deleting) never
both win. The record a runner wrote last is remembered, so the next change of a busy session usually
costs one write and no read; a remembered record that is stale only makes that write fail and be retried.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

from agentbus.agent_runner import sessions
from agentbus.agent_runner.domain import SessionLeave
from agentbus.agent_runner.memory import MemoryStoreSpec
from agentbus.agent_runner.ports import RevisionConflictError, SessionExistsError, SessionStore
from agentbus.agent_runner.sessions import Admission, Change, Departure, SessionKey, SessionRecord
from agentbus.contracts.common import utc_now
from agentbus.runtime.errors import RetryableError
from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)

_MAX_CONFLICT_RETRIES = 20
_REMEMBERED = 4096

Stale = Callable[[str], Awaitable[bool]]
"""Whether the task a session names as running has ended without leaving it."""
Leaving = Callable[[str], Awaitable[bool]]
"""Whether the task a session names as running is giving it up (its run ended): it is as good as gone."""


class SessionBusyError(Exception):
    """A task of the session runs or waits: it cannot be deleted now."""


class SessionCoordinator:
    def __init__(
        self,
        stores: Mapping[str, SessionStore],
        specs: Mapping[str, MemoryStoreSpec],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._stores = stores
        self._specs = specs
        self._clock = clock
        self._remembered: OrderedDict[tuple[str, str], tuple[SessionRecord, int]] = OrderedDict()

    def spec(self, store: str) -> MemoryStoreSpec | None:
        return self._specs.get(store) if store in self._stores else None

    async def join(
        self, key: SessionKey, task_id: str, stale: Stale | None = None, leaving: Leaving | None = None
    ) -> tuple[Admission, bool, tuple[str, ...]]:
        """Join the session: what it gave the task, whether the record changed, and tasks whose turn has come.

        With `stale`, a running task whose run ended without leaving (it joined late, after it left) is
        evicted first, so the tasks behind it are not kept waiting. With `leaving`, a store that refuses a
        busy session's tasks first asks whether the running task has ended already: then this task waits for
        its leave instead of being refused.
        """
        spec = self._specs[key.store]
        signals: tuple[str, ...] = ()
        ended: str | None = None

        def decide(record: SessionRecord | None) -> Change:
            return sessions.join(record, key, task_id, self._clock(), spec.on_busy, ended)

        for _ in range(_MAX_CONFLICT_RETRIES):
            change, record, wrote = await self._apply(key, decide)
            signals += change.signal
            running = record.running if record is not None else None
            busy = change.admission.status == "busy"
            if busy and leaving is not None and running is not None and running != ended:
                if not await leaving(running):
                    return change.admission, wrote, signals
                ended = running
                continue
            if wrote or change.admission.status != "waiting" or stale is None or running is None:
                return change.admission, wrote, signals
            if not await stale(running):
                return change.admission, wrote, signals
            _log.warning("session_task_evicted", session=key.session_id, task_id=running)
            evicted, _, _ = await self._apply(key, functools.partial(self._evict, task_id=running))
            signals += evicted.signal
        raise RetryableError(f"session {key.text} kept changing")

    def _evict(self, record: SessionRecord | None, task_id: str) -> Change:
        if record is None:
            return Change(None, Admission("waiting"))
        return sessions.evict(record, task_id, self._clock())

    async def leave(self, leave: SessionLeave) -> tuple[str, ...]:
        """Leave the session (with the task's turn and summary): the tasks whose turn has come."""
        spec = self._specs[leave.store]
        departure = Departure(
            task_id=leave.task_id,
            turn=leave.turn,
            summary=leave.compaction.summary if leave.compaction is not None else None,
            folded=tuple(leave.compaction.folded) if leave.compaction is not None else (),
        )
        change, _, _ = await self._apply(
            leave.key, lambda record: sessions.leave(record, leave.key, departure, spec, self._clock())
        )
        return change.signal

    async def _apply(
        self, key: SessionKey, decide: Callable[[SessionRecord | None], Change]
    ) -> tuple[Change, SessionRecord | None, bool]:
        """Read (or recall), decide, write compare-and-set; again on a lost race. A decision to change nothing
        is only trusted on a record just read."""
        store = self._stores[key.store]
        slot = (key.store, key.text)
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = self._remembered.get(slot)
            fresh = current is None
            if current is None:
                current = await store.get(key)
            record, revision = current if current is not None else (None, 0)
            change = decide(record)
            if change.record is None:
                if not fresh:
                    self._remembered.pop(slot, None)
                    continue
                return change, record, False
            try:
                if record is None:
                    revision = await store.create(key, change.record)
                else:
                    revision = await store.update(key, change.record, revision)
            except (SessionExistsError, RevisionConflictError):
                self._remembered.pop(slot, None)
                continue
            self._remember(slot, change.record, revision)
            return change, change.record, True
        raise RetryableError(f"session {key.text} kept changing")

    def _remember(self, slot: tuple[str, str], record: SessionRecord, revision: int) -> None:
        self._remembered[slot] = (record, revision)
        self._remembered.move_to_end(slot)
        while len(self._remembered) > _REMEMBERED:
            self._remembered.popitem(last=False)

    # --- people's requests -------------------------------------------------------------------------

    def _chosen(self, store: str | None) -> list[str]:
        return [store] if store is not None and store in self._stores else ([] if store else sorted(self._stores))

    async def owned(self, tenant: str, submitter: str, store: str | None, limit: int) -> list[SessionRecord]:
        found: list[SessionRecord] = []
        for name in self._chosen(store):
            found += await self._stores[name].owned(tenant, submitter, limit)
        return sorted(found, key=lambda r: r.updated_at, reverse=True)

    async def show(self, tenant: str, submitter: str, session_id: str, store: str | None) -> list[SessionRecord]:
        found = []
        for name in self._chosen(store):
            current = await self._stores[name].get(SessionKey(name, tenant, submitter, session_id))
            if current is not None:
                found.append(current[0])
        return found

    async def delete(self, tenant: str, submitter: str, session_id: str, store: str | None) -> list[str]:
        """Delete the session in each chosen store that has it; SessionBusyError (nothing deleted) while a task
        of it runs or waits."""
        keys = [SessionKey(name, tenant, submitter, session_id) for name in self._chosen(store)]
        found = []
        for key in keys:
            current = await self._stores[key.store].get(key)
            if current is not None:
                if current[0].running or current[0].waiting:
                    raise SessionBusyError(f"task {current[0].running or current[0].waiting[0]} of it is not done")
                found.append((key, current[1]))
        deleted = []
        for key, revision in found:
            self._remembered.pop((key.store, key.text), None)
            if await self._stores[key.store].delete(key, revision):
                deleted.append(key.store)
        return deleted

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
