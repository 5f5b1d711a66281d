"""Bugs crash once and loudly; only faults that pass are tried again.

A database fault that passes (the lock, I/O, a dropped connection) is a ``StoreError``,
and the daemon tries again. Anything else raised in its own machinery (a row it cannot
read, a table that is not there, a background task that fails) ends ``comfywatch run``
with status 70 and the traceback logged once, so that systemd's restart policy acts. No
background task's exception goes unretrieved, and the notify socket is closed at exit.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from comfywatch.comfy import ComfyClient, SocketEvent
from comfywatch.config import load_settings
from comfywatch.housekeeping import Housekeeping
from comfywatch.metrics import Metrics
from comfywatch.notify import SystemdNotifier
from comfywatch.service import Daemon
from comfywatch.store import JobFilter, Store
from comfywatch.store.drivers import is_transient
from comfywatch.testing import FakeComfyUI
from comfywatch.watchers import QueueWatchers

from .conftest import write_config
from .daemon_proc import DaemonProcess, connect
from .receiver import Receiver
from .test_hooks_batch import finished_jobs
from .test_notify import NotifySocket

WAIT_S = 30.0  # never reached when things work: the old code looped here forever


def sqlite_error(message: str, code: int) -> sa_exc.OperationalError:
    """SQLite's error as SQLAlchemy raises it: the driver's, with its result code."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return sa_exc.OperationalError("SELECT", {}, error)


