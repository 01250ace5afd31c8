"""The accountant's store in SQL through SQLAlchemy Core: SQLite (the default) or Postgres.

One writer connection per store, and a group commit is one transaction on it:

- SQLite: the standard `sqlite3` driver. A transaction's statements run on the event loop (they touch only
  SQLite's page cache and take microseconds); its COMMIT, which waits for the disk, runs on one writer
  thread. Statements are not sent to a thread one by one: `sqlite3` gives up and takes back the GIL around
  every step of every statement, and a thread waiting to take it back behind a busy event loop waits up to
  the interpreter's switch interval each time, so a transaction of many small hops would mostly wait. WAL
  journal, `synchronous=FULL` (a commit is on disk before anyone is answered), and write transactions begin
  `IMMEDIATE`, taking the database's single write lock up front.
- Postgres: asyncpg, on one connection kept open; the transaction's statements run as one Core function
  through `run_sync`.

The statements of the group commit are SQLAlchemy Core compiled once, at import, for each dialect; rows go
to the driver as tuples in one executemany per statement, with no per-row parameter processing. Reports,
rebuilds and the alert outbox are read on other connections, so they never wait for the writer.

The fence. A partition's changes are written only while `budget_partitions` still names this replica and
its epoch: the check is the first statement of the commit's transaction. On Postgres it reads the rows
`FOR SHARE`, so a take-over (which raises the epoch with an UPDATE) waits for this commit to end, and a
commit that starts after a take-over sees the new epoch; on SQLite the write lock serializes the two.
Either way nothing can be committed for a partition after its lease was taken, and the new owner, which
rebuilds its book only after its take-over committed, sees everything committed before.

Leases are kept in the same table: a replica renews its own with every heartbeat and takes a free or lapsed
one by raising its epoch. Lapse times come from each replica's clock: skewed clocks can make a take-over
early (then the old owner is fenced out, and stops), never unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agentbus.contracts.budget import BudgetAlert
from agentbus.contracts.registry import budget_partition
from agentbus.cost_accountant.adapters.schema import (
    accountant_replicas,
    budget_alerts,
    budget_partitions,
    ledger,
    reservations,
    tasks,
)
from agentbus.cost_accountant.book import Hold, LedgerEntry, MonthlySpend, Plan, StoredHold, StoredTask, TaskKey
from agentbus.cost_accountant.limits import Admission
from agentbus.cost_accountant.ports import LeaseRow, LeaseView, Loaded, ReportKey, ReportLine, Snapshot
from agentbus.runtime.logging import get_logger
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite.pysqlite import dialect as pysqlite_dialect
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_log = get_logger(__name__)

T = TypeVar("T")

MIGRATIONS = "agentbus.cost_accountant:migrations"
# Any constant works: it only has to be the same for every replica running migrations at start-up.
MIGRATION_LOCK_KEY = 0x636F7374
SQLITE_BEGIN_OPTION = "agentbus_sqlite_begin"
_IN_CHUNK = 400
"""Keys per IN list: far below SQLite's limit on bound parameters."""
_SWITCH_INTERVAL_SECONDS = 0.001
"""The SQLite writer thread takes the GIL back after each commit; behind a busy event loop it would wait up to
the interpreter's switch interval (5 ms by default), a delay every answer of the batch would carry."""


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _partition(tenant: str) -> int:
    return int(budget_partition(tenant))


