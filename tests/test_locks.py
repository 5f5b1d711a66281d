"""Reads never take the write lock: while another process holds it (``sqlite3`` with
``BEGIN IMMEDIATE``), everything that only reads answers (the store's queries, the gauges,
``/readyz``, the command line's queries), and only writes wait and are tried again. A burst
of deliveries whose results cannot be recorded meanwhile is sent once, not again.

The in-process tests shorten SQLite's busy timeout, so that a read that waited for the lock
would fail at once rather than after 5 s; the daemon runs as a real subprocess otherwise.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest

from comfywatch.errors import StoreError
from comfywatch.housekeeping import Housekeeping
from comfywatch.metrics import Metrics
from comfywatch.states import DeliveryState
from comfywatch.store import JobFilter, NewJob, Store, engine
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_deliveries
from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .daemon_proc import DaemonProcess, connect
from .helpers import comfywatch
from .receiver import Receiver
from .test_hooks_batch import finished_jobs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


async def test_every_read_answers_while_another_process_holds_the_write_lock(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read of the store (the dispatcher's due batch, the gauges' counts, the schema
    check of /readyz and of the commands, listings, a dry-run prune) answers while the
    lock is held; a write meets it and fails as a fault that passes (StoreError)."""
    monkeypatch.setattr(engine, "BUSY_TIMEOUT_MS", 100)
    url = "sqlite:///" + str(db_path)
    store = Store.open(url)
    try:
        await store.migrate()
        await finished_jobs(store, 3)
        await store.register([NewJob("local", "open", {}, (), "t")], time.time())
        metrics = Metrics()
        with closing(sqlite3.connect(db_path, isolation_level=None)) as locker:
            locker.execute("BEGIN IMMEDIATE")
            assert [j.prompt_id for j in await store.active_jobs()] == ["open"]
            assert len(await store.jobs(JobFilter())) == 4
            assert await store.job_record(1) is not None
            assert len(await store.deliveries()) == 3
            assert len((await store.due_batch(time.time(), 10)).deliveries) == 3
            assert await store.pending_delivery_count() == 3
            assert (await store.stats()).deliveries == {("notify", DeliveryState.PENDING): 3}
            await Housekeeping(store=store, metrics=metrics).refresh_gauges(time.time())
            current, head = await store.schema_revision()
            assert current == head
            await store.check_schema()
            assert await store.prune(time.time() + 86_400, dry_run=True) == 0
            listed = read(url, lambda conn: select_deliveries(conn, states=[], limit=None))
            assert len(listed) == 3
            with pytest.raises(StoreError, match="database is locked"):
                await store.register([NewJob("local", "new", {}, (), "t")], time.time())
            locker.execute("ROLLBACK")
        gauge = metrics.registry.get_sample_value(
            "comfywatch_hook_deliveries", {"hook": "notify", "state": "pending"}
        )
        assert gauge == 3
    finally:
        await store.close()


HOOK = """
[hooks.notify]
type = "webhook"
url = "{url}"
timeout_s = 60
retry_schedule_s = [0.05]
"""

BURST = 12


async def test_a_burst_of_deliveries_under_a_held_lock_arrives_once(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """The daemon sends a burst of deliveries while another process holds the write lock:
    every one reaches the receiver once, their results wait in memory (not recorded, not
    sent again) until the lock goes. Meanwhile /readyz says ready, the command line's
    queries answer, and no read of the daemon fails (its ticks have nothing to write, so
    the counts after each tick are read under the lock)."""
    receiver = Receiver(hang=True)  # holds the first requests until the lock is taken
    await receiver.start()
    pids = [fake.submit() for _ in range(BURST)]
    for pid in pids:
        await fake.wait_finished(pid)
    port = free_port()
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": p, "hooks": ["notify"]} for p in pids],
        daemon={"poll_interval_s": 0.1, "http": f"127.0.0.1:{port}", "hook_concurrency": 4},
        extra=HOOK.format(url=receiver.url),
    )
    db = tmp_path / "comfywatch.db"
    proc = await DaemonProcess.start(config)
    try:
        await proc.until(receiver.wait_until(lambda: receiver.active > 0), "a delivery started")
        with connect(db) as locker:
            locker.execute("BEGIN IMMEDIATE")
            locked_at = len(proc.events)
            receiver.release.set()
            await proc.until(
                receiver.wait_until(lambda: len(receiver.requests) == BURST), "every delivery"
            )
            first = await proc.wait_event("hook_result_not_recorded", start=locked_at)
            await proc.wait_event("hook_result_not_recorded", start=first + 1)

            status, body = await get(f"http://127.0.0.1:{port}/readyz")
            assert (status, json.loads(body)) == (200, {"status": "ready"})
            code, out, err = await comfywatch("hooks", "--json", "--config", str(config))
            assert code == 0, err
            assert {d["state"] for d in json.loads(out)} == {"pending"}
            code, out, err = await comfywatch("jobs", "--json", "--config", str(config))
            assert code == 0, err
            assert len(json.loads(out)) == BURST
            recorded = locker.execute("SELECT sum(attempts) FROM hook_deliveries").fetchone()
            assert recorded == (0,)
            assert not [e for e in proc.events[locked_at:] if e["event"] == "housekeeping_failed"]
            locker.execute("ROLLBACK")
        await proc.wait_event(
            "hook_delivered", lambda _: len(proc.named("hook_delivered")) == BURST
        )
        proc.send(signal.SIGTERM)
        assert await proc.wait() == 0, proc.describe()
    finally:
        await proc.close()
        await receiver.stop()
    ids = Counter(headers["webhook-id"] for headers, _ in receiver.requests)
    assert len(ids) == BURST and set(ids.values()) == {1}, ids
    with connect(db) as conn:
        rows = conn.execute("SELECT state, attempts FROM hook_deliveries").fetchall()
    assert rows == [("delivered", 1)] * BURST