class PgError(Exception):
    """What asyncpg's errors carry, as SQLAlchemy's asyncpg adapter passes them on."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "connecting", "transient"),
    [
        (sqlite_error("database is locked", 5), False, True),
        (sqlite_error("disk I/O error", 10 | 3 << 8), False, True),
        (sqlite_error("database or disk is full", 13), False, True),
        (sqlite_error("no such table: jobs", 1), False, False),
        (sa_exc.IntegrityError("x", {}, sqlite3.IntegrityError("UNIQUE failed")), False, False),
        (sa_exc.DBAPIError("x", {}, PgError("57P01")), False, True),  # admin shutdown
        (sa_exc.DBAPIError("x", {}, PgError("40001")), False, True),  # serialization failure
        (sa_exc.DBAPIError("x", {}, PgError("08006")), False, True),  # connection failure
        (sa_exc.DBAPIError("x", {}, PgError("22001")), False, False),  # value too long
        (sa_exc.DBAPIError("x", {}, PgError("42P01")), False, False),  # undefined table
        (sa_exc.DBAPIError("x", {}, Exception("gone"), connection_invalidated=True), False, True),
        (sa_exc.InterfaceError("x", {}, Exception("connection is closed")), False, True),
        (sa_exc.TimeoutError("QueuePool limit reached"), False, True),
        (sa_exc.StatementError("naive datetime", "x", {}, ValueError("naive")), False, False),
        (ConnectionRefusedError(111, "refused"), True, True),
        (TimeoutError(), True, True),
        (ConnectionRefusedError(111, "refused"), False, False),  # raised by our own code
        (OSError(2, "No such file"), False, False),
        (ValueError("'bogus' is not a valid Reason"), False, False),
        (KeyError("x"), True, False),
    ],
)
def test_only_faults_that_pass_are_transient(
    error: BaseException, connecting: bool, transient: bool
) -> None:
    assert is_transient(error, connecting=connecting) is transient


async def test_the_store_raises_what_it_cannot_handle_as_it_is(store: Store) -> None:
    """A row the code cannot read is no database fault: its ValueError goes up as it is,
    from the listing and from the dispatcher's due batch (trying again would only fail
    again). The state of a row in another table is no obstacle."""
    await finished_jobs(store, 2)
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE jobs SET reason = 'no_such_reason' WHERE id = 1")
    with pytest.raises(ValueError, match="no_such_reason"):
        await store.jobs(JobFilter())
    with pytest.raises(ValueError, match="no_such_reason"):
        await store.due_batch(time.time(), 10)
    assert await store.pending_delivery_count() == 2


async def test_a_failed_prune_is_raised_and_a_long_retention_is_no_failure(
    tmp_path: Path,
) -> None:
    """A prune task that fails on something other than a fault that passes (here a
    database without its tables) is raised by ``check()``, or handed back by ``stop()``:
    never left unretrieved. A retention longer than the time since 1970 keeps everything,
    without failing."""
    bare = Store.open("sqlite:///" + str(tmp_path / "bare.db"))  # never migrated
    failed = asyncio.Event()
    try:
        chores = Housekeeping(store=bare, metrics=Metrics(), on_failed=failed.set)
        chores.prune_if_due(time.time(), 30.0, keep=())
        async with asyncio.timeout(WAIT_S):
            await failed.wait()
        with pytest.raises(sa_exc.OperationalError, match="no such table"):
            chores.check()
        assert await chores.stop() == []

        chores = Housekeeping(store=bare, metrics=Metrics(), on_failed=failed.set)
        chores.prune_if_due(time.time(), 30.0, keep=())
        [late] = [*await _settled(chores)]
        assert isinstance(late, sa_exc.OperationalError)
    finally:
        await bare.close()

    migrated = Store.open("sqlite:///" + str(tmp_path / "db.sqlite"))
    try:
        await migrated.migrate()
        await finished_jobs(migrated, 1)
        chores = Housekeeping(store=migrated, metrics=Metrics())
        chores.prune_if_due(time.time(), 1e12, keep=())
        assert await _settled(chores) == []
    finally:
        await migrated.close()


async def _settled(chores: Housekeeping) -> list[BaseException]:
    """Let a prune in flight end, then stop: what stop() hands back."""
    task = chores._prune_task
    assert task is not None
    async with asyncio.timeout(WAIT_S):
        await asyncio.wait({task})
    return await chores.stop()


async def test_a_watcher_that_fails_wakes_the_daemon_and_is_raised(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """A WebSocket watcher whose event handling raises (a bug): ``on_ended`` is called,
    ``check()`` raises its exception; one that fails unchecked is handed back by
    ``stop()``."""
    settings = load_settings(write_config(tmp_path, {"local": fake.url}))
    client = ComfyClient(settings.servers["local"])
    ended = asyncio.Event()

    def broken(server: str, kind: SocketEvent, remaining: int | None) -> None:
        raise LookupError(f"cannot handle {kind} of {server}")

    try:
        watchers = QueueWatchers(broken, on_ended=ended.set)
        watchers.start({"local": client})
        async with asyncio.timeout(WAIT_S):
            await ended.wait()
        with pytest.raises(LookupError, match="cannot handle connected of local"):
            watchers.check()
        assert await watchers.stop() == []

        ended.clear()
        watchers.start({"local": client})
        async with asyncio.timeout(WAIT_S):
            await ended.wait()
        [failure] = await watchers.stop()
        assert isinstance(failure, LookupError)
    finally:
        await client.close()


async def test_the_notify_socket_is_closed_when_the_daemon_ends(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    notifier = SystemdNotifier(str(tmp_path / "notify.sock"))
    pid = fake.submit()
    await fake.wait_finished(pid)
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    settings = load_settings(config)
    store = Store.open(settings.daemon.database_url)
    try:
        daemon = Daemon(settings, store=store, notifier=notifier)
        assert await asyncio.wait_for(daemon.run(until_done=True), WAIT_S) == 0
        assert not notifier.enabled
        assert (await listener.next()).get("READY") == "1"
    finally:
        await store.close()
        notifier.close()
        listener.close()


HOOK = """
[hooks.notify]
type = "webhook"
url = "{url}"
retry_schedule_s = [0.05]
"""


@pytest.mark.parametrize(
    ("poison", "where"),
    [
        # The dispatcher's first claim reads the job of a pending delivery.
        ("UPDATE jobs SET reason = 'no_such_reason'", "no_such_reason"),
        # The gauges, counted after the first tick, group jobs by state.
        ("UPDATE jobs SET state = 'no_such_state'; DELETE FROM hook_deliveries", "no_such_state"),
    ],
    ids=["dispatcher", "gauges"],
)
async def test_a_row_the_daemon_cannot_read_ends_it_once_with_status_70(
    tmp_path: Path, fake: FakeComfyUI, poison: str, where: str
) -> None:
    """A poisoned row in the database: reading it raises a ValueError in comfywatch's own
    code. The daemon logs the traceback once (``daemon_crashed``) and exits 70, instead of
    treating it as a database error and trying again forever. Nothing is sent, no task's
    exception is left unretrieved, and nothing but the log line carries the traceback."""
    receiver = Receiver()
    await receiver.start()
    config = write_config(tmp_path, {"local": fake.url}, extra=HOOK.format(url=receiver.url))
    db = tmp_path / "comfywatch.db"
    store = Store.open("sqlite:///" + str(db))
    try:
        await store.migrate()
        await finished_jobs(store, 3)
    finally:
        await store.close()
    with connect(db) as conn:
        conn.executescript(poison)
    proc = await DaemonProcess.start(config)
    try:
        code = await proc.wait(timeout_s=WAIT_S)
    finally:
        await proc.close()
        await receiver.stop()
    assert code == 70, proc.describe()
    [crash] = proc.named("daemon_crashed")
    assert crash["level"] == "error"
    assert "Traceback" in crash["exception"] and where in crash["exception"], crash
    assert not proc.named("hook_outbox_unreadable") and not proc.named("housekeeping_failed")
    printed = json.dumps(proc.events) + proc.stderr
    assert "never retrieved" not in printed
    assert "Traceback" not in proc.stderr
    assert proc.named("daemon_stopped")
    assert receiver.requests == []
