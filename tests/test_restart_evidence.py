"""A restart is never recorded as a deletion, and a deletion never as a restart.

The daemon ticks by hand against a fake ComfyUI on a real port and a real SQLite file; where
the WebSocket matters, the real client's socket task feeds the poller, as in the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from comfywatch.comfy import SocketEvent
from comfywatch.service import Daemon
from comfywatch.store import JobFilter
from comfywatch.testing import FakeComfyUI
from comfywatch.watchers import QueueWatchers

from .conftest import Clock, write_config

MakeDaemon = Callable[[Path], Awaitable[Daemon]]


class Sockets:
    """The daemon's WebSocket tasks, with a log of what they reported to the poller."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.events: list[tuple[SocketEvent, int | None]] = []
        self._changed = asyncio.Event()
        self._watchers = QueueWatchers(self._on_event)

    def _on_event(self, server: str, kind: SocketEvent, remaining: int | None) -> None:
        self.events.append((kind, remaining))
        self._changed.set()
        self._daemon.poller.socket_event(server, kind, remaining)

    def start(self) -> None:
        self._watchers.start(self._daemon.poller.clients())

    async def stop(self) -> None:
        await self._watchers.stop()

    async def wait_for(self, kind: SocketEvent, remaining: int | None = None) -> None:
        """Wait until the event was reported since the last wait (count: with ``remaining``)."""
        async with asyncio.timeout(10):
            while True:
                for index, event in enumerate(self.events):
                    if event[0] == kind and (remaining is None or event[1] == remaining):
                        del self.events[: index + 1]
                        return
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def sockets() -> AsyncIterator[Callable[[Daemon], Sockets]]:
    started: list[Sockets] = []

    def start(daemon: Daemon) -> Sockets:
        watched = Sockets(daemon)
        watched.start()
        started.append(watched)
        return watched

    yield start
    for watched in started:
        await watched.stop()


async def state(daemon: Daemon, prompt_id: str) -> tuple[str, str | None]:
    [record] = await daemon.store.jobs(JobFilter(prompt_id=prompt_id))
    return record.job.state, record.job.reason


def config(tmp_path: Path, fake: FakeComfyUI, prompt_ids: list[str], **server: Any) -> Path:
    jobs = [{"server": "local", "prompt_id": pid} for pid in prompt_ids]
    return write_config(tmp_path, {"local": {"url": fake.url, **server}}, jobs)


async def ticks(daemon: Daemon, clock: Clock, count: int) -> None:
    for _ in range(count):
        clock.advance(1)
        await daemon.poller.tick()


async def test_a_restart_between_two_polls_with_no_new_prompt_is_no_deletion(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    clock: Clock,
    sockets: Callable[[Daemon], Sockets],
) -> None:
    """The restart drops the socket, and the server forgot its queue and its history: the
    waiting job is lost to the restart, not cancelled."""
    done = fake.submit()
    await fake.wait_finished(done)
    fake.pause()
    waiting = fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [done, waiting]))
    watched = sockets(daemon)
    await watched.wait_for("connected")
    await ticks(daemon, clock, 1)
    assert await state(daemon, waiting) == ("queued", None)

    await fake.restart()
    await watched.wait_for("disconnected")
    with capture_logs() as logs:
        await ticks(daemon, clock, 2)
    assert await state(daemon, waiting) == ("lost", "server_restarted")
    assert await state(daemon, done) == ("success", "finished")
    [event] = [e for e in logs if e["event"] == "server_restart_detected"]
    assert event["evidence"] == "socket_dropped,queue_and_history_forgotten"


async def test_without_the_socket_a_forgotten_queue_and_history_is_no_deletion(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """websocket = false, no poll failed, no new prompt: everything known vanished between
    two polls. A restart, or someone clearing queue and history: lost, cause unknown."""
    done = fake.submit()
    await fake.wait_finished(done)
    fake.pause()
    waiting = fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [done, waiting], websocket=False))
    await ticks(daemon, clock, 1)
    await fake.restart()
    with capture_logs() as logs:
        await ticks(daemon, clock, 2)
    assert await state(daemon, waiting) == ("lost", "left_unobserved")
    assert [e["event"] for e in logs if e["event"].startswith("server_restart")] == [
        "server_restart_possible"
    ]


