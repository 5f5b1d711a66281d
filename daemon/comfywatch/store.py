"""Every SQL statement comfywatch runs, and the engine set-up behind them.

SQLite is opened in WAL mode (``sqlite3`` can read while the daemon writes) with a busy
timeout, and write transactions start with ``BEGIN IMMEDIATE`` so that a competing writer
delays us at the start of a transaction rather than failing it half-way. SQLAlchemy errors
are translated into :class:`~comfywatch.errors.StoreError`; nothing above sees them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import Connection, and_, delete, event, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import undefer

from comfywatch.errors import StoreError
from comfywatch.history import HistoryRecord, OutputRecord
from comfywatch.models import HookDelivery, Job, JobOutput
from comfywatch.states import ACTIVE_STATES, JobState, Reason

BUSY_TIMEOUT_MS = 5_000
DB_FILE_MODE = 0o640
DB_DIR_MODE = 0o750
_ACTIVE = [state.value for state in ACTIVE_STATES]


class DeliveryState:
    """States of a ``hook_deliveries`` row (public contract)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


def utc(ts_s: float) -> datetime:
    return datetime.fromtimestamp(ts_s, tz=UTC)


def utc_ms(ts_ms: int | None) -> datetime | None:
    if ts_ms is None:
        return None
    try:
        return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to register (from a config file)."""

    server: str
    prompt_id: str
    labels: Mapping[str, str]
    hooks: Sequence[str]
    source: str


@dataclass(frozen=True, slots=True)
class ActiveJob:
    """What the poller needs of a non-terminal job."""

    id: int
    server: str
    prompt_id: str
    state: JobState
    registered_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    hooks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """One job's new state, as decided for this tick (times in epoch seconds)."""

    job_id: int
    state: JobState
    reason: Reason | None = None
    history: HistoryRecord | None = None
    queued_at_s: float | None = None
    started_at_s: float | None = None
    #: Hooks owed for this change (only for terminal states), created in the same transaction.
    deliveries: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class StoreStats:
    jobs: Mapping[tuple[str, str], int]
    deliveries: Mapping[tuple[str, str], int]
    oldest_active: Mapping[tuple[str, str], datetime]


