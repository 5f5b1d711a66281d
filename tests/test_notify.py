"""systemd's notify protocol, as a service manager sees it.

A datagram socket bound in the test's temp folder stands in for systemd: its path goes to a
real ``python -m comfywatch run`` subprocess as ``NOTIFY_SOCKET``, and the test reads what
arrives, in order. The ComfyUI it polls is the fake one, in this test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog

from comfywatch.notify import SystemdNotifier
from comfywatch.store import Store
from comfywatch.testing import FakeComfyUI

from .conftest import jobs_toml, write_config
from .daemon_proc import DaemonProcess as LoggingDaemon

WAIT_S = 20.0  # upper bound on waiting for something that must happen
STATUS_RE = re.compile(
    r"servers up (\d+)/(\d+), jobs tracked (\d+), deliveries pending (\d+)"
    r"(?:; last reload failed, previous configuration kept: (?P<reload_error>.+))?"
)

Message = dict[str, str]
StartDaemon = Callable[..., Awaitable["DaemonProcess"]]


class NotifySocket:
    """What systemd listens on: one AF_UNIX datagram per message, ``KEY=VALUE`` lines."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        #: Every message received so far, in order.
        self.received: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def parse(data: bytes) -> Message:
        message: Message = {}
        for line in data.decode().split("\n"):
            key, sep, value = line.partition("=")
            assert sep and key, f"not KEY=VALUE: {line!r} in {data!r}"
            assert key not in message, f"{key} twice in one datagram: {data!r}"
            message[key] = value
        return message

    async def next(self, timeout_s: float = WAIT_S) -> Message:
        """The next datagram (TimeoutError if none arrives within ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout_s)
        message = self.parse(data)
        self.received.append(message)
        return message

    async def until(self, ok: Callable[[Message], bool]) -> list[Message]:
        """Messages up to and including the first one that satisfies ``ok``."""
        got: list[Message] = []
        async with asyncio.timeout(WAIT_S):
            while True:
                got.append(await self.next())
                if ok(got[-1]):
                    return got

    def drain(self) -> list[Message]:
        """Every datagram already waiting, without waiting for more."""
        got: list[Message] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return got
            got.append(self.parse(data))
            self.received.append(got[-1])


class DaemonProcess:
    """``python -m comfywatch run --config PATH`` as a child process, its output collected."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout = b""
        self.stderr = b""
        self._readers: list[asyncio.Task[bytes]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfywatch",
            "run",
            "--config",
            str(self.config),
            "--log-format",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self.proc.stdout.read()),
            asyncio.create_task(self.proc.stderr.read()),
        ]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> int:
        assert self.proc is not None
        self.stdout, self.stderr = await asyncio.wait_for(asyncio.gather(*self._readers), WAIT_S)
        return await asyncio.wait_for(self.proc.wait(), WAIT_S)

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.wait()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = NotifySocket(str(path))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
async def daemon_process(notify_socket: NotifySocket) -> AsyncIterator[StartDaemon]:
    """Start daemons with ``NOTIFY_SOCKET`` pointing at the test's socket; kill leftovers."""
    started: list[DaemonProcess] = []

    async def start(config: Path, extra_env: dict[str, str] | None = None) -> DaemonProcess:
        env = {**os.environ, "NOTIFY_SOCKET": notify_socket.sock.getsockname(), **(extra_env or {})}
        process = DaemonProcess(config, env)
        await process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        await process.kill()


def ready(message: Message) -> bool:
    return message.get("READY") == "1"


def status(message: Message) -> tuple[int, int, int, int]:
    match = STATUS_RE.fullmatch(message["STATUS"])
    assert match, message
    up, total, jobs, pending = (int(g) for g in match.groups()[:4])
    return up, total, jobs, pending


def reload_error(message: Message) -> str | None:
    """What ``STATUS=`` says of a failed reload (``None``: the last one succeeded)."""
    match = STATUS_RE.fullmatch(message["STATUS"])
    assert match, message
    return match["reload_error"]


async def schema_is_current(db: Path) -> bool:
    store = Store.open(f"sqlite:///{db}", create=False, readonly=True)
    try:
        current, head = await store.schema_revision()
    finally:
        await store.close()
    return current == head