def _chunks(items: Sequence[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield list(items[start : start + _IN_CHUNK])


# --- statements, built once ------------------------------------------------------------------------

_TASKS_HOLDING = select(reservations.c.tenant, reservations.c.task_id).where(reservations.c.status == "open").distinct()
_ADMITTED = select(
    reservations.c.tenant,
    reservations.c.agent,
    reservations.c.submitted_by,
    reservations.c.model,
    reservations.c.tokens,
    reservations.c.created_at,
).where(
    reservations.c.created_at >= bindparam("since"),
    reservations.c.kind == "llm",
    reservations.c.status != "denied",
)
_OPEN_TASKS = (
    select(tasks.c.tenant, func.count().label("open")).where(tasks.c.closed_at.is_(None)).group_by(tasks.c.tenant)
)
_MONTH = func.substr(ledger.c.day, 1, 7)
_MONTHLY_SPEND = (
    select(
        ledger.c.tenant,
        ledger.c.submitted_by,
        ledger.c.agent,
        ledger.c.model,
        _MONTH.label("month"),
        func.sum(ledger.c.cost_nanousd).label("spent"),
    )
    .where(ledger.c.at >= bindparam("since"))
    .group_by(ledger.c.tenant, ledger.c.submitted_by, ledger.c.agent, ledger.c.model, _MONTH)
)
_UPDATE_HOLDS = (
    update(reservations)
    .where(reservations.c.tenant == bindparam("k_tenant"))
    .where(reservations.c.task_id == bindparam("k_task"))
    .where(reservations.c.reservation_id == bindparam("k_id"))
    .values(status=bindparam("v_status"), closed_at=bindparam("v_closed_at"))
)
_CLOSE_TASKS = (
    update(tasks)
    .where(tasks.c.tenant == bindparam("k_tenant"))
    .where(tasks.c.task_id == bindparam("k_task"))
    .values(closed_at=bindparam("v_closed_at"))
)
_LEASES = select(budget_partitions).order_by(budget_partitions.c.partition_id)
_RENEW = (
    update(budget_partitions)
    .where(budget_partitions.c.owner == bindparam("replica"))
    .values(lease_expires_at=bindparam("expires"))
)
_ACQUIRE = (
    update(budget_partitions)
    .where(budget_partitions.c.partition_id == bindparam("k_partition"))
    .where(budget_partitions.c.epoch == bindparam("seen_epoch"))
    .where(
        budget_partitions.c.owner.is_(None)
        | budget_partitions.c.lease_expires_at.is_(None)
        | (budget_partitions.c.lease_expires_at < bindparam("now"))
    )
    .values(owner=bindparam("replica"), epoch=budget_partitions.c.epoch + 1, lease_expires_at=bindparam("expires"))
)
_RELEASE = (
    update(budget_partitions)
    .where(budget_partitions.c.partition_id == bindparam("k_partition"))
    .where(budget_partitions.c.owner == bindparam("replica"))
    .where(budget_partitions.c.epoch == bindparam("k_epoch"))
    .values(owner=None, lease_expires_at=None)
)
_LIVE_REPLICAS = (
    select(func.count())
    .select_from(accountant_replicas)
    .where(accountant_replicas.c.heartbeat_at >= bindparam("since"))
)
_FORGET_REPLICAS = delete(accountant_replicas).where(accountant_replicas.c.heartbeat_at < bindparam("before"))
_LEAVE = delete(accountant_replicas).where(accountant_replicas.c.replica_id == bindparam("replica"))


def _insert_all_columns(table: Any) -> Any:
    return insert(table).values({column.name: bindparam(column.name) for column in table.columns})


class _Compiled:
    """A Core statement compiled once for a dialect: the driver's SQL and the order of its parameters.

    Rows are given as tuples in `order` (by default the statement's own parameter order).
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect, order: tuple[str, ...] | None = None) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._take = None if order is None or order == self.names else [order.index(name) for name in self.names]

    def check_columns(self, table: Any) -> _Compiled:
        # Rows are built as tuples in the table's column order: the compiled statement must take them so.
        assert self.names == tuple(column.name for column in table.columns), (self.names, table.name)
        return self

    def run(self, driver: _Driver, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self._take is not None:
            take = self._take
            rows = [tuple(row[i] for i in take) for row in rows]
        driver.executemany(self.sql, rows)


class _Driver(Protocol):
    """The group commit's statements go to the driver directly: compiled SQL and tuples, nothing per row."""

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]: ...

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...


class _SqliteDriver:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self._connection.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._connection.executemany(sql, rows)


def _sqlite_datetime(moment: datetime | None) -> str | None:
    """The text SQLAlchemy stores a SQLite DATETIME as (the driver is given values directly)."""
    if moment is None:
        return None
    return moment.isoformat(" ", "microseconds")


def _as_is(moment: datetime | None) -> datetime | None:
    return moment


class _DialectStatements:
    """The statements whose SQL differs between SQLite and Postgres."""

    def __init__(self, dialect: str) -> None:
        insert_for = postgresql.insert if dialect == "postgresql" else sqlite.insert
        driver: Dialect = asyncpg_dialect() if dialect == "postgresql" else pysqlite_dialect()  # type: ignore[no-untyped-call]
        self.datetime: Callable[[datetime | None], Any] = _as_is if dialect == "postgresql" else _sqlite_datetime
        self.insert_ledger = _Compiled(_insert_all_columns(ledger), driver).check_columns(ledger)
        self.insert_holds = _Compiled(_insert_all_columns(reservations), driver).check_columns(reservations)
        self.insert_tasks = _Compiled(_insert_all_columns(tasks), driver).check_columns(tasks)
        self.update_holds = _Compiled(_UPDATE_HOLDS, driver, ("k_tenant", "k_task", "k_id", "v_status", "v_closed_at"))
        self.close_tasks = _Compiled(_CLOSE_TASKS, driver, ("k_tenant", "k_task", "v_closed_at"))
        alerts = insert_for(budget_alerts).values({c.name: bindparam(c.name) for c in budget_alerts.columns})
        self.insert_alerts = _Compiled(alerts.on_conflict_do_nothing(index_elements=["alert_id"]), driver)
        self.insert_alerts.check_columns(budget_alerts)
        self.add_partitions = insert_for(budget_partitions).on_conflict_do_nothing(index_elements=["partition_id"])
        heartbeat = insert_for(accountant_replicas)
        self.heartbeat = heartbeat.on_conflict_do_update(
            index_elements=["replica_id"], set_={"heartbeat_at": heartbeat.excluded.heartbeat_at}
        )
        # SQLite's group commit reads the fence as its first statement: the write lock is held already, and
        # the few rows are all read. (Postgres checks it inside its one statement: see _PostgresGroupCommit.)
        self.fence = "SELECT partition_id, owner, epoch FROM budget_partitions"


_STATEMENTS = {dialect: _DialectStatements(dialect) for dialect in ("sqlite", "postgresql")}


def _pg_type(column: Any) -> str:
    for kind, name in (
        (BigInteger, "int8"),
        (Integer, "int4"),
        (Boolean, "bool"),
        (Float, "float8"),
        (DateTime, "timestamp"),
        (String, "text"),
    ):
        if isinstance(column.type, kind):
            return name
    raise TypeError(f"no Postgres array type for {column}")


class _PostgresGroupCommit:
    """The whole group commit on Postgres as one statement, run on its own (its own transaction): one round
    trip, however many rows. Each table's rows go as one array per column (plus each row's partition) and
    are unnested into data-modifying CTEs; the first CTE is the fence, locking this replica's lease rows
    `FOR SHARE`, and every change is kept only for the partitions it returns. The statement returns them.

    A batch has rows for a few tables only (reservations: new holds and tasks; usage: ledger rows and
    settled holds): the statement names just those, one text per combination, built when first needed."""

    SECTIONS = ("new_tasks", "closed_tasks", "new_holds", "changed_holds", "ledger", "alerts")

    def __init__(self) -> None:
        self._statements: dict[tuple[str, ...], str] = {}

    def sql(self, sections: tuple[str, ...]) -> str:
        statement = self._statements.get(sections)
        if statement is None:
            self._statements[sections] = statement = self._build(sections)
        return statement

    @staticmethod
    def _build(wanted: tuple[str, ...]) -> str:
        numbers = iter(range(1, 1000))

        def unnest(columns: list[tuple[str, str]]) -> str:
            arrays = ", ".join(f"${next(numbers)}::{kind}[]" for _, kind in columns)
            names = ", ".join(f'"{name}"' for name, _ in columns)
            return f"unnest({arrays}) AS r({names})"

        def typed(table: Any, names: tuple[str, ...]) -> list[tuple[str, str]]:
            return [("partition_id", "int4")] + [(name, _pg_type(table.c[name])) for name in names]

        # Built from the schema's own names only: no value ever goes into this text.
        kept = "r.partition_id IN (SELECT partition_id FROM fence)"
        fence = (
            "fence AS (SELECT p.partition_id FROM budget_partitions AS p "  # noqa: S608
            f"JOIN unnest(${next(numbers)}::int4[], ${next(numbers)}::int8[]) AS e(partition_id, epoch) "
            f"ON p.partition_id = e.partition_id AND p.epoch = e.epoch WHERE p.owner = ${next(numbers)} "
            "FOR SHARE OF p)"
        )

        def insert(name: str, table: Any, conflict: str = "") -> str:
            columns = tuple(column.name for column in table.columns)
            listed = ", ".join(f'"{column}"' for column in columns)
            source = unnest(typed(table, columns))
            return (
                f"{name} AS (INSERT INTO {table.name} ({listed}) SELECT {listed} FROM {source} WHERE {kept}{conflict})"  # noqa: S608
            )

        def change(name: str, table: Any, keys: tuple[str, ...], values: tuple[str, ...]) -> str:
            source = unnest(typed(table, keys + values))
            assign = ", ".join(f'"{column}" = r."{column}"' for column in values)
            match = " AND ".join(f't."{column}" = r."{column}"' for column in keys)
            return f"{name} AS (UPDATE {table.name} AS t SET {assign} FROM {source} WHERE {match} AND {kept})"  # noqa: S608

        builders: dict[str, Callable[[], str]] = {
            "new_tasks": lambda: insert("new_tasks", tasks),
            "closed_tasks": lambda: change("closed_tasks", tasks, ("tenant", "task_id"), ("closed_at",)),
            "new_holds": lambda: insert("new_holds", reservations),
            "changed_holds": lambda: change(
                "changed_holds", reservations, ("tenant", "task_id", "reservation_id"), ("status", "closed_at")
            ),
            "ledger": lambda: insert("ledger_rows", ledger),
            "alerts": lambda: insert("alerts", budget_alerts, " ON CONFLICT (alert_id) DO NOTHING"),
        }
        sections = [builders[section]() for section in wanted]  # in order: the parameters are numbered so
        return "WITH " + ",\n".join([fence, *sections]) + "\nSELECT partition_id FROM fence"

    def statement(
        self, replica: str, epochs: Mapping[int, int], rows: Mapping[int, _PlanRows]
    ) -> tuple[str, list[Any]]:
        """The statement for these rows and its arguments: the fence's, then, per section with rows, the rows'
        partitions and then their columns."""
        arguments: list[Any] = [list(epochs), list(epochs.values()), replica]
        sections: list[str] = []
        for section in self.SECTIONS:
            partitions: list[int] = []
            table: list[tuple[Any, ...]] = []
            for partition, plan in rows.items():
                section_rows = getattr(plan, section)
                partitions.extend([partition] * len(section_rows))
                table.extend(section_rows)
            if not table:
                continue
            sections.append(section)
            arguments.append(partitions)
            arguments.extend(list(column) for column in zip(*table, strict=True))
        return self.sql(tuple(sections)), arguments


_PG_GROUP_COMMIT = _PostgresGroupCommit()


# --- connections -----------------------------------------------------------------------------------


class _Database(Protocol):
    dialect: str

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one write transaction on the writer connection."""
        ...

    async def read_latest(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a read transaction that sees every commit of the writer."""
        ...

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` on a reader connection, never waiting for the writer."""
        ...

    async def close(self) -> None: ...


class _SqliteDatabase:
    """pysqlite: statements on the event loop, commits on one writer thread, reads on short-lived threads
    (see the module docstring)."""

    dialect = "sqlite"

    def __init__(self, url: URL) -> None:
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ValueError("the accountant's SQLite database must be a file (several connections share it)")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        self._engine: Engine = create_engine(
            url.set(drivername="sqlite"),
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=4,
            max_overflow=4,
        )
        _set_up_sqlite(self._engine)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="accountant-commit")
        self._lock = asyncio.Lock()
        self._connection: Connection | None = None
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL_SECONDS))

    def _writer(self, mode: str) -> Connection:
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection.execution_options(**{SQLITE_BEGIN_OPTION: mode})

    def _discard(self) -> None:
        # After a failure the connection's state is unknown: the next transaction starts on a new one.
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.invalidate()

    async def write(self, work: Callable[[Connection], T]) -> T:
        async with self._lock:
            try:
                connection = self._writer("IMMEDIATE")
                transaction = connection.begin()
                result = work(connection)
                # Only the commit waits for the disk: it alone leaves the event loop.
                await asyncio.get_running_loop().run_in_executor(self._thread, transaction.commit)
            except BaseException:
                self._discard()
                raise
            return result

    async def write_driver(self, work: Callable[[_Driver], T]) -> T:
        async with self._lock:
            try:
                connection = self._writer("IMMEDIATE").connection.driver_connection
                assert isinstance(connection, sqlite3.Connection)
                connection.execute("BEGIN IMMEDIATE")
                result = work(_SqliteDriver(connection))
                # Only the commit waits for the disk: it alone leaves the event loop.
                await asyncio.get_running_loop().run_in_executor(self._thread, connection.execute, "COMMIT")
            except BaseException:
                self._discard()
                raise
            return result

    async def read_latest(self, work: Callable[[Connection], T]) -> T:
        async with self._lock:
            try:
                connection = self._writer("DEFERRED")
                with connection.begin():
                    return work(connection)
            except BaseException:
                self._discard()
                raise

    def _on_reader(self, work: Callable[[Connection], T]) -> T:
        with self._engine.connect() as connection:
            connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
            with connection.begin():
                return work(connection)

    async def read(self, work: Callable[[Connection], T]) -> T:
        return await asyncio.to_thread(self._on_reader, work)

    async def close(self) -> None:
        async with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        self._thread.shutdown(wait=True)
        self._engine.dispose()


def _set_up_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins, so BEGIN IMMEDIATE can be sent.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


class _PostgresDatabase:
    """asyncpg: one writer connection kept open, and a small pool for readers."""

    dialect = "postgresql"

    def __init__(self, url: URL, schema: str | None) -> None:
        connect_args: dict[str, Any] = {}
        if schema is not None:
            connect_args["server_settings"] = {"search_path": schema}
        self._engine: AsyncEngine = create_async_engine(url, connect_args=connect_args, pool_size=3, max_overflow=2)
        self._lock = asyncio.Lock()
        self._connection: AsyncConnection | None = None

    async def write(self, work: Callable[[Connection], T]) -> T:
        async with self._lock:
            if self._connection is None:
                self._connection = await self._engine.connect()
            connection = self._connection
            try:
                async with connection.begin():
                    return await connection.run_sync(work)
            except Exception:
                # The connection's state is unknown after a failure: the next transaction starts on a new one.
                self._connection = None
                with contextlib.suppress(Exception):
                    await connection.invalidate()
                raise

    async def fetch_alone(self, sql: str, arguments: list[Any]) -> list[Any]:
        """Run one statement as its own transaction on the writer connection, straight through asyncpg."""
        async with self._lock:
            if self._connection is None:
                self._connection = await self._engine.connect()
            connection = self._connection
            try:
                raw = (await connection.get_raw_connection()).driver_connection
                assert raw is not None
                return list(await raw.fetch(sql, *arguments))
            except Exception:
                self._connection = None
                with contextlib.suppress(Exception):
                    await connection.invalidate()
                raise

    async def read_latest(self, work: Callable[[Connection], T]) -> T:
        return await self.read(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        async with self._engine.connect() as connection:
            return await connection.run_sync(work)

    async def close(self) -> None:
        async with self._lock:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
                self._connection = None
        await self._engine.dispose()


def open_database(url: str, schema: str | None = None) -> _Database:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _SqliteDatabase(parsed)
    if parsed.get_backend_name() == "postgresql":
        return _PostgresDatabase(parsed.set(drivername="postgresql+asyncpg"), schema)
    raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use SQLite or Postgres")


# --- the store ---------------------------------------------------------------------------------------


class SqlAccountantStore:
    """The accountant's store (see the module docstring)."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self._db = open_database(url, schema)
        self._sql = _STATEMENTS[self._db.dialect]

    @property
    def dialect(self) -> str:
        return self._db.dialect

    async def close(self) -> None:
        await self._db.close()

    async def migrate(self) -> None:
        """`alembic upgrade head` with the migrations shipped in the package. Safe when replicas start
        together: on Postgres an advisory lock makes them take turns; on SQLite the write lock does."""
        config = Config()
        config.set_main_option("script_location", MIGRATIONS)
        dialect = self._db.dialect

        def upgrade(connection: Connection) -> None:
            if dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        await self._db.write(upgrade)

    # --- the books ---------------------------------------------------------------------------------

    async def load(self, tasks: Sequence[TaskKey], usage: Sequence[tuple[str, str]]) -> Loaded:
        """Tasks as the database has them, and which of the (tenant, usage_id) keys the ledger holds.

        Every group commit that takes usage records reads here first, so the queries go to the driver
        directly: on Postgres joins with `unnest`ed key arrays (one statement each, whatever the number of
        keys), on SQLite row-value lists, on the writer's own connection."""
        task_keys, usage_keys = list(tasks), list(usage)
        if isinstance(self._db, _PostgresDatabase):
            return await self._load_postgres(self._db, task_keys, usage_keys)

        def work(connection: Connection) -> Loaded:
            raw = connection.connection.driver_connection
            assert isinstance(raw, sqlite3.Connection)

            def by_keys(query: _KeyQuery, keys: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
                rows: list[tuple[Any, ...]] = []
                for chunk in _chunks(keys):
                    flat = [value for key in chunk for value in key]
                    rows.extend(raw.execute(query.sqlite(len(chunk)), flat).fetchall())
                return rows

            in_ledger = {(row[0], row[1]) for row in by_keys(_USAGE_BY_KEY, usage_keys)}
            found = by_keys(_TASKS_BY_KEY, task_keys)
            holds = by_keys(_HOLDS_BY_TASK, [(row[0], row[1]) for row in found])
            return Loaded(
                tasks=_stored_tasks(found, by_keys(_LEDGER_BY_TASK, task_keys), holds, _parse_sqlite_datetime),
                usage_in_ledger=in_ledger,
            )

        return await self._db.read_latest(work)

    @staticmethod
    async def _load_postgres(
        db: _PostgresDatabase, task_keys: list[TaskKey], usage_keys: list[tuple[str, str]]
    ) -> Loaded:
        async def by_keys(query: _KeyQuery, keys: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
            if not keys:
                return []
            firsts, seconds = zip(*keys, strict=True)
            return [tuple(row) for row in await db.fetch_alone(query.postgres, [list(firsts), list(seconds)])]

        in_ledger = {(row[0], row[1]) for row in await by_keys(_USAGE_BY_KEY, usage_keys)}
        found = await by_keys(_TASKS_BY_KEY, task_keys)
        holds = await by_keys(_HOLDS_BY_TASK, [(row[0], row[1]) for row in found])
        ledger_rows = await by_keys(_LEDGER_BY_TASK, task_keys)
        return Loaded(tasks=_stored_tasks(found, ledger_rows, holds, _as_datetime), usage_in_ledger=in_ledger)

    async def snapshot(
        self, partitions: Sequence[int], since: datetime, admitted_since: datetime | None = None
    ) -> Snapshot:
        """What rebuilding the books of `partitions` needs: monthly spend from `since`, tasks holding budget,
        LLM reservations admitted from `admitted_since` (the rate window) and each tenant's open tasks."""
        wanted = set(partitions)
        moment = _naive(since)

        def work(
            connection: Connection,
        ) -> tuple[list[TaskKey], list[MonthlySpend], list[Admission], dict[str, int]]:
            holding = [(row[0], row[1]) for row in connection.execute(_TASKS_HOLDING) if _partition(row[0]) in wanted]
            monthly = [
                MonthlySpend(row.tenant, row.submitted_by, row.agent, row.model, row.month, int(row.spent))
                for row in connection.execute(_MONTHLY_SPEND, {"since": moment})
                if _partition(row.tenant) in wanted
            ]
            admissions: list[Admission] = []
            if admitted_since is not None:
                admissions = [
                    Admission(row[0], row[1], row[2], row[3], int(row[4] or 0), _moment(row[5]))
                    for row in connection.execute(_ADMITTED, {"since": _naive(admitted_since)})
                    if _partition(row[0]) in wanted
                ]
            open_tasks = {
                row[0]: int(row[1]) for row in connection.execute(_OPEN_TASKS) if _partition(row[0]) in wanted
            }
            return holding, monthly, admissions, open_tasks

        # The committer is idle while it rebuilds, so a reader connection sees every commit already.
        holding, monthly, admissions, open_tasks = await self._db.read(work)
        loaded = await self.load(holding, [])
        return Snapshot(
            monthly=monthly, tasks=list(loaded.tasks.values()), admissions=admissions, open_tasks=open_tasks
        )

    async def commit(self, replica: str, epochs: Mapping[int, int], plans: Mapping[int, Plan]) -> set[int]:
        """Write the plans of the partitions still leased to (replica, epoch), in one transaction; the
        partitions fenced out (none of their changes written)."""
        sql = self._sql
        rows = {partition: _PlanRows.of(plan, sql) for partition, plan in plans.items() if plan}
        db = self._db
        if isinstance(db, _PostgresDatabase):
            sql_text, arguments = _PG_GROUP_COMMIT.statement(replica, epochs, rows)
            kept = await db.fetch_alone(sql_text, arguments)
            return set(epochs) - {row[0] for row in kept}
        assert isinstance(db, _SqliteDatabase)

        def work(driver: _Driver) -> set[int]:
            fenced = set(epochs)
            for partition, owner, epoch in driver.rows(sql.fence, ()):
                if partition in epochs and owner == replica and epoch == epochs[partition]:
                    fenced.discard(partition)
            kept = [plan for partition, plan in rows.items() if partition not in fenced]
            sql.insert_tasks.run(driver, [r for plan in kept for r in plan.new_tasks])
            sql.close_tasks.run(driver, [r for plan in kept for r in plan.closed_tasks])
            sql.insert_holds.run(driver, [r for plan in kept for r in plan.new_holds])
            sql.update_holds.run(driver, [r for plan in kept for r in plan.changed_holds])
            sql.insert_ledger.run(driver, [r for plan in kept for r in plan.ledger])
            sql.insert_alerts.run(driver, [r for plan in kept for r in plan.alerts])
            return fenced

        return await db.write_driver(work)

    # --- leases ------------------------------------------------------------------------------------

    async def lease_round(self, replica: str, partitions: int, now: datetime, ttl_seconds: float) -> LeaseView:
        """Heartbeat, renew this replica's leases, and read every lease and how many replicas are alive."""
        moment = _naive(now)
        ttl = timedelta(seconds=ttl_seconds)
        sql = self._sql

        def work(connection: Connection) -> LeaseView:
            connection.execute(
                sql.add_partitions,
                [{"partition_id": p, "owner": None, "epoch": 0, "lease_expires_at": None} for p in range(partitions)],
            )
            connection.execute(sql.heartbeat, {"replica_id": replica, "heartbeat_at": moment})
            connection.execute(_RENEW, {"replica": replica, "expires": moment + ttl})
            connection.execute(_FORGET_REPLICAS, {"before": moment - 10 * ttl})
            live = int(connection.execute(_LIVE_REPLICAS, {"since": moment - ttl}).scalar_one())
            leases = {
                row.partition_id: LeaseRow(row.partition_id, row.owner, row.epoch, row.lease_expires_at)
                for row in connection.execute(_LEASES)
                if row.partition_id < partitions
            }
            return LeaseView(leases=leases, live_replicas=live)

        return await self._db.write(work)

    async def acquire(self, partition: int, replica: str, seen_epoch: int, now: datetime, ttl_seconds: float) -> bool:
        """Take a free or lapsed lease (raising its epoch from `seen_epoch`); False when someone else did."""
        moment = _naive(now)
        params = {
            "k_partition": partition,
            "seen_epoch": seen_epoch,
            "now": moment,
            "replica": replica,
            "expires": moment + timedelta(seconds=ttl_seconds),
        }

        def work(connection: Connection) -> bool:
            return connection.execute(_ACQUIRE, params).rowcount == 1

        return await self._db.write(work)

    async def release(self, partition: int, replica: str, epoch: int) -> None:
        """Give a lease up (it stays at its epoch; the next owner raises it)."""
        params = {"k_partition": partition, "replica": replica, "k_epoch": epoch}
        await self._db.write(lambda connection: connection.execute(_RELEASE, params))

    async def leave(self, replica: str) -> None:
        await self._db.write(lambda connection: connection.execute(_LEAVE, {"replica": replica}))

    # --- reads -------------------------------------------------------------------------------------

    async def report(self, tenant: str | None, by: ReportKey, since: datetime | None) -> list[ReportLine]:
        """Ledger totals grouped by task, agent, model, day or tenant."""
        column = {
            "task": ledger.c.task_id,
            "agent": ledger.c.agent,
            "model": ledger.c.model,
            "day": ledger.c.day,
            "tenant": ledger.c.tenant,
        }[by]
        query = select(
            column.label("key"),
            func.sum(ledger.c.prompt_tokens).label("prompt_tokens"),
            func.sum(ledger.c.completion_tokens).label("completion_tokens"),
            func.sum(ledger.c.gpu_seconds).label("gpu_seconds"),
            func.count().label("calls"),
            func.sum(ledger.c.cost_nanousd).label("cost"),
        ).group_by(column)
        if tenant is not None:
            query = query.where(ledger.c.tenant == tenant)
        if since is not None:
            query = query.where(ledger.c.at >= _naive(since))
        rows = await self._db.read(lambda connection: connection.execute(query).all())
        lines = [
            ReportLine(
                key=row.key if row.key is not None else "-",
                prompt_tokens=int(row.prompt_tokens or 0),
                completion_tokens=int(row.completion_tokens or 0),
                gpu_seconds=float(row.gpu_seconds or 0.0),
                calls=int(row.calls),
                cost_nano=int(row.cost or 0),
            )
            for row in rows
        ]
        return sorted(lines, key=lambda line: line.key)

    async def unpublished_alerts(self, limit: int) -> list[BudgetAlert]:
        query = (
            select(budget_alerts.c.payload)
            .where(budget_alerts.c.published_at.is_(None))
            .order_by(budget_alerts.c.created_at, budget_alerts.c.alert_id)
            .limit(limit)
        )
        payloads = await self._db.read(lambda connection: list(connection.execute(query).scalars()))
        return [BudgetAlert.model_validate_json(payload) for payload in payloads]

    async def mark_alerts_published(self, alert_ids: Sequence[str], now: datetime) -> None:
        if not alert_ids:
            return
        statement = (
            update(budget_alerts)
            .where(budget_alerts.c.alert_id.in_(sorted(alert_ids)))
            .values(published_at=_naive(now))
        )
        await self._db.write(lambda connection: connection.execute(statement))

    # --- inspection (tests, operators) -------------------------------------------------------------

    async def ledger_row(self, tenant: str, usage_id: str) -> dict[str, Any] | None:
        query = select(ledger).where(ledger.c.tenant == tenant).where(ledger.c.usage_id == usage_id)
        row = await self._db.read(lambda connection: connection.execute(query).first())
        return dict(row._mapping) if row is not None else None

    async def reservation_row(self, tenant: str, task_id: str, reservation_id: str) -> dict[str, Any] | None:
        query = (
            select(reservations)
            .where(reservations.c.tenant == tenant)
            .where(reservations.c.task_id == task_id)
            .where(reservations.c.reservation_id == reservation_id)
        )
        row = await self._db.read(lambda connection: connection.execute(query).first())
        return dict(row._mapping) if row is not None else None

    async def raw_charges(self, tenant: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """A tenant's ledger rows as (task_id, submitted_by, agent, model, day, cost) and its open reservations
        as (amount, scopes JSON): what its counters are rebuilt from, read as stored."""
        charges = select(
            ledger.c.task_id, ledger.c.submitted_by, ledger.c.agent, ledger.c.model, ledger.c.day, ledger.c.cost_nanousd
        ).where(ledger.c.tenant == tenant)
        holds = (
            select(reservations.c.amount_nanousd, reservations.c.scopes)
            .where(reservations.c.tenant == tenant)
            .where(reservations.c.status == "open")
        )

        def work(connection: Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            return (
                [tuple(row) for row in connection.execute(charges)],
                [tuple(row) for row in connection.execute(holds)],
            )

        return await self._db.read(work)

    async def leases(self) -> dict[int, LeaseRow]:
        rows = await self._db.read(lambda connection: connection.execute(_LEASES).all())
        return {
            row.partition_id: LeaseRow(row.partition_id, row.owner, row.epoch, row.lease_expires_at) for row in rows
        }


class _KeyQuery:
    """Rows of a table whose (tenant, key) is one of a list of pairs: SQL for each dialect, built once."""

    def __init__(self, table: Any, key: str, columns: tuple[str, ...]) -> None:
        listed = ", ".join(f'x."{column}"' for column in columns)
        # Built from the schema's own names only: no value ever goes into this text. The keys are joined (a
        # row-value IN list would make SQLite scan the whole table instead of using the index).
        self._sqlite_join = f'SELECT {listed} FROM k JOIN {table.name} AS x ON x."tenant" = k.a AND x."{key}" = k.b'  # noqa: S608
        self.postgres = (
            f"SELECT {listed} FROM {table.name} AS x "  # noqa: S608
            f"JOIN unnest($1::text[], $2::text[]) AS k(tenant, {key}) "
            f'ON x."tenant" = k.tenant AND x."{key}" = k.{key}'
        )

    @functools.cache  # noqa: B019 - a few lengths of a few module-level queries
    def sqlite(self, pairs: int) -> str:
        return "WITH k(a, b) AS (VALUES " + ",".join(["(?,?)"] * pairs) + ") " + self._sqlite_join


_TASK_COLUMNS = ("tenant", "task_id", "agent", "submitted_by", "budget_nanousd", "first_seen_at", "closed_at")
_HOLD_COLUMNS = (
    "tenant",
    "task_id",
    "reservation_id",
    "agent",
    "submitted_by",
    "kind",
    "model",
    "tool",
    "amount_nanousd",
    "status",
    "denied_budget",
    "limit_nanousd",
    "committed_nanousd",
    "scopes",
    "created_at",
    "expires_at",
    "closed_at",
)
_USAGE_BY_KEY = _KeyQuery(ledger, "usage_id", ("tenant", "usage_id"))
_TASKS_BY_KEY = _KeyQuery(tasks, "task_id", _TASK_COLUMNS)
_LEDGER_BY_TASK = _KeyQuery(ledger, "task_id", ("tenant", "task_id", "usage_id", "cost_nanousd"))
_HOLDS_BY_TASK = _KeyQuery(reservations, "task_id", _HOLD_COLUMNS)


def _parse_sqlite_datetime(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _moment(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _as_datetime(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _stored_tasks(
    task_rows: list[tuple[Any, ...]],
    ledger_rows: list[tuple[Any, ...]],
    hold_rows: list[tuple[Any, ...]],
    dt: Callable[[Any], datetime | None],
) -> dict[TaskKey, StoredTask]:
    """Tasks from driver rows (in the column orders of the key queries above)."""
    rows = {(row[0], row[1]): row for row in task_rows}
    usage: dict[TaskKey, dict[str, int]] = {}
    for tenant, task_id, usage_id, cost in ledger_rows:
        usage.setdefault((tenant, task_id), {})[usage_id] = int(cost)
    holds: dict[TaskKey, list[StoredHold]] = {}
    for row in hold_rows:
        created, expires = dt(row[14]), dt(row[15])
        assert created is not None
        assert expires is not None
        holds.setdefault((row[0], row[1]), []).append(
            StoredHold(
                tenant=row[0],
                task_id=row[1],
                reservation_id=row[2],
                agent=row[3],
                user=row[4],
                kind=row[5],
                model=row[6],
                tool=row[7],
                amount_nano=int(row[8]),
                status=row[9],
                keys=tuple((scope, period) for scope, period in json.loads(row[13])),
                denied_budget=row[10],
                limit_nano=row[11],
                committed_nano=row[12],
                created_at=created,
                expires_at=expires,
                closed_at=dt(row[16]),
            )
        )
    found: dict[TaskKey, StoredTask] = {}
    for key in set(rows) | set(usage):
        task = rows.get(key)
        found[key] = StoredTask(
            tenant=key[0],
            task_id=key[1],
            row=(task[2], task[3], task[4], dt(task[5]), dt(task[6])) if task is not None else None,
            usage=usage.get(key, {}),
            holds=holds.get(key, []),
        )
    return found


class _PlanRows:
    """A plan as driver rows (tuples in each compiled statement's order), built before the transaction."""

    __slots__ = ("alerts", "changed_holds", "closed_tasks", "ledger", "new_holds", "new_tasks")

    def __init__(self) -> None:
        self.ledger: list[tuple[Any, ...]] = []
        self.new_holds: list[tuple[Any, ...]] = []
        self.changed_holds: list[tuple[Any, ...]] = []
        self.new_tasks: list[tuple[Any, ...]] = []
        self.closed_tasks: list[tuple[Any, ...]] = []
        self.alerts: list[tuple[Any, ...]] = []

    @classmethod
    def of(cls, plan: Plan, sql: _DialectStatements) -> _PlanRows:
        dt = _last_value(sql.datetime)
        rows = cls()
        rows.ledger = [_ledger_row(entry, dt) for entry in plan.ledger]
        rows.new_holds = [_hold_row(hold, dt) for hold in plan.new_holds.values()]
        rows.changed_holds = [
            (hold.tenant, hold.task_id, hold.reservation_id, hold.status, dt(hold.closed_at))
            for hold in plan.changed_holds
        ]
        rows.new_tasks = [
            (
                task.tenant,
                task.task_id,
                task.agent,
                task.user,
                task.budget_nano,
                dt(task.first_seen_at),
                dt(task.closed_at),
            )
            for task in plan.new_tasks.values()
        ]
        rows.closed_tasks = [(task.tenant, task.task_id, dt(task.closed_at)) for task in plan.closed_tasks]
        rows.alerts = [
            (alert.alert_id, alert.tenant, alert.model_dump_json(), dt(_naive(alert.at)), None) for alert in plan.alerts
        ]
        return rows


def _last_value(convert: Callable[[datetime | None], Any]) -> Callable[[datetime | None], Any]:
    """`convert`, remembering its last answer: a batch's rows share their decision time."""
    last: list[Any] = [None, None]

    def converted(moment: datetime | None) -> Any:
        if moment is not last[0]:
            last[0], last[1] = moment, convert(moment)
        return last[1]

    return converted


def _ledger_row(entry: LedgerEntry, dt: Callable[[datetime | None], Any]) -> tuple[Any, ...]:
    usage = entry.priced.usage
    at = _naive(usage.at)
    return (
        usage.usage_id,
        usage.kind,
        usage.tenant,
        usage.task_id,
        entry.agent,
        entry.user,
        usage.model,
        usage.tool,
        usage.node_class,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.gpu_seconds,
        entry.priced.cost_nano,
        entry.priced.priced_by_default,
        usage.reservation_id,
        dt(at),
        at.date().isoformat(),
        dt(entry.recorded_at),
    )


_encode_string = json.encoder.encode_basestring_ascii


def scopes_json(keys: tuple[tuple[str, str], ...]) -> str:
    """The JSON `[[scope, period], ...]` of a reservation's scopes, built without the general encoder (this
    runs for every reservation)."""
    return "[" + ",".join(f"[{_encode_string(scope)},{_encode_string(period)}]" for scope, period in keys) + "]"


def _hold_row(hold: Hold, dt: Callable[[datetime | None], Any]) -> tuple[Any, ...]:
    verdict = hold.verdict
    return (
        hold.reservation_id,
        hold.tenant,
        hold.task_id,
        hold.agent,
        hold.user,
        hold.kind,
        hold.model,
        hold.tool,
        hold.amount_nano,
        hold.status,
        verdict.budget,
        verdict.limit_nano,
        verdict.committed_nano,
        scopes_json(hold.keys),
        dt(hold.created_at),
        dt(hold.expires_at),
        dt(hold.closed_at),
        hold.tokens,
    )
