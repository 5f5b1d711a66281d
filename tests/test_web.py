"""The HTTP listener: ``/metrics``, ``/healthz``, ``/readyz`` and ``comfywatch healthcheck``.

The daemon runs as a real subprocess with ``[daemon] http`` on a free port of 127.0.0.1
(the service does not report the port it bound, so ``:0`` would leave the test guessing),
or in this process where the test needs to reach into it (the database file).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from comfywatch.service import Daemon
from comfywatch.testing import FakeComfyUI
from comfywatch.web import start_http

from .conftest import Clock, write_config
from .helpers import comfywatch

WAIT_S = 20.0
MakeDaemon = Callable[[Path], Awaitable[Daemon]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of ``GET url``."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def get_when_up(url: str) -> tuple[int, str, str]:
    """``get(url)``, retried while nothing listens yet (bounded)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                return await get(url)
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def labelled(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


@pytest.fixture
async def daemon_proc() -> AsyncIterator[Callable[[Path], Awaitable[asyncio.subprocess.Process]]]:
    """Start ``comfywatch run`` subprocesses; kill any the test left running."""
    started: list[asyncio.subprocess.Process] = []
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

    async def start(config: Path) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfywatch",
            "run",
            "--config",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), WAIT_S)


async def test_metrics_count_a_known_run_and_name_no_prompt(
    tmp_path: Path,
    fake: FakeComfyUI,
    daemon_proc: Callable[[Path], Awaitable[asyncio.subprocess.Process]],
) -> None:
    """3 successes and 1 error finish, 1 job keeps running: the counters, gauges and
    health endpoints of the running service say exactly that, and no prompt id leaks into
    a label (cardinality stays bounded)."""
    finished = [fake.submit() for _ in range(3)] + [fake.submit(outcome="error")]
    for pid in finished:
        await fake.wait_finished(pid)
    fake.hold_running()
    running = fake.submit()
    await fake.wait_running(running)
    port = free_port()
    jobs = [{"server": "local", "prompt_id": p} for p in [*finished, running]]
    config = write_config(tmp_path, {"local": fake.url}, jobs, daemon={"http": f"127.0.0.1:{port}"})
    proc = await daemon_proc(config)
    base = f"http://127.0.0.1:{port}"

    # The first tick records everything; a second tick proves its housekeeping is done.
    async with asyncio.timeout(WAIT_S):
        while True:
            status, content_type, text = await get_when_up(base + "/metrics")
            found = samples(text)
            if (value(found, "comfywatch_ticks_total") or 0) >= 2:
                break
            await asyncio.sleep(0.05)
    assert status == 200 and content_type.startswith("text/plain")

    assert labelled(found, "comfywatch_jobs_finished_total") == {
        frozenset({("server", "local"), ("state", "success")}): 3,
        frozenset({("server", "local"), ("state", "error")}): 1,
    }
    assert labelled(found, "comfywatch_jobs") == {
        frozenset({("server", "local"), ("state", "success")}): 3,
        frozenset({("server", "local"), ("state", "error")}): 1,
        frozenset({("server", "local"), ("state", "running")}): 1,
    }
    assert (value(found, "comfywatch_polls_total", server="local", result="ok") or 0) >= 2
    assert value(found, "comfywatch_polls_total", server="local", result="unavailable") is None
    assert value(found, "comfywatch_server_up", server="local") == 1
    assert (value(found, "comfywatch_last_tick_timestamp_seconds") or 0) > 0
    lag_count = value(found, "comfywatch_detection_lag_seconds_count", server="local")
    assert lag_count == 4  # one observation per finished job with ComfyUI's timestamps
    for pid in [*finished, running]:
        assert pid not in text

    status, _, body = await get(base + "/healthz")
    assert status == 200 and '"ok"' in body
    status, _, body = await get(base + "/readyz")
    assert status == 200 and '"ready"' in body

    # The container's HEALTHCHECK: healthy while the daemon runs ...
    code, out, err = await comfywatch("healthcheck", "--config", str(config))
    assert code == 0, err
    assert '"ok"' in out

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
    # ... and not once nothing listens on the port.
    code, out, err = await comfywatch("healthcheck", "--config", str(config))
    assert code != 0
    assert "unhealthy" in err


