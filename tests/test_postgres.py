"""The store on PostgreSQL (the README promises it): migrations match the models, a tick's
changes record, queries and labels work, the daemon lock holds. Runs against the local
server on 127.0.0.1:5432 in a database of its own; skipped where none answers (never on CI)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, text

from comfywatch.errors import LockLost, StoreError
from comfywatch.history import parse_history_entry
from comfywatch.hooks import HookDispatcher
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, FinishedAttempt, JobFilter, NewJob, Store
from comfywatch.store.readonly import read, schema_revision

from .conftest import admin_connect, write_config
from .helpers import comfywatch, only_entry
from .receiver import Receiver
from .test_hooks import webhook
from .test_migrations import _diff

T = TypeVar("T")


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


async def test_queries_read_postgresql_read_only(pg_url: str, tmp_path: Path) -> None:
    """The command line's queries: asyncpg in a read-only transaction, no migration."""
    with pytest.raises(StoreError, match="schema is at nothing"):
        await asyncio.to_thread(read, pg_url, schema_revision)
    store = Store.open(pg_url)
    try:
        await store.migrate()
        await store.register([NewJob("local", "p1", {"batch": "b1"}, (), "test")], time.time())
    finally:
        await store.close()

    def write(conn: Connection) -> None:
        conn.execute(text("DELETE FROM jobs"))

    with pytest.raises(StoreError, match="read-only transaction"):
        await asyncio.to_thread(read, pg_url, write)
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, daemon={"database": pg_url})
    code, out, err = await comfywatch(
        "jobs", "--json", "--label", "batch=b1", "--config", str(config)
    )
    assert code == 0, err
    assert [(j["prompt_id"], j["state"]) for j in json.loads(out)] == [("p1", "registered")]


async def test_hooks_in_batches_on_postgresql(pg_url: str) -> None:
    """A bulk record past one chunk (terminal jobs left alone), deliveries claimed in
    batches smaller than the outbox and each sent once, an attempt recorded twice counted
    once."""
    store = Store.open(pg_url)
    receiver = Receiver()
    await receiver.start()
    dispatcher = HookDispatcher(
        store=store, hooks=webhook(receiver.url), concurrency=3, claim_size=7
    )
    try:
        await store.migrate()
        now = time.time()
        await store.register(
            [NewJob("local", f"p{n}", {}, ("notify",), "t") for n in range(600)], now
        )
        ids = sorted(j.id for j in await store.active_jobs())
        done = [Change(i, JobState.SUCCESS, Reason.FINISHED, deliveries=["notify"]) for i in ids]
        assert await store.record(done[:30], now) == ids[:30]
        assert await store.record([Change(i, JobState.QUEUED) for i in ids], now) == ids[30:]
        assert len(await store.jobs(JobFilter(states=[JobState.SUCCESS]))) == 30

        assert await dispatcher.run_once() == 30
        rows = [d for d, _ in await store.deliveries()]
        assert {(d.state, d.attempts) for d in rows} == {(DeliveryState.DELIVERED, 1)}
        assert sorted(h["webhook-id"] for h, _ in receiver.requests) == sorted(
            d.event_id for d in rows
        )
        again = FinishedAttempt(rows[0].id, 1, DeliveryState.DEAD, now, None, 500, "x", None)
        await store.record_attempts([again])
        [(row, _)] = [r for r in await store.deliveries() if r.delivery.id == rows[0].id]
        assert (row.state, row.attempts) == (DeliveryState.DELIVERED, 1)
    finally:
        await dispatcher.close()
        await receiver.stop()
        await store.close()


async def lock_holder(pg_url: str) -> tuple[int, str]:
    """The backend pid holding the daemon's advisory lock in ``pg_url``'s database, and
    that backend's state."""
    name = pg_url.rsplit("/", 1)[1]
    admin = await admin_connect()
    try:
        row = await admin.fetchrow(
            "SELECT l.pid, a.state FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = $1)",
            name,
        )
    finally:
        await admin.close()
    assert row is not None, "nobody holds the lock"
    return int(row["pid"]), str(row["state"])


async def terminate(pid: int) -> None:
    admin = await admin_connect()
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_the_daemon_lock_has_its_own_connection_whose_loss_is_noticed(
    pg_url: str,
) -> None:
    """The advisory lock lives on a connection outside the pool, idle (no transaction left
    open). A pooled connection terminated by the server is replaced, and the lock stays;
    the lock's connection terminated is the lock lost: the callback fires and
    ``check_daemon_lock`` raises LockLost."""
    store = Store.open(pg_url)
    lost = asyncio.Event()
    try:
        await store.migrate()
        await store.lock_for_daemon(on_lost=lost.set)
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        pid, state = await lock_holder(pg_url)
        assert state == "idle"
        await store.check_daemon_lock()

        async with store.engine.connect() as conn:
            pooled = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert pooled != pid
        await terminate(int(pooled))
        assert await store.pending_delivery_count() == 0  # the pool replaced it
        assert not lost.is_set()

        await terminate(pid)
        async with asyncio.timeout(30):
            await lost.wait()
        with pytest.raises(LockLost, match="lost the lock"):
            await store.check_daemon_lock()
    finally:
        await store.close()


