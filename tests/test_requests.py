"""What the daemon asks of a server, counted per route by the fake ComfyUI.

The whole queue (``GET /queue``) is read at start and then only when something calls for
it; a finish costs one history tail; a quiet server with many pending prompts costs
nothing but (without the socket) a count probe per poll interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from comfywatch.service import Daemon
from comfywatch.store import JobFilter
from comfywatch.testing import FakeComfyUI

from .conftest import write_config

MakeDaemon = Callable[[Path], Awaitable[Daemon]]
PENDING = 50


async def states(daemon: Daemon) -> dict[str, str]:
    return {r.job.prompt_id: r.job.state for r in await daemon.store.jobs(JobFilter())}


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


def counts(fake: FakeComfyUI) -> dict[str, int]:
    """Requests per route from the daemon (its User-Agent), the socket aside."""
    routes = fake.stats.routes("comfywatch")
    return {route: cost.requests for route, cost in routes.items() if route != "GET /ws"}


async def ticks(daemon: Daemon, n: int) -> None:
    """Wait until the daemon has run ``n`` more ticks."""
    start = daemon.metrics.ticks._value.get()

    async def done() -> bool:
        return bool(daemon.metrics.ticks._value.get() >= start + n)

    await until(done)


async def settled_daemon(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, pids: list[str], websocket: bool
) -> tuple[Daemon, asyncio.Task[int]]:
    """A running daemon whose jobs are all queued or running, with the socket connected."""
    server = {"url": fake.url, "websocket": websocket}
    jobs: list[dict[str, Any]] = [{"server": "local", "prompt_id": p} for p in pids]
    daemon = await make_daemon(write_config(tmp_path, {"local": server}, jobs))
    runner = asyncio.create_task(daemon.run())

    async def ready() -> bool:
        return set((await states(daemon)).values()) <= {"queued", "running"}

    await until(ready)
    if websocket:
        await fake.wait_requests("GET /ws")
    await ticks(daemon, 3)
    return daemon, runner


@pytest.mark.parametrize("websocket", [True, False], ids=["socket", "no-socket"])
async def test_a_quiet_server_with_many_pending_is_not_read_again(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, websocket: bool
) -> None:
    """After start, no ``GET /queue`` and no history: the count alone (from the socket, or
    one ``GET /prompt`` per poll interval without it)."""
    fake.pause()
    pids = [fake.submit() for _ in range(PENDING)]
    daemon, runner = await settled_daemon(tmp_path, fake, make_daemon, pids, websocket)
    try:
        fake.stats.reset()
        await ticks(daemon, 20)
        seen = counts(fake)
        assert set(seen) <= {"GET /prompt"}
        if not websocket:
            assert seen["GET /prompt"] >= 19  # one per full tick
    finally:
        daemon.request_stop()
        assert await runner == 0


@pytest.mark.parametrize("websocket", [True, False], ids=["socket", "no-socket"])
async def test_one_finish_costs_one_history_tail(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, websocket: bool
) -> None:
    """One prompt of many finishes: one ``GET /history?max_items=K`` records it; neither
    the queue nor any per-prompt history is read."""
    first = fake.submit(run_time_s=600)
    await fake.wait_running(first)
    fake.pause()  # the others wait
    pids = [first, *(fake.submit() for _ in range(PENDING))]
    daemon, runner = await settled_daemon(tmp_path, fake, make_daemon, pids, websocket)
    try:
        fake.stats.reset()
        fake.interrupt(first)

        async def recorded() -> bool:
            return (await states(daemon))[first] == "interrupted"

        await until(recorded)
        seen = counts(fake)
        assert seen.get("GET /history") == 1
        assert "GET /queue" not in seen and "GET /history/{id}" not in seen
    finally:
        daemon.request_stop()
        assert await runner == 0


async def test_a_delete_is_an_unexplained_drop_and_reads_the_queue_once(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A deleted prompt leaves no history entry: the tail does not explain the drop, so
    the queue is read; a second read confirms the absence."""
    fake.pause()
    pids = [fake.submit() for _ in range(5)]
    daemon, runner = await settled_daemon(tmp_path, fake, make_daemon, pids, True)
    try:
        fake.stats.reset()
        fake.delete_from_queue([pids[2]])

        async def cancelled() -> bool:
            return (await states(daemon))[pids[2]] == "cancelled"

        await until(cancelled)
        seen = counts(fake)
        assert seen["GET /queue"] == 2  # the unexplained drop, then the confirmation
        assert seen["GET /history"] == 1
        others = await states(daemon)
        assert {others[p] for p in pids if p != pids[2]} == {"queued"}
    finally:
        daemon.request_stop()
        assert await runner == 0
