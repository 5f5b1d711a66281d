"""The database opened for reading only, without Alembic and without migrations: what the
command line's queries use, so that they start fast and never change a database.

A SQLite file is opened read-only (``mode=ro``) with the standard library's driver, in one
deferred transaction (a running daemon keeps writing); other databases through their async
driver, in a read-only transaction. Either way a query is a plain function of a
synchronous ``Connection`` (see :mod:`comfywatch.store.reads`). The schema must be the one
this version ships, read from Alembic's ``alembic_version`` table; otherwise
:class:`~comfywatch.errors.StoreError` says what to do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from comfywatch.errors import StoreError
from comfywatch.store.drivers import (
    DB_ERRORS,
    async_url,
    is_sqlite,
    missing_database,
    short_error,
    sqlite_path,
)

T = TypeVar("T")

#: The migrations this version ships, oldest first (``migrations/versions``; a test checks
#: them against Alembic's), known here without importing Alembic.
SCHEMA_REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004")
SCHEMA_HEAD = SCHEMA_REVISIONS[-1]
BUSY_TIMEOUT_S = 5.0


def schema_revision(conn: Connection) -> str | None:
    """The migration the database is at (``None``: no schema yet), read without Alembic."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    versions = sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return ",".join(versions) or None


def require_schema_head(current: str | None) -> None:
    """Raise :class:`StoreError` saying what to do unless ``current`` is :data:`SCHEMA_HEAD`."""
    if current == SCHEMA_HEAD:
        return
    if current is None or current in SCHEMA_REVISIONS:
        raise StoreError(
            f"database schema is at {current or 'nothing'}, this version needs {SCHEMA_HEAD}: "
            "run `comfywatch migrate` (or start the daemon)"
        )
    raise StoreError(
        f"database schema is at {current}, which this version does not know (it needs "
        f"{SCHEMA_HEAD}): the database was migrated by a newer comfywatch; upgrade comfywatch"
    )


def require_known_schema(current: str | None) -> None:
    """Raise :class:`StoreError` if the database is at a revision this version does not
    know: a newer comfywatch migrated it, and this older one must not run on it (upgrade
    every replica first, then restart them one by one)."""
    if current is None or current in SCHEMA_REVISIONS:
        return
    raise StoreError(
        f"database schema is at {current}, which this version does not know (it knows "
        f"{', '.join(SCHEMA_REVISIONS)}): the database was migrated by a newer comfywatch; "
        "upgrade this comfywatch before starting it"
    )


def read(url: str, query: Callable[[Connection], T], *, check_schema: bool = True) -> T:
    """Run ``query`` in one read-only transaction on the database at ``url``.

    With ``check_schema`` (the default) the database must be at :data:`SCHEMA_HEAD`. A
    SQLite file that does not exist is a :class:`StoreError`, and is not created.
    """

    def checked(conn: Connection) -> T:
        if check_schema:
            require_schema_head(schema_revision(conn))
        return query(conn)

    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise StoreError(missing_database(path))
        run = _read_sqlite
    else:
        run = _read_async
    try:
        return run(url, checked)
    except DB_ERRORS as exc:
        raise StoreError(f"database error: {short_error(exc)}") from None


def read_unless_new(url: str, query: Callable[[Connection], T], new: T) -> T:
    """:func:`read`, except that a database no daemon has created or migrated yet (a SQLite
    file not there, a PostgreSQL database without the schema) gives ``new``. A SQLite file
    that is there without the schema is not one a daemon made: an error, as with read."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None and not path.exists():
            return new
        return read(url, query)

    def unless_new(conn: Connection) -> T:
        current = schema_revision(conn)
        if current is None:
            return new
        require_schema_head(current)
        return query(conn)

    return read(url, unless_new, check_schema=False)


def _read_sqlite(url: str, query: Callable[[Connection], T]) -> T:
    path = sqlite_path(url)

    def connect() -> sqlite3.Connection:
        # isolation_level=None: SQLAlchemy, not the driver, opens the one transaction.
        target = f"file:{quote(str(path))}?mode=ro" if path is not None else ":memory:"
        return sqlite3.connect(target, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)

    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=NullPool)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    try:
        with engine.connect() as conn, conn.begin():
            return query(conn)
    finally:
        engine.dispose()


def _read_async(url: str, query: Callable[[Connection], T]) -> T:
    """``query`` through the async driver (PostgreSQL: asyncpg), in a read-only transaction."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    try:
        engine = create_async_engine(async_url(url))
    except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
        raise StoreError(f"cannot open database: {short_error(exc)}") from None

    async def run() -> T:
        try:
            async with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    await conn.execution_options(postgresql_readonly=True)
                async with conn.begin():
                    return await conn.run_sync(query)
        finally:
            await engine.dispose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    # Called from a coroutine (a test, an embedding program): the read gets an event loop
    # of its own on a thread, and the caller blocks as it does on SQLite.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(run())).result()
