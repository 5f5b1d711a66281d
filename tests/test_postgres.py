"""The store on PostgreSQL (the README promises it): migrations match the models, a tick's
changes record, queries and labels work, the daemon lock holds. Runs against the local
server on 127.0.0.1:5432 in a database of its own; skipped where none answers (never on CI)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from comfywatch.errors import StoreError
from comfywatch.history import parse_history_entry
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, JobFilter, NewJob, Store

from .helpers import only_entry
from .test_migrations import _diff

ADMIN_URL = os.environ.get("COMFYWATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    asyncpg = pytest.importorskip("asyncpg")
    name = f"comfywatch_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(ADMIN_URL.replace("postgresql://", "postgres://"), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no PostgreSQL at {ADMIN_URL}: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_store_round_trip_on_postgresql(pg_url: str) -> None:
    store = Store.open(pg_url)
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        now = time.time()
        jobs = [
            NewJob("local", "p-ok", {"batch": "b1"}, ("notify",), "test"),
            NewJob("local", "p-err", {"batch": "b2"}, (), "test"),
        ]
        assert len(await store.register(jobs, now)) == 2
        ids = {j.prompt_id: j.id for j in await store.active_jobs()}
        ok = parse_history_entry(*only_entry("success_saveimage_history.json"))
        err = parse_history_entry(*only_entry("runtime_error_history.json"))
        changes = [
            Change(ids["p-ok"], JobState.SUCCESS, Reason.FINISHED, ok, deliveries=["notify"]),
            Change(ids["p-err"], JobState.ERROR, Reason.FINISHED, err),
        ]
        assert sorted(await store.record(changes, now + 1)) == sorted(ids.values())
        assert await store.record(changes, now + 2) == []  # terminal states never change

        [rec] = await store.jobs(JobFilter(labels={"batch": "b2"}), with_history=True)
        assert rec.job.state == "error" and rec.job.error_node_type == "SaveImage"
        assert rec.job.history is not None and rec.outputs
        assert await store.pending_delivery_count() == 1
        assert await store.prune(now + 3600, dry_run=True) == 1  # p-err; p-ok owes a hook
    finally:
        await store.close()


async def test_second_daemon_lock_is_refused_on_postgresql(pg_url: str) -> None:
    first, second = Store.open(pg_url), Store.open(pg_url)
    try:
        await first.lock_for_daemon()
        with pytest.raises(StoreError, match="another comfywatch daemon"):
            await second.lock_for_daemon()
        await first.close()
        await second.lock_for_daemon()  # released with the first one's connection
    finally:
        await first.close()
        await second.close()