@dataclass(frozen=True, slots=True)
class JobFilter:
    states: Sequence[str] = ()
    server: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    prompt_id: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job with its outputs (and deliveries when asked), as the CLI and hooks show it."""

    job: Job
    outputs: tuple[JobOutput, ...]
    deliveries: tuple[HookDelivery, ...] = ()


def async_url(url: str) -> str:
    """The async-driver form of a configured SQLAlchemy URL."""
    parsed = make_url(url)
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None if nothing is there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _create_private_file(path: Path) -> None:
    """Create the database file readable by owner and group only (its WAL files follow)."""
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for folder in reversed(missing):  # created private too, whatever the umask
        folder.mkdir(mode=DB_DIR_MODE, exist_ok=True)
        folder.chmod(DB_DIR_MODE)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
    path.chmod(DB_FILE_MODE)  # whatever the umask did


class Store:
    """The database behind comfywatch: jobs, their outputs, and the hook outbox."""

    def __init__(self, engine: AsyncEngine, *, path: Path | None = None) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite: the file the engine works on. Open connections keep a deleted or replaced
        # file alive, so only a look at the path tells that it is no longer the database.
        self._path = path
        self._file_id = _file_id(path) if path is not None else None
        self._lock_fd: int | None = None
        self._lock_conn: AsyncConnection | None = None

    @classmethod
    def open(cls, url: str, *, create: bool = True, readonly: bool = False) -> Store:
        """An engine for ``url``; SQLite files are created private (0640) when ``create``.

        ``readonly`` stores (the CLI's queries) open deferred transactions, so they never
        take the write lock away from a running daemon.
        """
        path = _sqlite_path(url)
        if path is not None:
            if create:
                try:
                    _create_private_file(path)
                except OSError as exc:
                    raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
            elif not path.exists():
                raise StoreError(f"database {path} does not exist (has the daemon run yet?)")
        try:
            engine = create_async_engine(async_url(url), pool_pre_ping=path is None)
        except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open database: {_short(exc)}") from None
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine, immediate=not readonly)
        return cls(engine, path=path)

    async def lock_for_daemon(self) -> None:
        """Make sure no other daemon uses this database (two would send every hook twice):
        an exclusive ``flock`` beside a SQLite file, an advisory lock on PostgreSQL. Held
        until :meth:`close` (or the process ends, however it ends)."""
        if self._path is not None:
            lock_path = self._path.with_name(self._path.name + ".lock")
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, DB_FILE_MODE)
            except OSError as exc:
                raise StoreError(f"cannot open {lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(
                    f"another comfywatch daemon is using {self._path} (it holds {lock_path})"
                ) from None
            self._lock_fd = fd
            return
        if self.engine.dialect.name == "postgresql":
            try:
                conn = await self.engine.connect()
                got = await conn.scalar(text("SELECT pg_try_advisory_lock(hashtext('comfywatch'))"))
            except _DB_ERRORS as exc:
                raise StoreError(f"database error: {_short(exc)}") from None
            if not got:
                await conn.close()
                raise StoreError("another comfywatch daemon is using this database")
            self._lock_conn = conn

    async def close(self) -> None:
        if self._lock_conn is not None:
            await self._lock_conn.close()
            self._lock_conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.engine.dispose()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on any error."""
        try:
            async with self._sessions() as session, session.begin():
                yield session
        except _DB_ERRORS as exc:
            raise StoreError(f"database error: {_short(exc)}") from None

    # -- schema ---------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent)."""
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except AlembicCommandError as exc:
            # e.g. the database was migrated by a newer comfywatch
            raise StoreError(f"migration failed: {exc}") from None
        except _DB_ERRORS as exc:
            raise StoreError(f"migration failed: {_short(exc)}") from None

    async def schema_revision(self) -> tuple[str | None, str]:
        """The database's migration revision and the newest one this version ships."""
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""
        self._check_file()
        try:
            async with self.engine.connect() as conn:
                current = await conn.run_sync(
                    lambda c: MigrationContext.configure(c).get_current_revision()
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"database error: {_short(exc)}") from None
        return current, head

    def _check_file(self) -> None:
        """Raise StoreError if the SQLite file at the configured path is gone or replaced."""
        if self._path is None or self._file_id is None:
            return
        current = _file_id(self._path)
        if current is None:
            raise StoreError(f"database file {self._path} is gone")
        if current != self._file_id:
            raise StoreError(f"database file {self._path} was replaced while open")

    # -- registration ---------------------------------------------------------------------

    async def register(self, jobs: Iterable[NewJob], now_s: float) -> int:
        """Insert jobs not yet known; refresh labels and hooks of known non-terminal ones."""
        wanted = {(j.server, j.prompt_id): j for j in jobs}
        if not wanted:
            return 0
        now = utc(now_s)
        added = 0
        async with self._session() as session:
            existing: dict[tuple[str, str], Job] = {}
            servers = {server for server, _ in wanted}
            for server in servers:
                ids = [pid for s, pid in wanted if s == server]
                for chunk in _chunks(ids, 500):
                    rows = await session.scalars(
                        select(Job).where(Job.server == server, Job.prompt_id.in_(chunk))
                    )
                    existing.update({(r.server, r.prompt_id): r for r in rows})
            for key, spec in wanted.items():
                row = existing.get(key)
                if row is None:
                    session.add(
                        Job(
                            server=spec.server,
                            prompt_id=spec.prompt_id,
                            state=JobState.REGISTERED.value,
                            labels=dict(spec.labels),
                            hooks=list(spec.hooks),
                            source=spec.source,
                            registered_at=now,
                            updated_at=now,
                        )
                    )
                    added += 1
                elif row.state in _ACTIVE and (
                    row.labels != dict(spec.labels) or row.hooks != list(spec.hooks)
                ):
                    row.labels = dict(spec.labels)
                    row.hooks = list(spec.hooks)
                    row.updated_at = now
        return added

    # -- tracking -------------------------------------------------------------------------

    async def active_jobs(self) -> list[ActiveJob]:
        async with self._session() as session:
            rows = await session.execute(
                select(
                    Job.id,
                    Job.server,
                    Job.prompt_id,
                    Job.state,
                    Job.registered_at,
                    Job.queued_at,
                    Job.started_at,
                    Job.hooks,
                ).where(Job.state.in_(_ACTIVE))
            )
            return [
                ActiveJob(
                    id=r.id,
                    server=r.server,
                    prompt_id=r.prompt_id,
                    state=JobState(r.state),
                    registered_at=r.registered_at,
                    queued_at=r.queued_at,
                    started_at=r.started_at,
                    hooks=tuple(str(h) for h in (r.hooks or [])),
                )
                for r in rows
            ]

    async def record(self, changes: Sequence[Change], now_s: float) -> list[int]:
        """Apply one tick's changes in one transaction; returns the ids actually changed.

        A job already terminal in the database is never touched again (terminal states
        never change), so a change computed from stale data is dropped, not applied.
        """
        if not changes:
            return []
        now = utc(now_s)
        by_id = {change.job_id: change for change in changes}
        async with self._session() as session:
            # The write lock is already held (BEGIN IMMEDIATE; FOR UPDATE elsewhere), so the
            # rows found active here stay active until this transaction commits.
            live: set[int] = set()
            for chunk in _chunks(list(by_id), 500):
                live.update(
                    await session.scalars(
                        select(Job.id)
                        .where(Job.id.in_(chunk), Job.state.in_(_ACTIVE))
                        .with_for_update()
                    )
                )
            applied = [job_id for job_id in by_id if job_id in live]
            if not applied:
                return []
            await session.execute(
                update(Job), [{"id": i, **_job_values(by_id[i], now)} for i in applied]
            )
            outputs = [
                _output_row(i, out)
                for i in applied
                if (record := by_id[i].history) is not None
                for out in record.outputs
            ]
            if outputs:
                await session.execute(insert(JobOutput), outputs)
            deliveries = [
                {
                    "job_id": i,
                    "hook": hook,
                    "event_id": f"msg_{uuid.uuid4().hex}",
                    "event_type": f"job.{by_id[i].state.value}",
                    "state": DeliveryState.PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in applied
                for hook in by_id[i].deliveries
            ]
            if deliveries:
                await session.execute(insert(HookDelivery), deliveries)
        return applied

    # -- queries --------------------------------------------------------------------------

    async def jobs(
        self, flt: JobFilter, *, with_deliveries: bool = False, with_history: bool = False
    ) -> list[JobRecord]:
        """Jobs matching ``flt``, newest registration first, with their outputs (and their
        deliveries and raw history entries when asked)."""
        query = select(Job).order_by(Job.registered_at.desc(), Job.id.desc())
        if with_history:
            query = query.options(undefer(Job.history))
        if flt.states:
            query = query.where(Job.state.in_(list(flt.states)))
        if flt.server is not None:
            query = query.where(Job.server == flt.server)
        if flt.prompt_id is not None:
            query = query.where(Job.prompt_id == flt.prompt_id)
        for key, value in flt.labels.items():
            query = query.where(Job.labels[key].as_string() == value)
        if flt.limit is not None:
            query = query.limit(flt.limit)
        async with self._session() as session:
            jobs = list(await session.scalars(query))
            ids = [j.id for j in jobs]
            outputs: dict[int, list[JobOutput]] = {i: [] for i in ids}
            deliveries: dict[int, list[HookDelivery]] = {i: [] for i in ids}
            for chunk in _chunks(ids, 500):
                for out in await session.scalars(
                    select(JobOutput)
                    .where(JobOutput.job_id.in_(chunk))
                    .order_by(JobOutput.job_id, JobOutput.id)
                ):
                    outputs[out.job_id].append(out)
                if with_deliveries:
                    for dl in await session.scalars(
                        select(HookDelivery)
                        .where(HookDelivery.job_id.in_(chunk))
                        .order_by(HookDelivery.id)
                    ):
                        deliveries[dl.job_id].append(dl)
        return [JobRecord(j, tuple(outputs[j.id]), tuple(deliveries[j.id])) for j in jobs]

    async def job_record(self, job_id: int) -> JobRecord | None:
        """One job with its outputs, by database id."""
        async with self._session() as session:
            job = await session.get(Job, job_id)
            if job is None:
                return None
            outputs = await session.scalars(
                select(JobOutput).where(JobOutput.job_id == job_id).order_by(JobOutput.id)
            )
            return JobRecord(job, tuple(outputs))

    async def stats(self) -> StoreStats:
        """Counts for metrics: jobs by (server, state), deliveries by (hook, state), and
        the registration time of the oldest active job per (server, state)."""
        async with self._session() as session:
            jobs = await session.execute(
                select(Job.server, Job.state, func.count()).group_by(Job.server, Job.state)
            )
            deliveries = await session.execute(
                select(HookDelivery.hook, HookDelivery.state, func.count()).group_by(
                    HookDelivery.hook, HookDelivery.state
                )
            )
            oldest = await session.execute(
                select(Job.server, Job.state, func.min(Job.registered_at))
                .where(Job.state.in_(_ACTIVE))
                .group_by(Job.server, Job.state)
            )
            return StoreStats(
                jobs={(r[0], r[1]): int(r[2]) for r in jobs},
                deliveries={(r[0], r[1]): int(r[2]) for r in deliveries},
                oldest_active={(r[0], r[1]): r[2] for r in oldest if r[2] is not None},
            )

    # -- hook outbox ----------------------------------------------------------------------

    async def due_deliveries(self, now_s: float, limit: int) -> list[tuple[HookDelivery, Job]]:
        """Pending deliveries whose time has come, oldest first, with their jobs."""
        async with self._session() as session:
            rows = await session.execute(
                select(HookDelivery, Job)
                .join(Job, Job.id == HookDelivery.job_id)
                .where(
                    HookDelivery.state == DeliveryState.PENDING,
                    HookDelivery.next_attempt_at <= utc(now_s),
                )
                .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
                .limit(limit)
            )
            return [(r[0], r[1]) for r in rows]

    async def next_delivery_at(self) -> datetime | None:
        async with self._session() as session:
            return await session.scalar(
                select(func.min(HookDelivery.next_attempt_at)).where(
                    HookDelivery.state == DeliveryState.PENDING
                )
            )

    async def finish_attempt(
        self,
        delivery_id: int,
        *,
        state: str,
        now_s: float,
        next_attempt_s: float | None,
        status_code: int | None,
        error: str | None,
        response: str | None,
    ) -> None:
        """Record one delivery attempt's result."""
        now = utc(now_s)
        async with self._session() as session:
            await session.execute(
                update(HookDelivery)
                .where(HookDelivery.id == delivery_id)
                .values(
                    state=state,
                    attempts=HookDelivery.attempts + 1,
                    next_attempt_at=utc(next_attempt_s) if next_attempt_s is not None else None,
                    last_status_code=status_code,
                    last_error=error,
                    last_response=response,
                    updated_at=now,
                    delivered_at=now if state == DeliveryState.DELIVERED else None,
                )
            )

    async def deliveries(
        self, *, states: Sequence[str] = (), ids: Sequence[int] = (), limit: int | None = None
    ) -> list[tuple[HookDelivery, Job]]:
        query = (
            select(HookDelivery, Job)
            .join(Job, Job.id == HookDelivery.job_id)
            .order_by(HookDelivery.id.desc())
        )
        if states:
            query = query.where(HookDelivery.state.in_(list(states)))
        if ids:
            query = query.where(HookDelivery.id.in_(list(ids)))
        if limit is not None:
            query = query.limit(limit)
        async with self._session() as session:
            return [(r[0], r[1]) for r in await session.execute(query)]

    async def revive_deliveries(self, ids: Sequence[int], *, all_dead: bool, now_s: float) -> int:
        """Make dead deliveries pending again, due now; returns how many."""
        cond = HookDelivery.state == DeliveryState.DEAD
        if not all_dead:
            cond = and_(cond, HookDelivery.id.in_(list(ids)))
        async with self._session() as session:
            result = await session.execute(
                update(HookDelivery)
                .where(cond)
                .values(
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=utc(now_s),
                    updated_at=utc(now_s),
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def pending_delivery_count(self) -> int:
        async with self._session() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(HookDelivery)
                .where(HookDelivery.state == DeliveryState.PENDING)
            )
            return int(count or 0)

    # -- retention ------------------------------------------------------------------------

    async def prune(
        self,
        older_than_s: float,
        *,
        dry_run: bool,
        keep: Collection[tuple[str, str]] = frozenset(),
        batch: int = 500,
    ) -> int:
        """Delete terminal jobs finished before ``older_than_s`` (with outputs and
        deliveries), in small transactions; returns how many (would) go.

        Kept: jobs with pending deliveries, and the (server, prompt_id) pairs in ``keep``:
        jobs still in the configuration, which the next load would register again as new
        (to end as not_found and fire their hooks a second time).
        """
        cutoff = utc(older_than_s)
        pending = select(HookDelivery.job_id).where(HookDelivery.state == DeliveryState.PENDING)
        cond = and_(
            Job.state.not_in(_ACTIVE),
            func.coalesce(Job.detected_at, Job.updated_at) < cutoff,
            Job.id.not_in(pending),
        )
        keep = set(keep)
        total = 0
        after_id = 0
        while True:
            async with self._session() as session:
                rows = (
                    await session.execute(
                        select(Job.id, Job.server, Job.prompt_id)
                        .where(cond, Job.id > after_id)
                        .order_by(Job.id)
                        .limit(batch)
                    )
                ).all()
                if not rows:
                    return total
                after_id = rows[-1].id
                ids = [r.id for r in rows if (r.server, r.prompt_id) not in keep]
                total += len(ids)
                if ids and not dry_run:
                    await session.execute(delete(JobOutput).where(JobOutput.job_id.in_(ids)))
                    await session.execute(delete(HookDelivery).where(HookDelivery.job_id.in_(ids)))
                    await session.execute(delete(Job).where(Job.id.in_(ids)))
            await asyncio.sleep(0)  # let tracking run between batches

    async def next_delivery_at_excluding(self, ids: Sequence[int]) -> datetime | None:
        """The earliest next attempt time of pending deliveries other than ``ids``.

        The hook dispatcher passes the deliveries it is sending right now: they are still
        pending (a row changes only after its attempt), so they would always look due.
        """
        cond = HookDelivery.state == DeliveryState.PENDING
        if ids:
            cond = and_(cond, HookDelivery.id.not_in(list(ids)))
        async with self._session() as session:
            return await session.scalar(select(func.min(HookDelivery.next_attempt_at)).where(cond))


def _job_values(change: Change, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {"state": change.state.value, "updated_at": now}
    if change.queued_at_s is not None:
        values["queued_at"] = utc(change.queued_at_s)
    if change.started_at_s is not None:
        values["started_at"] = utc(change.started_at_s)
    if change.state.terminal:
        values["reason"] = change.reason.value if change.reason else None
        values["detected_at"] = now
        values["finished_at"] = now
    record = change.history
    if record is not None:
        started = utc_ms(record.started_at_ms)
        finished = utc_ms(record.finished_at_ms)
        created = utc_ms(record.created_at_ms)
        if started is not None:
            values["started_at"] = started
        if finished is not None:
            values["finished_at"] = finished
        if created is not None and change.queued_at_s is None:
            values["queued_at"] = created
        if record.number is not None:
            values["number"] = record.number
        values.update(
            status_str=record.status_str,
            completed=record.completed,
            comfy_created_at_ms=record.created_at_ms,
            comfy_started_at_ms=record.started_at_ms,
            comfy_finished_at_ms=record.finished_at_ms,
            history=record.entry,
        )
        if record.error is not None:
            values.update(
                error_node_id=record.error.node_id,
                error_node_type=record.error.node_type,
                error_exception_type=record.error.exception_type,
                error_exception_message=record.error.exception_message,
                error_traceback=record.error.traceback,
            )
    return values


def _output_row(job_id: int, out: OutputRecord) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "node_id": out.node_id,
        "kind": out.kind,
        "position": out.position,
        "filename": out.filename,
        "subfolder": out.subfolder,
        "type": out.type,
        "value": None if out.is_file else out.value,
        "extra": out.extra,
    }


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: What a database call can raise: SQLAlchemy's errors, and what drivers raise unwrapped
#: (asyncpg's connection errors, aiosqlite's encoding and overflow errors).
_DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, ValueError, OverflowError)


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:300]


def _configure_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the driver) open transactions, so "begin" below decides how.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    location = resources.files("comfywatch.migrations")
    cfg.set_main_option("script_location", str(location))
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def retention_cutoff(now_s: float, days: float) -> float:
    return now_s - timedelta(days=days).total_seconds()