async def test_healthcheck_without_http_reads_the_database(tmp_path: Path) -> None:
    """Without ``http`` the healthcheck is: the database exists and its schema is current."""
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    code, _, err = await comfywatch("healthcheck", "--config", str(config))
    assert code != 0 and "does not exist" in err
    code, _, err = await comfywatch("migrate", "--config", str(config))
    assert code == 0, err
    code, out, err = await comfywatch("healthcheck", "--config", str(config))
    assert code == 0, err
    assert "database ok" in out


@pytest.fixture
async def http() -> AsyncIterator[Callable[[Daemon], Awaitable[str]]]:
    """Serve a daemon's endpoints on a port of 127.0.0.1 picked by the OS; its base URL."""
    runners: list[web.AppRunner] = []

    async def serve(daemon: Daemon) -> str:
        runner = await start_http(daemon, "127.0.0.1", 0)
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_healthz_and_readyz_follow_the_loop_and_the_database(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    http: Callable[[Daemon], Awaitable[str]],
) -> None:
    """Both say 503 before the loop runs, 200 once it ticks, and /readyz 503 again when
    the database file goes away (open connections would otherwise keep writing to the
    deleted file and report nothing)."""
    fake.hold_running()
    pid = fake.submit()
    await fake.wait_running(pid)
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    daemon = await make_daemon(config)  # migrated, not running yet
    base = await http(daemon)

    status, _, body = await get(base + "/healthz")
    assert status == 503 and "starting" in body
    status, _, body = await get(base + "/readyz")
    assert status == 503 and "not started" in body

    runner = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if (await get(base + "/healthz"))[0] == 200:
                    break
                await asyncio.sleep(0.02)
        status, _, body = await get(base + "/readyz")
        assert status == 200, body

        db = tmp_path / "comfywatch.db"
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            path.unlink()
        status, _, body = await get(base + "/readyz")
        assert status == 503
        assert "database" in body and str(db) in body
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(runner, WAIT_S) == 0


async def test_readyz_notices_a_replaced_database_file(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    http: Callable[[Daemon], Awaitable[str]],
) -> None:
    """A file renamed over the database (say, a restored backup) is not the database the
    daemon has open: not ready."""
    config = write_config(tmp_path, {"local": fake.url})
    daemon = await make_daemon(config)
    daemon.status.ready = True  # what run() sets once started; no loop needed here
    base = await http(daemon)
    assert (await get(base + "/readyz"))[0] == 200
    db = tmp_path / "comfywatch.db"
    copy = tmp_path / "restored.db"
    copy.write_bytes(db.read_bytes())
    copy.rename(db)
    status, _, body = await get(base + "/readyz")
    assert status == 503 and "replaced" in body


async def test_unknown_paths_are_404(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    http: Callable[[Daemon], Awaitable[str]],
) -> None:
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}))
    base = await http(daemon)
    assert (await get(base + "/"))[0] == 404


async def test_server_gauges_follow_each_poll(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """What ``comfywatch watch`` shows of a server: up, the queue length it last saw and
    when it last polled; the queue length is dropped while the server does not answer."""
    fake.hold_running()
    running, waiting = fake.submit(), fake.submit()
    await fake.wait_running(running)
    jobs = [{"server": "local", "prompt_id": p} for p in (running, waiting)]
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    await daemon.poller.tick()
    found = samples(generate_latest(daemon.metrics.registry).decode())
    assert value(found, "comfywatch_server_up", server="local") == 1
    assert value(found, "comfywatch_server_queue_remaining", server="local") == 2
    polled_at = value(found, "comfywatch_server_last_poll_timestamp_seconds", server="local")
    assert polled_at == clock.now

    fake.inject("http_500")
    async with asyncio.timeout(WAIT_S):
        while value(found, "comfywatch_server_up", server="local") != 0:
            clock.advance(120)  # past any backoff
            await daemon.poller.tick()
            found = samples(generate_latest(daemon.metrics.registry).decode())
            await asyncio.sleep(0.05)  # past the poll interval on the monotonic clock
    assert value(found, "comfywatch_server_queue_remaining", server="local") is None
    polled_at = value(found, "comfywatch_server_last_poll_timestamp_seconds", server="local")
    assert polled_at == clock.now
