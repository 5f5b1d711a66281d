"""Migrations at head build exactly the schema the models describe."""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from comfywatch.store import Store
from comfywatch.store.models import Base
from comfywatch.store.readonly import SCHEMA_REVISIONS


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_upgrade_on_empty_database_matches_models(backend: str) -> None:
    """On each backend (a SQLite file, a fresh PostgreSQL database)."""
    store = Store.open(backend)
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {"jobs", "job_outputs", "hook_deliveries"} <= tables
        current, head = await store.schema_revision()
        assert current == head
        await store.migrate()  # idempotent
    finally:
        await store.close()


async def test_database_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db.sqlite"
    old = os.umask(0)
    try:
        store = Store.open(f"sqlite:///{path}")
    finally:
        os.umask(old)
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
        assert mode == "wal"
    finally:
        await store.close()
    perms = stat.S_IMODE(path.stat().st_mode)
    assert perms & 0o007 == 0, oct(perms)  # nothing for other users
    assert perms & 0o020 == 0, oct(perms)  # group may read, not write


def test_revisions_known_without_alembic_are_alembics() -> None:
    """The queries check the schema without Alembic: their list of revisions must be the
    shipped migrations, oldest first (add a new migration's revision to it)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("comfywatch.migrations")))
    shipped = [script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()]
    assert tuple(reversed(shipped)) == SCHEMA_REVISIONS
