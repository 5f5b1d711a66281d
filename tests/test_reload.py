"""Reloads in a running daemon: each setting a reload applies takes effect without a
restart, the one it cannot apply (the database) refuses the reload as a whole, and a
failed reload shows in the log, the metrics and ``/readyz`` (``STATUS=``: test_notify.py)
until one succeeds.

In-process daemons (``make_daemon``) where the test reaches into them, ``comfywatch run``
subprocesses and SIGHUP for the HTTP listener and logging (process-wide set-ups).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from comfywatch.config.schema import ListenAddress
from comfywatch.testing import FakeComfyUI
from comfywatch.web import HttpListener

from .conftest import write_config
from .daemon_proc import DaemonProcess
from .receiver import Receiver
from .test_daemon import MakeDaemon, eventually, job, spec, states
from .test_web import free_port, get, get_when_up, samples, value

HOOK = """
[hooks.slow]
type = "webhook"
url = "{url}"
"""


def metrics_of(daemon: Any) -> dict[Any, float]:
    return samples(generate_latest(daemon.metrics.registry).decode())


@pytest.fixture
async def processes() -> AsyncIterator[list[DaemonProcess]]:
    """``comfywatch run`` children the test starts; none outlives it."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        await daemon.close()


async def start(processes: list[DaemonProcess], config: Path, *args: str) -> DaemonProcess:
    """``comfywatch run --config CONFIG ARGS`` (no ``--log-format``: the file decides)."""
    argv = [sys.executable, "-m", "comfywatch", "run", "--config", str(config), *args]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    daemon = DaemonProcess(proc, argv)
    processes.append(daemon)
    return daemon


async def reload(daemon: DaemonProcess, outcome: str = "config_reloaded") -> dict[str, Any]:
    """SIGHUP, and the ``config_reloaded`` (or ``reload_failed``) event it led to."""
    at = len(daemon.events)
    daemon.send(signal.SIGHUP)
    return daemon.events[await daemon.wait_event(outcome, start=at)]


async def refused(url: str) -> bool:
    try:
        await get(url)
    except aiohttp.ClientConnectionError:
        return True
    return False


# -- settings applied live ---------------------------------------------------------------


async def test_hook_concurrency_changes_in_a_running_daemon(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    receivers: Callable[..., Any],
) -> None:
    """With hook_concurrency = 1 one attempt waits at a receiver that does not answer and
    the others wait for its slot; reloaded to 3, they start without a restart."""
    receiver: Receiver = await receivers(hang=True)
    pids = [fake.submit() for _ in range(3)]
    for pid in pids:
        await fake.wait_finished(pid)
    jobs = [spec(pid, hooks=["slow"]) for pid in pids]
    hook = HOOK.format(url=receiver.url)
    config = write_config(
        tmp_path, {"local": fake.url}, jobs, daemon={"hook_concurrency": 1}, extra=hook
    )
    daemon = await make_daemon(config)
    runner = asyncio.create_task(daemon.run())
    try:
        await receiver.wait_until(lambda: receiver.active == 1)
        write_config(
            tmp_path, {"local": fake.url}, jobs, daemon={"hook_concurrency": 3}, extra=hook
        )
        daemon.request_reload()
        await receiver.wait_until(lambda: receiver.active == 3)
    finally:
        receiver.release.set()
        daemon.request_stop()
        assert await runner == 0


