"""The database connection: engine set-up, transactions, the one-daemon lock, schema.

SQLite is opened in WAL mode (``sqlite3`` can read while the daemon writes) with a busy
timeout, and write transactions start with ``BEGIN IMMEDIATE`` so that a competing writer
delays us at the start of a transaction rather than failing it half-way. Transactions that
only read begin deferred: they never wait for the write lock, nor hold it.

Faults that pass (the driver's, the lock's, I/O: see
:func:`~comfywatch.store.drivers.is_transient`) are translated into
:class:`~comfywatch.errors.StoreError` here, and the callers try again later. Anything
else raised in a transaction (a bug, a row comfywatch cannot handle) goes up as it is.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import structlog
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from comfywatch.errors import LockLost, StoreError
from comfywatch.store.drivers import (
    DB_ERRORS,
    async_url,
    is_transient,
    missing_database,
    short_error,
    sqlite_path,
)
from comfywatch.store.readonly import require_known_schema, require_schema_head, schema_revision

BUSY_TIMEOUT_MS = 5_000
DB_FILE_MODE = 0o640
DB_DIR_MODE = 0o750

#: How often, at most, :meth:`Database.check_daemon_lock` asks PostgreSQL whether the
#: lock's connection is still there, and how long it waits for the answer.
LOCK_CHECK_EVERY_S = 1.0
LOCK_CHECK_TIMEOUT_S = 10.0

#: The advisory lock (a bigint key of its own) held while migrating on PostgreSQL.
MIGRATE_LOCK_KEY = 0x636F6D66795F6D67  # "comfy_mg"

#: Execution option of a transaction that only reads: SQLite begins it deferred.
_READ_ONLY = "comfywatch_read_only"

log = structlog.get_logger("comfywatch.store")


class Database:
    """An engine, its transactions and its lock; the query mixins of ``Store`` build on it."""

    def __init__(self, engine: AsyncEngine, *, path: Path | None = None) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite: the file the engine works on. Open connections keep a deleted or replaced
        # file alive, so only a look at the path tells that it is no longer the database.
        self._path = path
        self._file_id = _file_id(path) if path is not None else None
        self._lock_fd: int | None = None
        # PostgreSQL: the advisory lock's own connection (an engine without a pool), and
        # why it was lost, if it was.
        self._lock_engine: AsyncEngine | None = None
        self._lock_conn: AsyncConnection | None = None
        self._lock_lost: str | None = None
        self._lock_checked_at = 0.0  # monotonic
        #: Whether this process holds the one-daemon lock: no other dispatcher can hold a
        #: hook delivery then, and claims other than its own are stale.
        self.sole_daemon = False

    @classmethod
    def open(cls, url: str, *, create: bool = True, readonly: bool = False) -> Self:
        """An engine for ``url``; SQLite files are created private (0640) when ``create``.

        ``readonly`` stores (the CLI's queries) open deferred transactions, so they never
        take the write lock away from a running daemon.
        """
        path = sqlite_path(url)
        if path is not None:
            if create:
                try:
                    _create_private_file(path)
                except OSError as exc:
                    raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
            elif not path.exists():
                raise StoreError(missing_database(path))
        try:
            engine = create_async_engine(async_url(url), pool_pre_ping=path is None)
        except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open database: {short_error(exc)}") from None
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine, immediate=not readonly)
        return cls(engine, path=path)

    async def lock_for_daemon(self, *, on_lost: Callable[[], None] | None = None) -> None:
        """Make sure no other daemon uses this database (two would send every hook twice):
        an exclusive ``flock`` beside a SQLite file, an advisory lock on PostgreSQL. Held
        until :meth:`close` (or the process ends, however it ends).

        PostgreSQL's lock lives as long as its session: it has a connection of its own,
        outside the pool. ``on_lost`` is called when that connection ends (the server
        terminated it, the network dropped it); :meth:`check_daemon_lock` then raises.
        """
        if self._path is not None:
            self._lock_fd = _flock_beside(self._path)
            self.sole_daemon = True
        elif self.engine.dialect.name == "postgresql":
            await self._advisory_lock(on_lost)
            self.sole_daemon = True

    async def _advisory_lock(self, on_lost: Callable[[], None] | None) -> None:
        engine = create_async_engine(self.engine.url, poolclass=NullPool)
        try:
            conn = await engine.connect()
        except DB_ERRORS as exc:
            await engine.dispose()
            raise StoreError(f"database error: {short_error(exc)}") from None
        try:
            # Autocommit: the lock belongs to the session, and no transaction stays open.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = await conn.scalar(text("SELECT pg_try_advisory_lock(hashtext('comfywatch'))"))
            if got:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                add_listener = getattr(driver, "add_termination_listener", None)
                if add_listener is not None:  # asyncpg
                    add_listener(lambda _conn: self._lost_lock("its connection ended", on_lost))
        except DB_ERRORS as exc:
            await conn.close()
            await engine.dispose()
            raise StoreError(f"database error: {short_error(exc)}") from None
        if not got:
            await conn.close()
            await engine.dispose()
            raise StoreError("another comfywatch daemon is using this database")
        self._lock_engine, self._lock_conn = engine, conn

    def _lost_lock(self, why: str, on_lost: Callable[[], None] | None = None) -> None:
        if self._lock_conn is None or self._lock_lost is not None:
            return  # closed on purpose, or already known
        self._lock_lost = why
        if on_lost is not None:
            on_lost()

    async def check_daemon_lock(self) -> None:
        """Raise :class:`LockLost` if the one-daemon lock is gone. On PostgreSQL, asks the
        lock's connection for a sign of life, at most every ``LOCK_CHECK_EVERY_S``."""
        if self._lock_conn is not None and self._lock_lost is None:
            now = time.monotonic()
            if now - self._lock_checked_at >= LOCK_CHECK_EVERY_S:
                self._lock_checked_at = now
                try:
                    async with asyncio.timeout(LOCK_CHECK_TIMEOUT_S):
                        await self._lock_conn.exec_driver_sql("SELECT 1")
                except (*DB_ERRORS, TimeoutError) as exc:
                    self._lost_lock(f"its connection failed: {short_error(exc)}")
        if self._lock_lost is not None:
            raise LockLost(
                f"lost the lock that keeps a second daemon off this database ({self._lock_lost})"
            )

    async def close(self) -> None:
        conn, engine = self._lock_conn, self._lock_engine
        self._lock_conn = self._lock_engine = None
        self.sole_daemon = False
        if conn is not None:
            try:
                await conn.close()
            except DB_ERRORS as exc:  # the connection was lost already
                log.debug("lock_connection_close_failed", error=short_error(exc))
        if engine is not None:
            await engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.engine.dispose()

    @asynccontextmanager
    async def _session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on any error.

        A ``read_only`` transaction (it must write nothing) starts deferred on SQLite: it
        neither waits for the write lock nor holds it, and reads the last commit (WAL).
        Every transaction that only reads is one.

        Faults that pass become :class:`StoreError`; anything else (a bug, a row that
        cannot be read) is raised as it is, so that it is not tried again forever.
        """
        connecting = True
        try:
            async with self._sessions() as session, session.begin():
                # Connect and begin now (BEGIN IMMEDIATE waits for the write lock here):
                # drivers raise network errors unwrapped, and only while connecting.
                await session.connection(
                    execution_options={_READ_ONLY: True} if read_only else None
                )
                connecting = False
                yield session
        except Exception as exc:
            if is_transient(exc, connecting=connecting):
                raise StoreError(f"database error: {short_error(exc)}") from None
            raise

    async def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent)."""
        from comfywatch.store import schema  # Alembic: only where migrations run

        try:
            async with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Replicas starting together: one migrates, the others wait for it and
                    # then find nothing to do. Released when this transaction ends.
                    await conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATE_LOCK_KEY})"))
                require_known_schema(await conn.run_sync(schema_revision))
                await conn.run_sync(schema.upgrade)
        except schema.MigrationError as exc:
            # e.g. the database was migrated by a newer comfywatch
            raise StoreError(f"migration failed: {exc}") from None
        except DB_ERRORS as exc:
            raise StoreError(f"migration failed: {short_error(exc)}") from None

    async def schema_revision(self) -> tuple[str | None, str]:
        """The database's migration revision and the newest one this version ships."""
        from comfywatch.store import schema

        head = schema.head()
        self._check_file()
        try:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{_READ_ONLY: True})
                current = await conn.run_sync(schema.current)
        except DB_ERRORS as exc:
            raise StoreError(f"database error: {short_error(exc)}") from None
        return current, head

    async def check_schema(self) -> None:
        """Raise :class:`StoreError` unless the database is at the schema this version
        ships; never migrates (for the commands that must leave the schema alone)."""
        self._check_file()
        try:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{_READ_ONLY: True})
                current = await conn.run_sync(schema_revision)
        except DB_ERRORS as exc:
            raise StoreError(f"database error: {short_error(exc)}") from None
        require_schema_head(current)

    def _check_file(self) -> None:
        """Raise StoreError if the SQLite file at the configured path is gone or replaced."""
        if self._path is None or self._file_id is None:
            return
        current = _file_id(self._path)
        if current is None:
            raise StoreError(f"database file {self._path} is gone")
        if current != self._file_id:
            raise StoreError(f"database file {self._path} was replaced while open")


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


def _flock_beside(path: Path) -> int:
    """An exclusive ``flock`` on ``<database>.lock``; its open descriptor holds it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, DB_FILE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"another comfywatch daemon is using {path} (it holds {lock_path})"
        ) from None
    return fd


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
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate and not read_only else "BEGIN")
