"""Group commit: every decision of the partitions this replica owns is made in memory and written in batches.

One task, the committer, takes everything queued since the last commit (up to `max_batch`): it reads from
the database only what the batch needs and memory does not hold (a task not seen lately, with its usage ids;
whether a usage record of no task is in the ledger already), decides every operation in order against the
books, writes all of it in one transaction, and only then answers. The next batch is decided as soon as that
commit returns, so batches grow with load and a lone request is written at once.

The transaction is fenced: it writes a partition's changes only while the partition's lease epoch in the
database is still this replica's. A partition found superseded is dropped at once and its operations are
never answered (nothing of them was committed); its new owner rebuilt its book from the database after
taking the lease, so it sees every commit made before. If a commit fails, nobody is answered, and the books
it touched are thrown away and rebuilt from the database before they serve again: memory never keeps a
decision the database does not have.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentbus.contracts.registry import budget_partition
from agentbus.cost_accountant.book import PartitionBook, StoredTask, TaskKey
from agentbus.cost_accountant.budgets import BudgetPolicy
from agentbus.cost_accountant.domain import Verdict, month_period, period_start, previous_period
from agentbus.cost_accountant.limits import LimitsConfig, RatePolicy
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.ports import AccountantStore, Loaded, PricedUsage, ReservationInput
from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)

_REPAIR_INTERVAL_SECONDS = 0.5
_VERIFY_USAGE_SECONDS = 60.0


class NotServing(Exception):  # noqa: N818 - a state, not a failure of the caller
    """The partition is not (or no longer) this replica's: answer nothing, its owner will."""


class StoreUnavailable(Exception):  # noqa: N818
    """The store failed and nothing of the operation was kept: ask again."""


class FaultPoints:
    """Test-only fault injection: stop forever at a named point, so that a test can SIGKILL the process there.
    A file named after the point is written first (holding the pid), so the test knows it was reached."""

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


def naive_utc(moment: datetime) -> datetime:
    """The ledger's time columns are naive UTC; the books use the same."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


@dataclass(eq=False)
class Op:
    partition: int
    future: asyncio.Future[Any] = field(init=False)
    result: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def task_keys(self) -> Iterable[TaskKey]:
        """The tasks the operation needs in memory."""
        return ()


@dataclass(eq=False)
class ReserveOp(Op):
    request: ReservationInput

    def task_keys(self) -> Iterable[TaskKey]:
        return ((self.request.tenant, self.request.task_id),)


@dataclass(eq=False)
class UsageOp(Op):
    """Usage records of one partition (a whole fetch of its consumer); the result says, per record, whether it
    was new to the ledger."""

    entries: list[PricedUsage]

    def task_keys(self) -> Iterable[TaskKey]:
        return {(e.usage.tenant, e.usage.task_id) for e in self.entries if e.usage.task_id is not None}


@dataclass(eq=False)
class CloseOp(Op):
    tenant: str
    task_id: str

    def task_keys(self) -> Iterable[TaskKey]:
        return ((self.tenant, self.task_id),)


@dataclass(eq=False)
class LoadOp(Op):
    """Bring a task into memory (and pass the fence) so that a read can be answered from the book."""

    tenant: str
    task_id: str

    def task_keys(self) -> Iterable[TaskKey]:
        return ((self.tenant, self.task_id),)


@dataclass(eq=False)
class ReadOp(Op):
    """Pass the fence, changing nothing: the partition's book may then be read as current."""


@dataclass(eq=False)
class ExpireOp(Op):
    """Void the partition's holds past their expiry."""


@dataclass(eq=False)
class _Control:
    """Work done alone, between batches, in queue order."""

    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Install(_Control):
    epochs: dict[int, int]


@dataclass(eq=False)
class _Retire(_Control):
    partition: int


@dataclass(eq=False)
class _Drain(_Control):
    """Everything queued before it has been committed."""


@dataclass(eq=False)
class _Upkeep(_Control):
    idle_seconds: float


@dataclass(eq=False)
class _Waiter:
    usage_ids: frozenset[str]
    future: asyncio.Future[None]