async def test_a_shorter_poll_interval_applies_at_once(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """poll_interval_s = 3600 and no WebSocket: after the first pass nothing is polled
    for an hour. Reloaded to 0.05 s, the next pass comes now, not when the hour is up."""
    fake.pause()
    pid = fake.submit()
    server = {"url": fake.url, "websocket": False}
    config = write_config(
        tmp_path, {"local": server}, [spec(pid)], daemon={"poll_interval_s": 3600}
    )
    daemon = await make_daemon(config)
    runner = asyncio.create_task(daemon.run())
    try:
        await eventually(lambda: states(daemon), lambda s: s[pid] == "queued")
        fake.resume()
        await fake.wait_finished(pid)
        write_config(tmp_path, {"local": server}, [spec(pid)], daemon={"poll_interval_s": 0.05})
        daemon.request_reload()
        await eventually(lambda: states(daemon), lambda s: s[pid] == "success")
    finally:
        daemon.request_stop()
        assert await runner == 0


async def test_servers_changed_added_and_removed(
    tmp_path: Path, fake: FakeComfyUI, fake2: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A server that refuses the credentials is backed off for a minute; new headers are
    tried at the next tick, not after that minute. A server added is polled; one removed
    no longer counts as up or down. ``config_reloaded`` names the keys, not the values."""
    fake.pause()
    pid = fake.submit()
    fake.inject("auth_401")
    other, third = fake2.submit(), fake2.submit()
    await fake2.wait_finished(third)
    old_auth = {"url": fake.url, "headers": {"Authorization": "Bearer old-token"}}
    config = write_config(
        tmp_path, {"local": old_auth, "other": fake2.url}, [spec(pid), spec(other, "other")]
    )
    daemon = await make_daemon(config)
    report = await daemon.poller.tick()
    assert report.servers_failed == 1
    assert value(metrics_of(daemon), "comfywatch_server_up", server="other") == 1

    fake.clear_faults()
    new_auth = {"url": fake.url, "headers": {"Authorization": "Bearer new-token"}}
    write_config(
        tmp_path, {"local": new_auth, "third": fake2.url}, [spec(pid), spec(third, "third")]
    )
    with capture_logs() as logs:
        assert await daemon.reload(why="test") is True
    [event] = [e for e in logs if e["event"] == "config_reloaded"]
    assert event["changed"] == ["servers.local.headers", "servers.other", "servers.third", "jobs"]
    assert "token" not in json.dumps(event, default=str)

    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "queued"  # polled with the new headers
    assert (await job(daemon, third)).job.state == "success"
    found = metrics_of(daemon)
    assert value(found, "comfywatch_server_up", server="other") is None
    assert value(found, "comfywatch_server_up", server="local") == 1


async def test_a_poll_in_flight_survives_its_client_being_replaced(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A reload that changes a server's headers replaces its client while a poll waits
    for an answer: the poll completes on the old client, which closes only then."""
    fake.pause()
    pid = fake.submit()
    fake.inject("hang", route="GET /queue")
    server = {"url": fake.url, "headers": {"X-Token": "one"}}
    config = write_config(tmp_path, {"local": server}, [spec(pid)])
    daemon = await make_daemon(config)
    old = daemon.poller.clients()["local"]
    tick = asyncio.create_task(daemon.poller.tick())
    await fake.wait_requests("GET /queue")

    write_config(tmp_path, {"local": {**server, "headers": {"X-Token": "two"}}}, [spec(pid)])
    assert await daemon.reload(why="test") is True
    assert daemon.poller.clients()["local"] is not old
    fake.clear_faults()
    report = await asyncio.wait_for(tick, 20)
    assert (report.servers_polled, report.servers_failed) == (1, 0)
    assert (await job(daemon, pid)).job.state == "queued"

    async def closed() -> bool:
        return old.closed

    await eventually(closed, bool)


async def test_a_file_caught_while_it_is_written_is_not_loaded(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """An edit is loaded only once the files look the same at two looks in a row: a file
    seen truncated (valid TOML, but without its servers) and written in full before the
    next look is never loaded; the full file is, one look later."""
    config = write_config(tmp_path, {"local": fake.url})
    daemon = await make_daemon(config)
    full = config.read_text()
    config.write_text("[daemon]\n")  # an editor or a tool, caught half-way
    assert daemon._config_changed() is False  # first look at the change: wait
    config.write_text(
        full.replace(
            "[servers.local]",
            "[servers.second]\nurl = " + json.dumps(fake.url) + "\n\n[servers.local]",
        )
    )
    assert daemon._config_changed() is False  # changed again since that look: wait
    assert daemon._config_changed() is True  # unchanged since the last look: load it
    assert await daemon.reload(why="files changed") is True
    assert daemon.settings.servers.keys() == {"local", "second"}
    assert daemon._config_changed() is False


# -- what a reload refuses -----------------------------------------------------------------


async def test_a_changed_database_refuses_the_whole_reload(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """Another database in the file: the reload fails (naming file and key), nothing of it
    applies (the server it adds neither), and the daemon records in the old database."""
    fake.pause()
    pid = fake.submit()
    config = write_config(tmp_path, {"local": fake.url}, [spec(pid)])
    daemon = await make_daemon(config)
    write_config(
        tmp_path,
        {"local": fake.url, "second": fake.url},
        [spec(pid)],
        daemon={"database": "sqlite:///other.db"},
    )
    with capture_logs() as logs:
        assert await daemon.reload(why="test") is False
    [event] = [e for e in logs if e["event"] == "reload_failed"]
    assert event["error"].startswith(f"{config}: daemon.database: a reload cannot switch")
    assert event["not_applied"] == ["daemon.database", "servers.second"]
    assert daemon.settings.servers.keys() == {"local"}
    assert daemon.status.reload_error == event["error"]
    assert value(metrics_of(daemon), "comfywatch_config_last_reload_successful") == 0

    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "queued"
    assert not (tmp_path / "other.db").exists()


# -- through a real process: the HTTP listener, failures, logging -----------------------------


async def test_the_listener_moves_and_failed_reloads_show_in_metrics_and_readyz(
    tmp_path: Path, fake: FakeComfyUI, processes: list[DaemonProcess]
) -> None:
    """``http`` moved to another port, refused while that port is taken, and removed; a
    broken file. Each failure sets comfywatch_config_last_reload_successful to 0 and
    /readyz (still 200) names it; the next good reload sets 1 and a later timestamp."""
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

    def configure(http: str | None) -> None:
        write_config(tmp_path, {"local": fake.url}, daemon={} if http is None else {"http": http})

    configure(f"127.0.0.1:{port_a}")
    config = tmp_path / "comfywatch.toml"
    daemon = await start(processes, config, "--log-format", "json")
    _, _, body = await get_when_up(url_a + "/metrics")
    assert value(samples(body), "comfywatch_config_last_reload_successful") == 1
    started_at = value(samples(body), "comfywatch_config_last_reload_success_timestamp_seconds")
    assert started_at is not None and started_at > 0

    # Moved: the new port answers, the old one is closed.
    configure(f"127.0.0.1:{port_b}")
    event = await reload(daemon)
    assert event["changed"] == ["daemon.http"]
    status, _, body = await get(url_b + "/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready"}
    assert await refused(url_a + "/metrics")
    moved_at = value(
        samples((await get(url_b + "/metrics"))[2]),
        "comfywatch_config_last_reload_success_timestamp_seconds",
    )
    assert moved_at is not None and moved_at > started_at

    # The old port taken by someone else: the reload is refused, the listener stays.
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port_a))
        blocker.listen()
        configure(f"127.0.0.1:{port_a}")
        event = await reload(daemon, "reload_failed")
    assert "daemon.http: cannot listen on 127.0.0.1:" in event["error"]
    assert event["not_applied"] == ["daemon.http"]
    status, _, body = await get(url_b + "/readyz")
    assert status == 200, body
    [warning] = json.loads(body)["warnings"]
    assert "daemon.http: cannot listen" in warning
    found = samples((await get(url_b + "/metrics"))[2])
    assert value(found, "comfywatch_config_last_reload_successful") == 0
    assert value(found, "comfywatch_config_last_reload_success_timestamp_seconds") == moved_at

    # A broken file: the same, naming the file.
    config.write_text(config.read_text() + "\n[servers.broken\n")
    event = await reload(daemon, "reload_failed")
    assert "not_applied" not in event  # nothing could be compared
    status, _, body = await get(url_b + "/readyz")
    assert status == 200 and str(config) in json.loads(body)["warnings"][0]
    assert (
        value(
            samples((await get(url_b + "/metrics"))[2]), "comfywatch_config_last_reload_successful"
        )
        == 0
    )

    # Fixed: success again, at a later time, and no warning.
    configure(f"127.0.0.1:{port_b}")
    await reload(daemon)
    found = samples((await get(url_b + "/metrics"))[2])
    assert value(found, "comfywatch_config_last_reload_successful") == 1
    fixed_at = value(found, "comfywatch_config_last_reload_success_timestamp_seconds")
    assert fixed_at is not None and fixed_at > moved_at
    assert json.loads((await get(url_b + "/readyz"))[2]) == {"status": "ready"}

    # Removed: nothing listens any more.
    configure(None)
    event = await reload(daemon)
    assert event["changed"] == ["daemon.http"]
    assert await refused(url_b + "/metrics")

    daemon.send(signal.SIGTERM)
    assert await daemon.wait() == 0


async def test_log_level_and_format_change_on_reload(
    tmp_path: Path, fake: FakeComfyUI, processes: list[DaemonProcess]
) -> None:
    """From info and JSON to debug and console: the reload's own line is the last in the
    old set-up; the WebSocket's reconnection after it is logged, at debug, for people."""
    logging = {"log_level": "info", "log_format": "json"}
    config = write_config(tmp_path, {"local": fake.url}, daemon=logging)
    daemon = await start(processes, config)
    await daemon.wait_event("daemon_started")
    await fake.wait_requests("GET /ws")
    assert not daemon.named("websocket_connected")  # debug: not shown at info

    write_config(
        tmp_path, {"local": fake.url}, daemon={"log_level": "debug", "log_format": "console"}
    )
    event = await reload(daemon)
    assert event["changed"] == ["daemon.log_level", "daemon.log_format"]
    at = daemon.events.index(event)

    # Not JSON (the console format), and at debug level.
    found = await daemon.wait_event(
        None, lambda e: "websocket_connected" in e["raw"], start=at, timeout_s=20
    )
    assert "[debug" in daemon.events[found]["raw"]

    daemon.send(signal.SIGTERM)
    assert await daemon.wait() == 0


# -- the listener on its own ---------------------------------------------------------------


async def test_the_listener_moves_to_another_host_on_the_same_port(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """127.0.0.1:P to 0.0.0.0:P cannot bind beside the old socket: the old one makes room
    first; a rollback puts it back."""
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}))
    listener = HttpListener(daemon)
    port = free_port()
    try:
        await (await listener.prepare(ListenAddress("127.0.0.1", port))).commit()
        move = await listener.prepare(ListenAddress("0.0.0.0", port))
        await move.rollback()
        assert listener.address == ListenAddress("127.0.0.1", port)
        assert (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 503  # not started
        move = await listener.prepare(ListenAddress("0.0.0.0", port))
        await move.commit()
        assert listener.address == ListenAddress("0.0.0.0", port)
        assert (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 503
    finally:
        await listener.close()
    assert await refused(f"http://127.0.0.1:{port}/readyz")
