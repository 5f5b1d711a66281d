"""The database read without migrations (the command line's queries): newest first through
an index, read-only, and a clear refusal of a database at another schema."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, text

from comfywatch.errors import StoreError
from comfywatch.history import parse_history_entry
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, JobFilter, NewJob, Store
from comfywatch.store.readonly import SCHEMA_HEAD, read, schema_revision
from comfywatch.store.reads import select_deliveries, select_jobs

from .conftest import write_config
from .helpers import comfywatch, only_entry

NOW_S = 1_700_000_000.0


def upgrade_to(conn: Connection, revision: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("comfywatch.migrations")))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    """A database of three jobs registered a minute apart (p0 oldest), p1 a success owing
    ``notify``."""
    url = f"sqlite:///{tmp_path / 'comfywatch.db'}"
    store = Store.open(url)
    try:
        await store.migrate()
        for i in range(3):
            job = NewJob("local", f"p{i}", {"batch": f"b{i % 2}"}, ("notify",), "t")
            await store.register([job], NOW_S + 60 * i)
        [job_id] = [j.id for j in await store.active_jobs() if j.prompt_id == "p1"]
        record = parse_history_entry(*only_entry("success_saveimage_history.json"))
        change = Change(job_id, JobState.SUCCESS, Reason.FINISHED, record, deliveries=["notify"])
        assert await store.record([change], NOW_S + 600) == [job_id]
        yield url
    finally:
        await store.close()


async def test_jobs_newest_first_filtered_with_outputs_and_deliveries(url: str) -> None:
    def prompts(flt: JobFilter) -> list[str]:
        return [r.job.prompt_id for r in read(url, lambda conn: select_jobs(conn, flt))]

    assert prompts(JobFilter()) == ["p2", "p1", "p0"]
    assert prompts(JobFilter(limit=2)) == ["p2", "p1"]
    assert prompts(JobFilter(labels={"batch": "b0"})) == ["p2", "p0"]
    assert prompts(JobFilter(states=[JobState.SUCCESS])) == ["p1"]
    assert prompts(JobFilter(server="elsewhere")) == []
    [shown] = read(
        url, lambda conn: select_jobs(conn, JobFilter(prompt_id="p1"), with_deliveries=True)
    )
    assert shown.job.state is JobState.SUCCESS and shown.job.labels == {"batch": "b1"}
    assert shown.outputs and shown.outputs[0].filename is not None
    [delivery] = shown.deliveries
    assert delivery.state is DeliveryState.PENDING and delivery.hook == "notify"
    [(listed, job)] = read(url, lambda conn: select_deliveries(conn, limit=5))
    assert (listed, job.prompt_id) == (delivery, "p1")


async def test_the_listing_walks_the_newest_first_index(url: str) -> None:
    """``jobs --limit 20`` reads 20 index entries instead of sorting every job."""

    def plan(conn: Connection) -> str:
        query = "EXPLAIN QUERY PLAN SELECT id FROM jobs ORDER BY registered_at DESC, id DESC"
        return " ".join(str(row[-1]) for row in conn.execute(text(query + " LIMIT 20")))

    detail = read(url, plan)
    assert "ix_jobs_registered_at_id" in detail and "TEMP B-TREE" not in detail


async def test_reads_cannot_write(url: str) -> None:
    def write(conn: Connection) -> None:
        conn.execute(text("DELETE FROM job_outputs"))

    with pytest.raises(StoreError, match="readonly"):
        read(url, write)
    assert read(url, lambda conn: select_jobs(conn, JobFilter(prompt_id="p1")))[0].outputs


async def test_missing_file_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    with pytest.raises(StoreError, match="does not exist"):
        read(f"sqlite:///{path}", schema_revision)
    assert not path.exists()


async def test_another_schema_is_refused_with_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "comfywatch.db"
    store = Store.open(f"sqlite:///{db}")
    try:
        with pytest.raises(StoreError, match=r"at nothing, .* run `comfywatch migrate`"):
            read(f"sqlite:///{db}", schema_revision)
        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade_to, "0001")
        with pytest.raises(StoreError, match=f"at 0001, this version needs {SCHEMA_HEAD}"):
            read(f"sqlite:///{db}", schema_revision)
        assert read(f"sqlite:///{db}", schema_revision, check_schema=False) == "0001"
    finally:
        await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match=r"9999.*newer comfywatch; upgrade comfywatch"):
        read(f"sqlite:///{db}", schema_revision)


async def test_query_commands_never_migrate(tmp_path: Path) -> None:
    """On a database at an older schema the queries, prune and retry exit 69 saying what to
    do, and leave it as it was; ``migrate`` brings it to this version's."""
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    db = tmp_path / "comfywatch.db"
    store = Store.open(f"sqlite:///{db}")
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade_to, "0001")
    finally:
        await store.close()
    for args in (
        ["jobs"],
        ["show", "p1"],
        ["watch"],
        ["hooks", "--json"],
        ["hooks", "retry", "--all-dead"],
        ["prune", "--older-than", "1d"],
        ["prune", "--older-than", "1d", "--dry-run"],
    ):
        code, out, err = await comfywatch(*args, "--config", str(config))
        assert (code, out) == (69, ""), args
        assert "schema is at 0001" in err and "comfywatch migrate" in err, args
    code, _, err = await comfywatch("healthcheck", "--config", str(config))
    assert code == 1 and f"database schema at 0001, expected {SCHEMA_HEAD}" in err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    code, out, err = await comfywatch("migrate", "--config", str(config))
    assert code == 0 and f"0001 -> {SCHEMA_HEAD}" in out, err
    code, out, err = await comfywatch("jobs", "--json", "--config", str(config))
    assert (code, out.strip()) == (0, "[]"), err
