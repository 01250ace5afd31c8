"""Which budget partitions this replica owns: leases taken, renewed, shared out and given up.

Budgets are partitioned by tenant (`budget_partition` in the registry). Each partition has at most one owner
at a time, the replica holding its lease in the database; only the owner decides the partition's
reservations (from its book in memory), serves its request subjects and reads its usage consumer, so two
concurrent reservations of a tenant are always decided by one writer, one after the other.

Every `renew_seconds` a replica heartbeats, renews its leases and reads the lease table. Replicas share the
partitions among those alive: each aims at `fair_share` of them, gives up one above it (after committing
everything queued for it) and takes free or lapsed ones below it. Taking a lease raises its epoch; the book
is then rebuilt from the database, and only then are the partition's subjects served. A lease that could
not be renewed (the database away) still lets committed work be answered, but reads from memory stop when
it may have lapsed; whatever the clocks do, the epoch checked in every group commit (the fence) is what
keeps a replica that lost its lease from committing anything more.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from datetime import datetime

from agentbus.cost_accountant.committer import GroupCommitter, naive_utc
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.ports import AccountantStore, LeaseRow, PartitionHost
from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)

_VALID_FRACTION = 0.75
"""Reads from memory stop this far into a lease that could not be renewed, well before anyone may take it."""


def fair_share(partitions: int, live_replicas: int) -> int:
    """How many partitions each replica aims to own: all of them shared among the replicas alive."""
    return math.ceil(partitions / max(1, live_replicas))


def takeable(lease: LeaseRow, now: datetime) -> bool:
    """A lease nobody holds, or whose holder stopped renewing it (lease times are naive UTC, as stored)."""
    return lease.owner is None or lease.expires_at is None or lease.expires_at < naive_utc(now)


class PartitionOwnership:
    """Keeps this replica's share of the budget partitions (see the module docstring)."""

    def __init__(
        self,
        store: AccountantStore,
        committer: GroupCommitter,
        host: PartitionHost,
        metrics: AccountantMetrics,
        *,
        partitions: int,
        ttl_seconds: float,
        renew_seconds: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._committer = committer
        self._host = host
        self._metrics = metrics
        self._partitions = partitions
        self._ttl = ttl_seconds
        self._renew = renew_seconds
        self._clock = clock
        self.replica = committer.replica
        self.owned: dict[int, int] = {}
        """Partition -> the lease epoch this replica holds it at."""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.started = False
        """The first round is over: this replica took its share (or found none free)."""

    async def start(self) -> None:
        """Take this replica's share now (so that a lone replica serves every partition once started), then
        keep it in the background."""
        try:
            await self.round()
        except Exception:
            _log.exception("lease_round_failed")
        self.started = True
        self._task = asyncio.create_task(self._loop(), name="partition-leases")

    async def stop(self) -> None:
        """Give every partition up: stop serving it, commit what is queued, then free its lease for another
        replica at once (rather than after it lapses)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            for partition in sorted(self.owned):
                await self._give_up(partition)
            with contextlib.suppress(Exception):
                await self._store.leave(self.replica)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew)
            try:
                await self.round()
            except Exception as exc:
                _log.warning("lease_round_failed", error=repr(exc))

    async def round(self) -> None:
        """One heartbeat: renew, notice lost leases, give one up or take what the fair share allows."""
        async with self._lock:
            started = time.monotonic()
            now = self._clock()
            view = await self._store.lease_round(self.replica, self._partitions, now, self._ttl)
            for partition, epoch in list(self.owned.items()):
                lease = view.leases.get(partition)
                if lease is None or lease.owner != self.replica or lease.epoch != epoch:
                    await self.lost(partition)
                else:
                    self._committer.extend(partition, started + self._ttl * _VALID_FRACTION)
            # A lease held here but not served (a take-over whose book was never installed) is adopted.
            adopted = {
                p: lease.epoch
                for p, lease in view.leases.items()
                if lease.owner == self.replica and p not in self.owned
            }
            if adopted:
                await self._install(adopted, started)
            share = fair_share(self._partitions, view.live_replicas)
            if len(self.owned) > share:
                await self._give_up(max(self.owned))
            elif len(self.owned) < share:
                await self._take(view.leases, share - len(self.owned), now, started)
            self._metrics.partitions_owned.set(len(self.owned))

    async def _take(self, leases: dict[int, LeaseRow], wanted: int, now: datetime, started: float) -> None:
        taken: dict[int, int] = {}
        try:
            for partition in sorted(leases):
                if len(taken) >= wanted:
                    break
                lease = leases[partition]
                if partition in self.owned or not takeable(lease, now):
                    continue
                if await self._store.acquire(partition, self.replica, lease.epoch, now, self._ttl):
                    taken[partition] = lease.epoch + 1
        finally:
            if taken:
                await self._install(taken, started)

    async def _install(self, taken: dict[int, int], started: float) -> None:
        # The books are rebuilt only now, after the take-overs committed: they see every commit of the
        # previous owners, who can commit nothing more (their epochs are stale).
        await self._committer.install(taken)
        for partition, epoch in taken.items():
            self.owned[partition] = epoch
            self._committer.extend(partition, started + self._ttl * _VALID_FRACTION)
            await self._host.serve(partition)
        _log.info("partitions_taken", partitions=sorted(taken), epochs=taken)

    async def _give_up(self, partition: int) -> None:
        epoch = self.owned.pop(partition)
        await self._host.unserve(partition)
        with contextlib.suppress(Exception):
            await self._committer.retire(partition)
        try:
            await self._store.release(partition, self.replica, epoch)
        except Exception as exc:  # it lapses by itself then
            _log.warning("lease_release_failed", partition=partition, error=repr(exc))
        _log.info("partition_given_up", partition=partition, epoch=epoch)

    async def lost(self, partition: int) -> None:
        """The partition's lease was taken by another replica: stop serving it, keep nothing of it."""
        epoch = self.owned.pop(partition, None)
        self._committer.drop(partition)
        await self._host.unserve(partition)
        if epoch is not None:
            _log.warning("partition_lost", partition=partition, epoch=epoch)

    def fenced(self, partition: int, epoch: int) -> None:
        """The committer found the partition's epoch superseded: stop serving it now."""
        if self.owned.get(partition) == epoch:
            task = asyncio.get_running_loop().create_task(self._lost_after_fence(partition, epoch))
            task.add_done_callback(_log_failure)

    async def _lost_after_fence(self, partition: int, epoch: int) -> None:
        async with self._lock:
            if self.owned.get(partition) == epoch:
                await self.lost(partition)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.error("partition_stop_failed", error=repr(error))
