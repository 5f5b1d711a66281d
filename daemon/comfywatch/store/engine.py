"""The database connection: engine set-up, transactions, the one-daemon lock, schema.

SQLite is opened in WAL mode (``sqlite3`` can read while the daemon writes) with a busy
timeout, and write transactions start with ``BEGIN IMMEDIATE`` so that a competing writer
delays us at the start of a transaction rather than failing it half-way. SQLAlchemy and
driver errors are translated into :class:`~comfywatch.errors.StoreError` here.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Connection, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from comfywatch.errors import StoreError
from comfywatch.store.drivers import (
    DB_ERRORS,
    async_url,
    missing_database,
    short_error,
    sqlite_path,
)
from comfywatch.store.readonly import require_schema_head, schema_revision

BUSY_TIMEOUT_MS = 5_000
DB_FILE_MODE = 0o640
DB_DIR_MODE = 0o750

#: Execution option of a transaction that only reads: SQLite begins it deferred.
_READ_ONLY = "comfywatch_read_only"


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
        self._lock_conn: AsyncConnection | None = None

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

    async def lock_for_daemon(self) -> None:
        """Make sure no other daemon uses this database (two would send every hook twice):
        an exclusive ``flock`` beside a SQLite file, an advisory lock on PostgreSQL. Held
        until :meth:`close` (or the process ends, however it ends)."""
        if self._path is not None:
            self._lock_fd = _flock_beside(self._path)
        elif self.engine.dialect.name == "postgresql":
            self._lock_conn = await self._advisory_lock()

    async def _advisory_lock(self) -> AsyncConnection:
        try:
            conn = await self.engine.connect()
            got = await conn.scalar(text("SELECT pg_try_advisory_lock(hashtext('comfywatch'))"))
        except DB_ERRORS as exc:
            raise StoreError(f"database error: {short_error(exc)}") from None
        if not got:
            await conn.close()
            raise StoreError("another comfywatch daemon is using this database")
        return conn

    async def close(self) -> None:
        if self._lock_conn is not None:
            await self._lock_conn.close()
            self._lock_conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.engine.dispose()

    @asynccontextmanager
    async def _session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on any error.

        A ``read_only`` transaction (it must write nothing) starts deferred on SQLite: it
        neither waits for the write lock nor holds it, and reads the last commit (WAL).
        """
        try:
            async with self._sessions() as session, session.begin():
                if read_only:
                    await session.connection(execution_options={_READ_ONLY: True})
                yield session
        except DB_ERRORS as exc:
            raise StoreError(f"database error: {short_error(exc)}") from None

    async def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent)."""
        from comfywatch.store import schema  # Alembic: only where migrations run

        try:
            async with self.engine.begin() as conn:
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