def registered(db: Path) -> set[str]:
    """The prompt ids in the jobs table, read with plain sqlite3."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT prompt_id FROM jobs")}
    finally:
        conn.close()


async def test_ready_comes_after_migrations_and_config_with_live_status(
    tmp_path: Path,
    fake: FakeComfyUI,
    notify_socket: NotifySocket,
    daemon_process: StartDaemon,
) -> None:
    """READY=1 is the first message, and by then the schema exists and the main file's jobs
    are registered (the spool is read after it: a flood of files never delays READY=1);
    STATUS= carries live counts from then on."""
    fake.hold_running()
    running = fake.submit()
    waiting = fake.submit()
    await fake.wait_running(running)
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": running}]
    )
    (tmp_path / "jobs.d" / "more.toml").write_text(
        jobs_toml([{"server": "local", "prompt_id": waiting}])
    )
    daemon = await daemon_process(config)

    first = await notify_socket.next()
    assert ready(first), first
    assert await schema_is_current(tmp_path / "comfywatch.db")
    assert running in registered(tmp_path / "comfywatch.db")
    assert status(first)[:2] == (1, 1)

    # Ticks keep STATUS= current: the spool's job joins, both are tracked until they finish.
    await notify_socket.until(lambda m: "STATUS" in m and status(m)[2] == 2)
    assert registered(tmp_path / "comfywatch.db") == {running, waiting}
    fake.release()
    later = await notify_socket.until(lambda m: "STATUS" in m and status(m)[2] == 0)
    assert all("READY" not in m and "STOPPING" not in m for m in later)
    assert status(later[-1]) == (1, 1, 0, 0)

    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0


async def test_sighup_and_file_changes_reload_between_reloading_and_ready(
    tmp_path: Path,
    fake: FakeComfyUI,
    notify_socket: NotifySocket,
    daemon_process: StartDaemon,
) -> None:
    """Each reload is RELOADING=1 (with MONOTONIC_USEC) then READY=1 with nothing between;
    READY's STATUS already reflects the new configuration; a broken edit keeps the old one."""
    fake.hold_running()
    pid = fake.submit()
    await fake.wait_running(pid)
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    daemon = await daemon_process(config)
    assert ready(await notify_socket.next())

    # SIGHUP with nothing changed still reloads.
    before_us = time.monotonic_ns() // 1000
    daemon.signal(signal.SIGHUP)
    got = await notify_socket.until(lambda m: m.get("RELOADING") == "1")
    assert all(set(m) <= {"WATCHDOG", "STATUS"} for m in got[:-1])  # only ticks before it
    reloading = got[-1]
    assert before_us <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    assert "READY" not in reloading
    after = await notify_socket.next()
    assert ready(after) and "RELOADING" not in after
    assert status(after)[1] == 1

    # An edit (written aside, renamed into place) adds a server: the daemon notices it.
    tmp = tmp_path / ".comfywatch.toml.tmp"
    tmp.write_text(config.read_text() + '\n[servers.second]\nurl = "http://127.0.0.1:9"\n')
    tmp.rename(config)
    got = await notify_socket.until(lambda m: m.get("RELOADING") == "1")
    after = await notify_socket.next()
    assert ready(after)
    assert status(after)[1] == 2  # the new server is counted by the time READY=1 is sent

    assert reload_error(after) is None

    # A broken edit: reload fails, READY=1 still follows, the old config keeps running, and
    # STATUS= says so (naming the key) on every message until a reload succeeds.
    good = config.read_text()
    tmp = tmp_path / ".comfywatch.toml.tmp"
    tmp.write_text(good + "\n[[jobs]]\nserver = 'nowhere'\n")
    tmp.rename(config)
    await notify_socket.until(lambda m: m.get("RELOADING") == "1")
    after = await notify_socket.next()
    assert ready(after) and status(after)[1] == 2
    assert "jobs[1].prompt_id: required key is missing" in (reload_error(after) or "")
    ticked = await notify_socket.until(lambda m: m.get("WATCHDOG") == "1")  # still ticking
    assert reload_error(ticked[-1]) == reload_error(after)
    assert daemon.running

    # Fixed: the next reload clears it.
    tmp.write_text(good)
    tmp.rename(config)
    await notify_socket.until(lambda m: m.get("RELOADING") == "1")
    after = await notify_socket.next()
    assert ready(after) and reload_error(after) is None

    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0
    events = [line for line in daemon.stdout.decode().splitlines() if '"config_reloaded"' in line]
    assert len(events) == 3 and '"SIGHUP"' in events[0] and '"files changed"' in events[1]
    assert b'"reload_failed"' in daemon.stdout and b"jobs[1].prompt_id" in daemon.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_sends_stopping_last_and_exits_0(
    tmp_path: Path,
    fake: FakeComfyUI,
    notify_socket: NotifySocket,
    daemon_process: StartDaemon,
    sig: signal.Signals,
) -> None:
    fake.hold_running()
    pid = fake.submit()
    await fake.wait_running(pid)
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    daemon = await daemon_process(config)
    assert ready(await notify_socket.next())
    await notify_socket.until(lambda m: m.get("WATCHDOG") == "1")

    daemon.signal(sig)
    assert await daemon.wait() == 0
    # Every datagram sent before the process exited is waiting in the socket.
    rest = notify_socket.drain()
    assert rest and rest[-1] == {"STOPPING": "1"}
    assert sum("STOPPING" in m for m in notify_socket.received) == 1
    assert b'"daemon_stopped"' in daemon.stdout