@pytest.mark.parametrize("how", ["validated late", "client's own number"])
async def test_a_small_number_arriving_late_is_no_restart(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock, how: str
) -> None:
    """ComfyUI takes a prompt's number before validating it and queues it after, and a
    client may send its own: a new prompt below the highest number seen proves nothing,
    and the job deleted meanwhile is cancelled."""
    fake.pause()
    deleted = fake.submit()  # number 0
    taken = fake.take_number()  # 1, still validating
    newer = fake.submit()  # 2, queued first
    server = {"websocket": False, "queue_refresh_s": 0.001}  # the queue at every poll
    daemon = await make_daemon(config(tmp_path, fake, [deleted, newer], **server))
    await ticks(daemon, clock, 1)
    fake.submit(number=taken if how == "validated late" else 1.0)
    fake.delete_from_queue(deleted)
    with capture_logs() as logs:
        await ticks(daemon, clock, 2)
    assert await state(daemon, deleted) == ("cancelled", "deleted_from_queue")
    assert await state(daemon, newer) == ("queued", None)
    assert not [e for e in logs if e["event"].startswith("server_restart")]


async def test_a_job_deleted_during_an_outage_is_not_lost_to_a_restart(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """The server was down, not restarted (its history is still there): nobody saw the job
    go, so it is lost, but not to a restart."""
    done = fake.submit()
    await fake.wait_finished(done)
    fake.pause()
    deleted, kept = fake.submit(), fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [deleted, kept], websocket=False))
    await ticks(daemon, clock, 1)
    await fake.go_down()
    await ticks(daemon, clock, 1)
    fake.delete_from_queue(deleted)
    await fake.come_up()
    await ticks(daemon, clock, 2)
    assert await state(daemon, deleted) == ("lost", "left_unobserved")
    assert await state(daemon, kept) == ("queued", None)


async def test_a_socket_that_stayed_connected_proves_a_deletion(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    clock: Clock,
    sockets: Callable[[Daemon], Sockets],
) -> None:
    """Polls failed for a while, but the WebSocket stayed connected throughout: the server
    did not restart, so the job that left the queue meanwhile was deleted."""
    fake.pause()
    deleted, kept = fake.submit(), fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [deleted, kept]))
    watched = sockets(daemon)
    await watched.wait_for("connected")
    await ticks(daemon, clock, 1)
    fake.inject("http_500")  # every HTTP request; the socket is already open
    fake.delete_from_queue(deleted)
    await watched.wait_for("count", 1)
    await ticks(daemon, clock, 1)
    assert daemon.poller.health()["local"].up is False
    fake.clear_faults()
    await ticks(daemon, clock, 2)
    assert await state(daemon, deleted) == ("cancelled", "deleted_from_queue")
    assert await state(daemon, kept) == ("queued", None)
    assert "disconnected" not in [kind for kind, _ in watched.events]


async def test_the_first_connection_of_the_socket_is_no_gap(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    clock: Clock,
    sockets: Callable[[Daemon], Sockets],
) -> None:
    """Polls watched the server until the socket first connected: a job seen by them and
    deleted once the socket is up was watched throughout, as with websocket = false."""
    fake.pause()
    deleted = fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [deleted]))
    await ticks(daemon, clock, 1)  # no socket yet
    watched = sockets(daemon)
    await watched.wait_for("connected")
    fake.delete_from_queue(deleted)
    await watched.wait_for("count", 0)
    await ticks(daemon, clock, 2)
    assert await state(daemon, deleted) == ("cancelled", "deleted_from_queue")


async def test_a_job_seen_while_the_socket_was_down_after_a_drop_was_not_watched(
    tmp_path: Path,
    fake: FakeComfyUI,
    make_daemon: MakeDaemon,
    clock: Clock,
    sockets: Callable[[Daemon], Sockets],
) -> None:
    """Once the socket has dropped, polls alone do not show that the server stayed up: a
    job seen while it was down and gone before it reconnected is lost, cause unknown."""
    fake.pause()
    deleted, kept = fake.submit(), fake.submit()
    daemon = await make_daemon(config(tmp_path, fake, [deleted, kept]))
    watched = sockets(daemon)
    await watched.wait_for("connected")
    await fake.go_down()  # drops the socket; it reconnects a second or so later
    await watched.wait_for("disconnected")
    await fake.come_up()
    await ticks(daemon, clock, 1)  # sees both while the socket is down
    fake.delete_from_queue(deleted)
    await ticks(daemon, clock, 2)
    assert await state(daemon, deleted) == ("lost", "left_unobserved")
