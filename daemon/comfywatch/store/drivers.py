"""Database URLs and drivers: the async driver of a configured URL, the SQLite file a URL
names, and the errors a database call can raise (translated into
:class:`~comfywatch.errors.StoreError` by the callers). Imports nothing of SQLAlchemy's
asyncio extension, so that the read-only queries can use it too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

#: What a database call can raise: SQLAlchemy's errors, and what drivers raise unwrapped
#: (asyncpg's connection errors, sqlite3's and aiosqlite's encoding and overflow errors).
DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, ValueError, OverflowError)

#: SQLite result codes (the primary code, the low byte) of faults that pass: the lock,
#: I/O, a full disk, memory, a file that cannot be opened or written just now.
_SQLITE_TRANSIENT = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
#: SQLSTATE classes of PostgreSQL faults that pass: connection exceptions (08), transaction
#: rollbacks such as serialization failures and deadlocks (40), insufficient resources
#: (53), operator intervention such as a shutdown or a cancelled query (57), system
#: errors such as I/O (58). Data (22), integrity (23) and syntax or access (42) errors
#: are comfywatch's bugs, or rows it cannot handle.
_PG_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_PG_TRANSIENT_STATES = frozenset({"55P03"})  # lock_not_available


def is_transient(exc: BaseException, *, connecting: bool = False) -> bool:
    """Whether ``exc`` is a database fault that may pass (the driver, the lock, I/O), so
    that trying again later makes sense; anything else is a bug, or a row comfywatch
    cannot handle, and trying again would only fail again.

    ``connecting``: raised while a connection was being made or its transaction begun,
    where drivers raise the network's own errors (``OSError``, ``TimeoutError``) unwrapped.
    """
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        code = getattr(orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in _SQLITE_TRANSIENT
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if isinstance(state, str) and len(state) == 5:
            return state[:2] in _PG_TRANSIENT_CLASSES or state in _PG_TRANSIENT_STATES
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # a connection that went away; no pooled connection free in time
    # OSError covers ConnectionError, TimeoutError and name look-ups (socket.gaierror).
    return connecting and isinstance(exc, OSError)


def short_error(exc: BaseException) -> str:
    """The first line of a database error (the driver's own message when there is one)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0][:300]


def async_url(url: str) -> str:
    """The async-driver form of a configured SQLAlchemy URL."""
    parsed = make_url(url)
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """A configured URL fit to show: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names (``None``: not SQLite, or an in-memory database)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def missing_database(path: Path) -> str:
    """What to say when the SQLite file a command reads is not there."""
    return f"database {path} does not exist (has the daemon run yet?)"
