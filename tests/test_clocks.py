"""Two clocks: scheduling on the monotonic one, so a step of the wall clock delays nothing;
decisions on stored (wall clock) times, so deadlines hold even while a server is down."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from comfywatch.comfy import SocketEvent
from comfywatch.housekeeping import STATS_EVERY_S, Housekeeping
from comfywatch.metrics import Metrics
from comfywatch.service import Daemon
from comfywatch.store import JobFilter, JobRow, NewJob, Store
from comfywatch.testing import FakeComfyUI
from comfywatch.views import iso, job_json
from comfywatch.watch import ServerWatch
from comfywatch.watchers import QueueWatchers

from .conftest import Clock, write_config
from .helpers import comfywatch

MakeDaemon = Callable[[Path], Awaitable[Daemon]]


def spec(prompt_id: str, server: str = "local") -> dict[str, Any]:
    return {"server": server, "prompt_id": prompt_id}


async def row(daemon: Daemon, prompt_id: str) -> JobRow:
    [record] = await daemon.store.jobs(JobFilter(prompt_id=prompt_id))
    return record.job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_wall_clock_set_back_after_a_failed_poll_does_not_stop_polling(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """The backoff runs on the monotonic clock: once it has passed, the server is polled
    again, though the wall clock went back an hour in between."""
    fake.pause()
    pid = fake.submit()
    config = write_config(
        tmp_path, {"local": fake.url}, [spec(pid)], daemon={"poll_interval_s": 10}
    )
    daemon = await make_daemon(config)
    await daemon.poller.tick()
    await fake.go_down()
    assert (await daemon.poller.tick()).servers_failed == 1
    await fake.come_up()

    clock.step_wall(-3600)
    assert (await daemon.poller.tick()).servers_polled == 0  # backed off: 15 to 20 s
    clock.advance(21)
    with capture_logs() as logs:
        report = await daemon.poller.tick()
    assert (report.servers_polled, report.servers_failed) == (1, 0)
    assert daemon.poller.health()["local"].up is True
    [recovered] = [e for e in logs if e["event"] == "server_recovered"]
    assert recovered["down_for_s"] >= 21  # measured on the monotonic clock too
    assert (await row(daemon, pid)).state == "queued"


def test_a_poll_takes_the_time_of_the_first_change_it_looks_into() -> None:
    watch = ServerWatch(poll_interval_s=1.0, queue_refresh_s=60.0)
    watch.socket_connected(0.0)
    watch.socket_count(3, 1.0)  # the first count: nothing changed yet
    assert watch.take_change() is None
    watch.socket_count(3, 2.0)  # a start
    watch.socket_count(4, 2.5)  # a put
    assert watch.take_change() is None
    watch.socket_count(3, 3.0)  # a finish
    watch.socket_count(2, 4.0)
    assert watch.take_change() == 3.0
    assert watch.take_change() is None  # taken by that poll
    watch.socket_disconnected(5.0)  # the server may have restarted: everything is read again
    watch.probed(2, 5.5)  # the count starts afresh: the poll that reads it times itself
    assert watch.take_change() is None
    watch.probed(1, 6.0)  # without the socket, a probe's answer shows a finish
    assert watch.take_change() == 6.0
    watch.probed(2, 7.0)  # a put, which may hide a finish
    assert watch.take_change() == 7.0
    watch.probed(1, 8.0)
    watch.forget_history()  # nothing tracked for a while: an old sign means nothing
    assert watch.take_change() is None


async def test_detection_lag_runs_from_the_socket_frame_on_the_monotonic_clock(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """The lag runs from the ``status`` frame that showed the finish to the commit: the
    5 s between that frame and the tick count, and the wall clock set back meanwhile (or
    ComfyUI's own clock) changes nothing."""
    fake.pause()
    pid = fake.submit()
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(pid)]))
    await daemon.poller.tick()
    arrived: defaultdict[tuple[SocketEvent, int | None], asyncio.Event]
    arrived = defaultdict(asyncio.Event)

    def on_event(server: str, kind: SocketEvent, remaining: int | None) -> None:
        daemon.poller.socket_event(server, kind, remaining)
        arrived[kind, remaining].set()

    watchers = QueueWatchers(on_event)
    watchers.start(daemon.poller.clients())
    try:
        await asyncio.wait_for(arrived["count", 1].wait(), 20)
        fake.resume()
        await fake.wait_finished(pid)
        await asyncio.wait_for(arrived["count", 0].wait(), 20)
        clock.advance(5)
        clock.step_wall(-3600)
        await daemon.poller.tick()
    finally:
        await watchers.stop()
    assert (await row(daemon, pid)).state == "success"
    registry = daemon.metrics.registry
    labels = {"server": "local"}
    assert registry.get_sample_value("comfywatch_detection_lag_seconds_count", labels) == 1
    lag_s = registry.get_sample_value("comfywatch_detection_lag_seconds_sum", labels)
    assert lag_s is not None and lag_s >= 5