async def test_watchdog_follows_completed_ticks_and_stops_while_ticks_fail(
    tmp_path: Path, fake: FakeComfyUI, notify_socket: NotifySocket
) -> None:
    """WATCHDOG=1 comes only from ticks that really complete. Another process holding the
    database's write lock makes every tick fail (``tick_not_recorded``): no ping arrives
    while it lasts (so systemd's WatchdogSec would restart the daemon), and the pings
    resume once the lock is gone. (A server that hangs no longer stalls the loop at all:
    its poll outlives the tick's budget in the background.)

    "None arrives" can only be observed over a window between two failed ticks; a ping
    sent by anything but a completed tick would arrive within it.
    """
    fake.hold_running()
    pid = fake.submit()
    later = fake.submit(run_time_s=600)  # still running at the end
    await fake.wait_running(pid)
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": p} for p in (pid, later)],
        daemon={"poll_interval_s": 0.05},
    )
    env = {"NOTIFY_SOCKET": notify_socket.sock.getsockname(), "WATCHDOG_USEC": "100000"}
    daemon = await LoggingDaemon.start(config, env=env)
    try:
        assert ready(await notify_socket.next())
        for _ in range(3):
            await notify_socket.until(lambda m: m.get("WATCHDOG") == "1")

        writer = sqlite3.connect(tmp_path / "comfywatch.db", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            fake.release()  # a finish to record: every tick now has to write
            first = await daemon.wait_event("tick_not_recorded")
            notify_socket.drain()  # pings of ticks that completed before the lock
            await daemon.wait_event("tick_not_recorded", start=first + 1)
            assert not [m for m in notify_socket.drain() if m.get("WATCHDOG") == "1"]
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        resumed = await notify_socket.until(lambda m: m.get("WATCHDOG") == "1")
        assert status(resumed[-1])[2] == 1
        daemon.send(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.close()


async def test_watchdog_is_fed_while_idle_after_a_completed_tick(
    tmp_path: Path,
    fake: FakeComfyUI,
    notify_socket: NotifySocket,
    daemon_process: StartDaemon,
) -> None:
    """A poll interval longer than WatchdogSec must not get the daemon killed: after a
    completed tick, the idle loop pings every WATCHDOG_USEC / 2."""
    fake.pause()
    pid = fake.submit()
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid}],
        daemon={"poll_interval_s": 3600},
    )
    daemon = await daemon_process(config, {"WATCHDOG_USEC": "200000"})
    assert ready(await notify_socket.next())
    for _ in range(5):
        await notify_socket.until(lambda m: m.get("WATCHDOG") == "1")
    assert fake.requests["GET /queue"] == 1  # one tick: the later pings came from the idle loop
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0


# -- SystemdNotifier on its own --------------------------------------------------------


async def test_notifier_reaches_an_abstract_namespace_socket() -> None:
    """``@name`` is a socket in the abstract namespace (no file); lines are joined by LF and
    a STATUS= text cannot break the datagram into extra lines."""
    name = f"comfywatch-test-{uuid.uuid4().hex}"
    listener = NotifySocket("\0" + name)
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.enabled
        notifier.notify(ready=True, status="servers up 1/1\nWATCHDOG=1")
        notifier.notify()  # nothing to say: nothing sent
        notifier.notify(reloading=True)
        notifier.notify(stopping=True, watchdog=True)
        first = await listener.next()
        assert first == {"READY": "1", "STATUS": "servers up 1/1 WATCHDOG=1"}
        second = await listener.next()
        assert set(second) == {"RELOADING", "MONOTONIC_USEC"}
        assert int(second["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert await listener.next() == {"STOPPING": "1", "WATCHDOG": "1"}
        assert listener.drain() == []
    finally:
        notifier.close()
        listener.close()


def test_notifier_without_notify_socket_does_nothing() -> None:
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    notifier.notify(ready=True, status="x")  # no socket, no error
    notifier.close()


def test_notifier_logs_and_survives_a_missing_socket(tmp_path: Path) -> None:
    """systemd gone (socket removed) must not crash the daemon: a warning, no exception."""
    notifier = SystemdNotifier(str(tmp_path / "no-such.sock"))
    try:
        with structlog.testing.capture_logs() as logs:
            notifier.notify(watchdog=True)
        assert [e["event"] for e in logs] == ["sd_notify_failed"]
        assert logs[0]["log_level"] == "warning"
    finally:
        notifier.close()
