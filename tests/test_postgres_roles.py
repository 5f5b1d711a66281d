"""The README's PostgreSQL roles, for real: its SQL run as written (with fresh names) against
the local server; the daemon's role migrates and runs, the dashboard role reads and cannot
write. Skipped where no PostgreSQL answers (never on CI)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import make_url

from comfywatch.config import load_settings
from comfywatch.service import Daemon
from comfywatch.store import Store
from comfywatch.testing import FakeComfyUI

from .conftest import ADMIN_URL, admin_connect, write_config
from .helpers import comfywatch

README = Path(__file__).parent.parent / "README.md"


def readme_sql() -> list[str]:
    """The ```sql blocks of the README's "PostgreSQL roles" section, in order."""
    text = README.read_text()
    section = text.split("### PostgreSQL roles", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)


def statements(block: str, name: str) -> list[str]:
    """``block``'s statements one by one (CREATE DATABASE cannot share a query string),
    with ``comfywatch`` (role, database and schema) renamed ``name``."""
    block = block.replace("comfywatch_dashboard", f"{name}_dashboard")
    block = re.sub(r"\bcomfywatch\b", name, block)
    return [s.strip() for s in block.split(";") if s.strip()]


@dataclass
class Roles:
    name: str
    daemon_url: str
    dashboard_url: str


def role_url(name: str, password: str, database: str) -> str:
    url = make_url(ADMIN_URL).set(
        drivername="postgresql+asyncpg", username=name, password=password, database=database
    )
    return url.render_as_string(hide_password=False)


@pytest.fixture
async def roles() -> AsyncIterator[Roles]:
    """The README's SQL run by a superuser, with a fresh name for role, database and
    schema; all of it dropped afterwards."""
    import asyncpg

    name = f"cwroles_{uuid.uuid4().hex[:10]}"
    server_wide, in_database = readme_sql()
    admin = await admin_connect()
    try:
        for statement in statements(server_wide, name):
            await admin.execute(statement)
        inside = await asyncpg.connect(
            make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
        try:
            for statement in statements(in_database, name):
                await inside.execute(statement)
        finally:
            await inside.close()
        yield Roles(
            name,
            role_url(name, "change-me", name),
            role_url(f"{name}_dashboard", "change-me-too", name),
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{name}_dashboard"')
        await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


async def connect_as(url: str) -> object:
    import asyncpg

    return await asyncpg.connect(url.replace("+asyncpg", "", 1), timeout=10)


async def test_the_readme_roles_run_the_daemon_and_a_read_only_dashboard(
    roles: Roles, tmp_path: Path, fake: FakeComfyUI
) -> None:
    import asyncpg

    pid = fake.submit()
    await fake.wait_finished(pid)
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid, "labels": {"batch": "b1"}}],
        daemon={"database": roles.daemon_url},
    )
    settings = load_settings(config)
    store = Store.open(settings.daemon.database_url)
    try:
        assert await asyncio.wait_for(Daemon(settings, store=store).run(until_done=True), 60) == 0
    finally:
        await store.close()

    daemon = await connect_as(roles.daemon_url)
    try:
        tables = {
            (r["table_schema"], r["table_name"])
            for r in await daemon.fetch(  # type: ignore[attr-defined]
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
        }
    finally:
        await daemon.close()  # type: ignore[attr-defined]
    assert {(roles.name, "jobs"), (roles.name, "alembic_version")} <= tables
    assert {schema for schema, _ in tables} == {roles.name}  # nothing in public

    dashboard = await connect_as(roles.dashboard_url)
    try:
        rows = await dashboard.fetch("SELECT prompt_id, state FROM jobs")  # type: ignore[attr-defined]
        assert [tuple(r) for r in rows] == [(pid, "success")]
        assert await dashboard.fetchval("SELECT count(*) FROM hook_deliveries") == 0  # type: ignore[attr-defined]
        for write in (
            "INSERT INTO jobs (server, prompt_id) VALUES ('local', 'x')",
            "UPDATE jobs SET state = 'lost'",
            "DELETE FROM jobs",
            "CREATE TABLE mine (id int)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await dashboard.execute(write)  # type: ignore[attr-defined]
    finally:
        await dashboard.close()  # type: ignore[attr-defined]

    # The query commands, with a config naming the dashboard role.
    read_config = write_config(
        tmp_path, {"local": fake.url}, daemon={"database": roles.dashboard_url}
    )
    code, out, err = await comfywatch("jobs", "--json", "--config", str(read_config))
    assert code == 0, err
    assert [(j["prompt_id"], j["state"]) for j in json.loads(out)] == [(pid, "success")]