async def test_deadlines_pass_while_the_server_is_down(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """``run_timeout_s`` and ``queue_timeout_s`` fire with the server unreachable; the
    record says so, and the history entry that shows up later changes nothing."""
    fake.hold_running()
    stuck = fake.submit()
    waiting = fake.submit()
    await fake.wait_running(stuck)
    server = {"url": fake.url, "run_timeout_s": 30, "queue_timeout_s": 100}
    daemon = await make_daemon(
        write_config(tmp_path, {"local": server}, [spec(stuck), spec(waiting)])
    )
    await daemon.poller.tick()
    assert [(await row(daemon, p)).state for p in (stuck, waiting)] == ["running", "queued"]

    await fake.go_down()
    clock.advance(31)
    down_at = iso(datetime.fromtimestamp(clock.now, UTC))
    assert (await daemon.poller.tick()).servers_failed == 1
    s = await row(daemon, stuck)
    assert (s.state, s.reason) == ("timeout", "run_timeout")
    assert s.detail is not None and s.detail.startswith(f"server unreachable since {down_at}: ")
    assert "GET /" in s.detail  # the poll's error
    assert (await row(daemon, waiting)).state == "queued"

    clock.advance(70)
    await daemon.poller.tick()
    w = await row(daemon, waiting)
    assert (w.state, w.reason) == ("timeout", "queue_timeout")
    assert w.detail is not None and w.detail.startswith(f"server unreachable since {down_at}: ")
    [record] = await daemon.store.jobs(JobFilter(prompt_id=waiting))
    assert job_json(record)["detail"] == w.detail

    await fake.come_up()
    fake.release()
    await fake.wait_finished(stuck)
    for _ in range(2):
        clock.advance(120)
        await daemon.poller.tick()
    assert await row(daemon, stuck) == s  # terminal states never change
    assert await row(daemon, waiting) == w


async def test_a_server_that_is_down_makes_no_job_lost_nor_not_found(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """While the server is down, only a timeout may end a job: a never-seen one past
    ``not_found_after_s`` waits for the server's word."""
    fake.hold_running()
    running = fake.submit()
    pending = fake.submit()
    ghost = str(uuid.uuid4())
    await fake.wait_running(running)
    server = {"url": fake.url, "run_timeout_s": 10**6, "queue_timeout_s": 10**6}
    jobs = [spec(running), spec(pending), spec(ghost)]
    daemon = await make_daemon(write_config(tmp_path, {"local": server}, jobs))
    await daemon.poller.tick()
    expected = {running: "running", pending: "queued", ghost: "registered"}
    assert {p: (await row(daemon, p)).state for p in expected} == expected

    await fake.go_down()
    for _ in range(5):
        clock.advance(600)  # past not_found_after_s and every backoff
        await daemon.poller.tick()
        assert {p: (await row(daemon, p)).state for p in expected} == expected

    await fake.come_up()
    for _ in range(2):
        clock.advance(120)
        await daemon.poller.tick()
    g = await row(daemon, ghost)
    assert (g.state, g.reason, g.detail) == ("not_found", "never_seen", None)
    assert (await row(daemon, running)).state == "running"
    assert (await row(daemon, pending)).state == "queued"


async def test_run_until_done_ends_when_the_deadline_passes_on_a_dead_server(
    tmp_path: Path,
) -> None:
    """Nothing listens on the server's port: ``run --until-done`` still ends, once the job's
    ``queue_timeout_s`` has passed, and ``show`` says why."""
    pid = str(uuid.uuid4())
    server = {"url": f"http://127.0.0.1:{free_port()}", "queue_timeout_s": 0.5}
    config = write_config(tmp_path, {"dead": server}, [spec(pid, "dead")])
    code, out, err = await comfywatch("run", "--config", str(config), "--until-done")
    assert code == 0, err
    names = [json.loads(line)["event"] for line in out.splitlines()]
    assert "server_unavailable" in names and "all_done" in names

    code, out, _ = await comfywatch("show", pid, "--config", str(config), "--json")
    shown = json.loads(out)
    assert (shown["state"], shown["reason"]) == ("timeout", "queue_timeout")
    assert shown["detail"].startswith("server unreachable since ")
    code, out, _ = await comfywatch("show", pid, "--config", str(config))
    assert code == 0 and f"detail:        {shown['detail']}" in out


async def test_the_gauges_refresh_on_schedule_after_the_wall_clock_is_set_back(
    store: Store, clock: Clock
) -> None:
    """Their interval runs on the monotonic clock; the ages they show, on the wall clock."""
    metrics = Metrics()
    housekeeping = Housekeeping(store=store, metrics=metrics, mono=clock.mono)
    await store.register([NewJob("local", "p1", {}, (), "test")], clock.now)
    await housekeeping.refresh_gauges(clock.now)
    jobs = {"server": "local", "state": "registered"}
    assert metrics.registry.get_sample_value("comfywatch_jobs", jobs) == 1

    await store.register([NewJob("local", "p2", {}, (), "test")], clock.now)
    clock.step_wall(-3600)
    clock.advance(STATS_EVERY_S)
    await housekeeping.refresh_gauges(clock.now)
    assert metrics.registry.get_sample_value("comfywatch_jobs", jobs) == 2
