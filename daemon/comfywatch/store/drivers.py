"""Database URLs and drivers: the async driver of a configured URL, the SQLite file a URL
names, and the errors a database call can raise (translated into
:class:`~comfywatch.errors.StoreError` by the callers). Imports nothing of SQLAlchemy's
asyncio extension, so that the read-only queries can use it too.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

#: What a database call can raise: SQLAlchemy's errors, and what drivers raise unwrapped
#: (asyncpg's connection errors, sqlite3's and aiosqlite's encoding and overflow errors).
DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, ValueError, OverflowError)


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