async def test_a_daemon_whose_lock_is_terminated_stops(pg_url: str, tmp_path: Path) -> None:
    """``comfywatch run`` on PostgreSQL: the lock's backend is terminated from another
    connection (pg_terminate_backend); the daemon says so in one log line and exits 69,
    for its restart policy to start it again (and take the lock again, if it is free)."""
    from .daemon_proc import DaemonProcess

    config = write_config(
        tmp_path,
        {"local": "http://127.0.0.1:9"},
        daemon={"database": pg_url, "poll_interval_s": 3600},
    )
    proc = await DaemonProcess.start(config)
    try:
        await proc.wait_event("daemon_started")
        pid, _ = await lock_holder(pg_url)
        await terminate(pid)
        code = await proc.wait()
    finally:
        await proc.close()
    assert code == 69, proc.describe()
    [lost] = proc.named("database_lock_lost")
    assert lost["level"] == "error" and "lost the lock" in lost["error"]
    assert "lost the lock" in proc.stderr
    assert proc.named("daemon_stopped")


async def test_prefix_and_live_reads_on_postgresql(pg_url: str) -> None:
    """``show``'s prefix match (whatever the database's collation), and what ``watch``
    reads, through the command line's read-only path."""
    from comfywatch.store.reads import count_jobs, select_jobs_by_prefix, select_live

    store = Store.open(pg_url)
    try:
        await store.migrate()
        now = time.time()
        ids = ["ab-1", "ab-2", "AB-3", "a%b", "zé-1", "zf"]
        jobs = [NewJob("local", p, {}, (), "/srv/f.toml") for p in ids]
        await store.register(jobs, now)
        by_id = {j.prompt_id: j.id for j in await store.active_jobs()}
        await store.record(
            [
                Change(by_id["ab-1"], JobState.RUNNING, started_at_s=now + 1),
                Change(by_id["zf"], JobState.SUCCESS, Reason.FINISHED),
            ],
            now + 2,
        )
    finally:
        await store.close()

    async def query(fn: Callable[[Connection], T]) -> T:
        return await asyncio.to_thread(read, pg_url, fn)  # read() runs its own loop

    async def found(prefix: str) -> tuple[list[str], list[str]]:
        match = await query(lambda conn: select_jobs_by_prefix(conn, prefix))
        return [r.job.prompt_id for r in match.jobs], match.candidates

    assert await found("ab") == ([], ["ab-1", "ab-2"])
    assert await found("ab-2") == (["ab-2"], [])
    assert await found("AB") == (["AB-3"], [])
    assert await found("a%") == (["a%b"], [])
    assert await found("zé") == (["zé-1"], [])
    assert await found("x") == ([], [])
    [running] = await query(lambda conn: select_live(conn, [JobState.RUNNING], limit=5))
    assert running.prompt_id == "ab-1" and running.progress_max is None
    [done] = await query(lambda c: select_live(c, [JobState.SUCCESS], limit=5, recent=True))
    assert done.prompt_id == "zf" and done.source == "/srv/f.toml"
    counts = await query(lambda conn: count_jobs(conn, [JobState.RUNNING, JobState.REGISTERED]))
    assert counts == {("local", JobState.RUNNING): 1, ("local", JobState.REGISTERED): 4}


async def fill(url: str, now: float) -> None:
    """The same jobs, outputs, deliveries and attempts, at the same times."""
    store = Store.open(url)
    try:
        await store.migrate()
        jobs = [
            NewJob("local", "p-ok", {"batch": "b1", "n": "1"}, ("notify",), "test"),
            NewJob("local", "p-err", {"batch": "b2"}, (), "test"),
            NewJob("local", "p-open", {}, (), "test"),
        ]
        await store.register(jobs, now)
        ids = {j.prompt_id: j.id for j in await store.active_jobs()}
        ok = parse_history_entry(*only_entry("success_saveimage_history.json"))
        err = parse_history_entry(*only_entry("runtime_error_history.json"))
        await store.record(
            [
                Change(ids["p-ok"], JobState.SUCCESS, Reason.FINISHED, ok, deliveries=["notify"]),
                Change(ids["p-err"], JobState.ERROR, Reason.FINISHED, err),
                Change(ids["p-open"], JobState.QUEUED),
            ],
            now + 1.25,
        )
        [(delivery, _)] = await store.deliveries()
        attempt = FinishedAttempt(
            delivery.id, 1, DeliveryState.PENDING, now + 2.5, now + 12.5, 500, "HTTP 500", "busy"
        )
        await store.record_attempts([attempt])
    finally:
        await store.close()


def same(printed: Any) -> Any:
    """``printed`` with each delivery's event id (random, made when it is written) masked."""
    if isinstance(printed, list):
        return [same(item) for item in printed]
    if isinstance(printed, dict):
        return {k: "*" if k == "event_id" else same(v) for k, v in printed.items()}
    return printed


async def test_the_commands_print_the_same_json_on_both_backends(
    pg_url: str, tmp_path: Path
) -> None:
    """The same data in a SQLite file and in PostgreSQL: jobs, show and hooks print the
    same JSON (times, labels, outputs, errors, deliveries), event ids apart."""
    now = 1_767_225_600.5
    outputs = {}
    for name, url in (("sqlite", f"sqlite:///{tmp_path / 'same.db'}"), ("postgresql", pg_url)):
        await fill(url, now)
        folder = tmp_path / name
        folder.mkdir()
        config = str(
            write_config(folder, {"local": "http://127.0.0.1:9"}, daemon={"database": url})
        )
        printed = []
        for args in (
            ("jobs", "--json"),
            ("jobs", "--json", "--label", "batch=b1"),
            ("show", "p-ok", "--json"),
            ("show", "p-err", "--json"),
            ("hooks", "--json"),
        ):
            code, out, err = await comfywatch(*args, "--config", config)
            assert code == 0, (args, err)
            printed.append(json.loads(out))
        outputs[name] = printed
    assert same(outputs["sqlite"]) == same(outputs["postgresql"])
    assert outputs["sqlite"][0] and outputs["sqlite"][4]  # something was compared