class GroupCommitter:
    """The single writer of this replica's budget books (see the module docstring)."""

    def __init__(
        self,
        store: AccountantStore,
        policy: BudgetPolicy,
        metrics: AccountantMetrics,
        *,
        replica: str,
        reservation_ttl_seconds: float,
        max_batch: int,
        clock: Callable[[], datetime],
        on_fenced: Callable[[int, int], None] | None = None,
        faults: FaultPoints | None = None,
        rates: RatePolicy | None = None,
    ) -> None:
        """`on_fenced(partition, epoch)` is told of a partition found taken over by another replica."""
        self._store = store
        self._policy = policy
        self._rates = rates or RatePolicy(LimitsConfig())
        self._metrics = metrics
        self.replica = replica
        self._ttl = timedelta(seconds=reservation_ttl_seconds)
        self._max_batch = max_batch
        self._clock = clock
        self._on_fenced = on_fenced or (lambda partition, epoch: None)
        self._faults = faults or FaultPoints()
        self.books: dict[int, PartitionBook] = {}
        self._broken: dict[int, int] = {}
        """Partitions owned (epoch) whose book must be rebuilt before they serve again."""
        self._last_repair = 0.0
        self._verify_usage_until = 0.0
        self._valid_until: dict[int, float] = {}
        self._queue: collections.deque[Op | _Control] = collections.deque()
        self._wake = asyncio.Event()
        self._seq = 0
        self._waiters: dict[TaskKey, list[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self.alerts_queued = asyncio.Event()
        """Set when a commit queued soft-limit alerts, so the publisher need not wait for its next poll."""

    @property
    def rates(self) -> RatePolicy:
        return self._rates

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Stop after committing what is already queued."""
        if self._task is None:
            return
        drained = _Drain()
        self._enqueue(drained)
        with contextlib.suppress(asyncio.CancelledError):
            await drained.future
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    # --- ownership ------------------------------------------------------------------------------------

    async def install(self, epochs: dict[int, int]) -> None:
        """Take partitions at their new lease epochs: their books are rebuilt from the database (now, or at
        the first batch that needs them if the database is away)."""
        await self._control(_Install(dict(epochs)))

    async def retire(self, partition: int) -> None:
        """Give a partition up after every operation queued before has been committed."""
        await self._control(_Retire(partition))

    async def upkeep(self, idle_seconds: float) -> None:
        """Forget idle tasks and past months (they are read from the database again when needed)."""
        await self._control(_Upkeep(idle_seconds))

    def drop(self, partition: int) -> None:
        """Forget a partition at once (its lease was lost): what is queued for it will not be answered."""
        self.books.pop(partition, None)
        self._broken.pop(partition, None)
        self._valid_until.pop(partition, None)

    def extend(self, partition: int, valid_until: float) -> None:
        """The lease of a partition was renewed: its book may answer reads until `valid_until` (monotonic)."""
        self._valid_until[partition] = valid_until

    def readable(self, partition: int) -> PartitionBook | None:
        """The partition's book, if its lease is surely still held (reads from memory are then current)."""
        book = self.books.get(partition)
        if book is None or self._valid_until.get(partition, 0.0) <= time.monotonic():
            return None
        return book

    def owns(self, partition: int) -> bool:
        return partition in self.books or partition in self._broken

    # --- operations -----------------------------------------------------------------------------------

    async def submit(self, op: Op) -> Any:
        """Queue an operation; its result once committed. Raises NotServing or StoreUnavailable."""
        return await self.enqueue(op)

    def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """Queue an operation; its future holds the result once committed (or NotServing, StoreUnavailable)."""
        if self._task is None:
            _fail(op, NotServing("the accountant is not running"))
        else:
            self._enqueue(op)
        return op.future

    def wait_for_usage(self, key: TaskKey, usage_ids: Sequence[str]) -> asyncio.Future[None]:
        """A future set once every one of `usage_ids` of the task is committed to the ledger."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(_Waiter(frozenset(usage_ids), future))
        return future

    def forget_waiter(self, key: TaskKey, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            return
        waiters[:] = [waiter for waiter in waiters if waiter.future is not future]
        if not waiters:
            del self._waiters[key]

    def _enqueue(self, item: Op | _Control) -> None:
        self._queue.append(item)
        self._wake.set()

    async def _control(self, control: _Control) -> None:
        if self._task is None:
            raise NotServing("the accountant is not running")
        self._enqueue(control)
        await control.future

    # --- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = queue[0]
            if isinstance(head, _Control):
                queue.popleft()
                await self._run_control(head)
                continue
            batch: list[Op] = []
            while queue and len(batch) < self._max_batch and not isinstance(queue[0], _Control):
                item = queue.popleft()
                assert isinstance(item, Op)
                batch.append(item)
            try:
                await self._commit_batch(batch)
            except Exception as exc:  # a bug: whatever it left in memory cannot be trusted
                _log.exception("group_commit_failed")
                for op in batch:
                    if op.partition in self.books:
                        self._break(op.partition)
                    _fail(op, StoreUnavailable(f"the batch failed: {exc!r}"))

    async def _run_control(self, control: _Control) -> None:
        try:
            if isinstance(control, _Install):
                self._broken.update(control.epochs)
                for partition in control.epochs:
                    self.books.pop(partition, None)
                await self._repair(force=True)
            elif isinstance(control, _Retire):
                self.drop(control.partition)
            elif isinstance(control, _Upkeep):
                self._run_upkeep(control.idle_seconds)
        except Exception as exc:
            _log.exception("committer_control_failed")
            if not control.future.done():
                control.future.set_exception(exc)
            return
        if not control.future.done():
            control.future.set_result(None)

    def _run_upkeep(self, idle_seconds: float) -> None:
        now = naive_utc(self._clock())
        keep_from = previous_period(month_period(now))
        self._policy.forget_before(keep_from)
        for book in self.books.values():
            forgotten = book.evict(now - timedelta(seconds=idle_seconds))
            book.forget_months_before(keep_from)
            if forgotten:
                _log.debug("tasks_forgotten", partition=book.partition, tasks=forgotten)

    def _break(self, partition: int) -> None:
        book = self.books.pop(partition, None)
        if book is not None:
            self._broken[partition] = book.epoch

    async def _repair(self, *, force: bool = False) -> None:
        """Rebuild the books of broken partitions from the database (at most every half second unless forced)."""
        if not self._broken or (not force and time.monotonic() - self._last_repair < _REPAIR_INTERVAL_SECONDS):
            return
        self._last_repair = time.monotonic()
        epochs = dict(self._broken)
        now = naive_utc(self._clock())
        since = previous_period(month_period(now))
        started = time.perf_counter()
        try:
            snapshot = await self._store.snapshot(sorted(epochs), period_start(since), self._rates.window_began(now))
        except Exception as exc:
            _log.warning("book_rebuild_failed", partitions=sorted(epochs), error=repr(exc))
            return
        tasks: dict[int, list[StoredTask]] = {partition: [] for partition in epochs}
        for task in snapshot.tasks:
            tasks.setdefault(_partition_of(task.tenant), []).append(task)
        monthly = {
            partition: [m for m in snapshot.monthly if _partition_of(m.tenant) == partition] for partition in epochs
        }
        for partition, epoch in epochs.items():
            if self._broken.get(partition) != epoch:
                continue  # dropped or taken again meanwhile
            self.books[partition] = PartitionBook.rebuilt(
                partition,
                epoch,
                self._policy,
                since_period=since,
                reservation_ttl=self._ttl,
                monthly=monthly.get(partition, []),
                tasks=tasks.get(partition, []),
                rates=self._rates,
                admissions=[a for a in snapshot.admissions if _partition_of(a.tenant) == partition],
                open_tasks={t: n for t, n in snapshot.open_tasks.items() if _partition_of(t) == partition},
                now=now,
            )
            del self._broken[partition]
        _log.info("books_rebuilt", partitions=sorted(epochs), seconds=round(time.perf_counter() - started, 3))

    async def _commit_batch(self, batch: list[Op]) -> None:
        started = time.perf_counter()
        if self._broken and any(op.partition in self._broken for op in batch):
            await self._repair()
        live: list[Op] = []
        for op in batch:
            if op.partition in self.books:
                live.append(op)
            elif op.partition in self._broken:
                _fail(op, StoreUnavailable("the budget store is unavailable; the partition's book is being rebuilt"))
            else:
                _fail(op, NotServing(f"partition {op.partition} is not served here"))
        if not live:
            return
        loaded = await self._load(live)
        if loaded is None:
            return
        self._seq += 1
        seq = self._seq
        now = naive_utc(self._clock())
        touched: dict[int, PartitionBook] = {}
        decided: list[Op] = []
        usage_tasks: set[TaskKey] = set()
        for op in live:
            book = self.books.get(op.partition)
            if book is None:
                _fail(op, NotServing(f"partition {op.partition} is not served here"))
                continue
            if op.partition not in touched:
                book.begin(seq)
                touched[op.partition] = book
            op.result = self._apply(op, book, now, loaded)
            decided.append(op)
            if isinstance(op, UsageOp):
                usage_tasks.update(
                    (entry.usage.tenant, entry.usage.task_id)
                    for entry, new in zip(op.entries, op.result, strict=True)
                    if new and entry.usage.task_id is not None
                )
        if not decided:
            return
        await self._faults.reach("decided")
        plans = {partition: book.take_plan() for partition, book in touched.items()}
        epochs = {partition: book.epoch for partition, book in touched.items()}
        written = time.perf_counter()
        try:
            fenced = await self._store.commit(self.replica, epochs, plans)
        except Exception as exc:
            _log.warning("group_commit_failed", partitions=sorted(touched), error=repr(exc))
            self._verify_usage_until = time.monotonic() + _VERIFY_USAGE_SECONDS
            self._last_repair = 0.0  # the next batch rebuilds at once; only repeated failures wait between tries
            for partition in touched:
                self._break(partition)
            error = StoreUnavailable(f"the budget store failed: {exc.__class__.__name__}; ask again")
            for op in decided:
                _fail(op, error)
            return
        for partition in fenced:
            _log.warning("partition_fenced", partition=partition, epoch=epochs[partition])
            self.drop(partition)
            self._on_fenced(partition, epochs[partition])
        for partition, book in touched.items():
            if partition not in fenced:
                book.mark_committed(seq)
                if plans[partition].alerts:
                    self.alerts_queued.set()
        self._metrics.commit_seconds.observe(time.perf_counter() - written)
        self._metrics.batch_size.observe(len(decided))
        await self._faults.reach("committed")
        for op in decided:
            if op.partition in fenced:
                _fail(op, NotServing(f"partition {op.partition} was taken over"))
            elif not op.future.done():
                op.future.set_result(op.result)
        for key in usage_tasks:
            self._wake_waiters(key)
        self._metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _load(self, live: list[Op]) -> Loaded | None:
        """Read what the batch needs and memory lacks; None (every operation failed) when the store fails."""
        wanted: dict[TaskKey, int] = {}
        usage: list[tuple[str, str]] = []
        for op in live:
            known = self.books[op.partition]
            for key in op.task_keys():
                if not known.has_task(key):
                    wanted[key] = op.partition
            if isinstance(op, UsageOp):
                # A record of a task is checked against the task's usage ids, which the book holds (a task is
                # read with all of them): only records of no task are looked up in the ledger. After a failed
                # commit every record is, for a while, in case one was in the ledger under another task.
                verify = time.monotonic() < self._verify_usage_until
                usage.extend(
                    (entry.usage.tenant, entry.usage.usage_id)
                    for entry in op.entries
                    if verify or entry.usage.task_id is None
                )
        if not wanted and not usage:
            return _NOTHING_LOADED
        try:
            loaded = await self._store.load(list(wanted), usage)
        except Exception as exc:
            _log.warning("book_load_failed", error=repr(exc))
            error = StoreUnavailable(f"the budget store failed: {exc.__class__.__name__}; ask again")
            for op in live:
                _fail(op, error)
            return None
        for key, partition in wanted.items():
            book = self.books.get(partition)
            if book is not None and not book.has_task(key):
                book.install(loaded.tasks.get(key) or StoredTask(key[0], key[1], None, {}, []))
        return loaded

    @staticmethod
    def _apply(op: Op, book: PartitionBook, now: datetime, loaded: Loaded) -> Any:
        if isinstance(op, ReserveOp):
            verdict: Verdict | None = book.reserve(op.request, now)
            return verdict
        if isinstance(op, UsageOp):
            in_ledger = loaded.usage_in_ledger
            return [
                book.record(entry, now, in_ledger=(entry.usage.tenant, entry.usage.usage_id) in in_ledger)
                for entry in op.entries
            ]
        if isinstance(op, CloseOp):
            return book.close(op.tenant, op.task_id, now)
        if isinstance(op, ExpireOp):
            return book.expire(now)
        return None

    def _wake_waiters(self, key: TaskKey) -> None:
        waiters = self._waiters.get(key)
        book = self.books.get(_partition_of(key[0]))
        if not waiters or book is None or key not in book.tasks:
            return
        usage = book.tasks[key].usage
        for waiter in waiters:
            if not waiter.future.done() and waiter.usage_ids <= usage:
                waiter.future.set_result(None)


_NOTHING_LOADED = Loaded(tasks={}, usage_in_ledger=set())


def _fail(op: Op, error: Exception) -> None:
    if not op.future.done():
        op.future.set_exception(error)


def _partition_of(tenant: str) -> int:
    return int(budget_partition(tenant))
