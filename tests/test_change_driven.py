"""What tracking costs a server: requests per route with the WebSocket up, and without it.

The daemon runs its real loop in this process against the fake ComfyUI, which counts each
client's requests by route. Every wait is on a condition (a state in the database, a
request seen by the server), never on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from comfywatch.config import load_settings
from comfywatch.service import Daemon
from comfywatch.states import JobState
from comfywatch.store import JobFilter, Store
from comfywatch.testing import FakeComfyUI

from .conftest import write_config

CLIENT = "comfywatch"


async def until(condition: Callable[[], object], timeout_s: float = 20.0) -> None:
    """Wait for ``condition``: the fake's counters and the database have no change event
    to wait on, so this looks every 10 ms."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0.01)


class Running:
    """A daemon running its loop in a task."""

    def __init__(self, daemon: Daemon, task: asyncio.Task[int]) -> None:
        self.daemon = daemon
        self.task = task

    async def states(self) -> dict[str, JobState]:
        rows = await self.daemon.store.jobs(JobFilter())
        return {row.job.prompt_id: row.job.state for row in rows}

    async def until_states(self, wanted: dict[str, JobState], timeout_s: float = 20) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                got = await self.states()
                if all(got.get(pid) is state for pid, state in wanted.items()):
                    return
                await asyncio.sleep(0.02)


StartDaemon = Callable[[Path], Awaitable[Running]]


@pytest.fixture
async def run_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    started: list[Running] = []

    async def start(config: Path) -> Running:
        settings = load_settings(config)
        daemon = Daemon(settings, store=Store.open(settings.daemon.database_url))
        task = asyncio.create_task(daemon.run())
        await until(lambda: daemon.status.ready)
        running = Running(daemon, task)
        started.append(running)
        return running

    yield start
    for running in started:
        running.daemon.request_stop()
        assert await running.task == 0
        await running.daemon.store.close()


def requests(fake: FakeComfyUI, route: str) -> int:
    return fake.stats.total(CLIENT, route).requests


async def test_many_waiting_cost_one_queue_read(
    tmp_path: Path, fake: FakeComfyUI, run_daemon: StartDaemon
) -> None:
    """200 tracked prompts wait; others come and go. After start-up the queue is not read
    again: other prompts finishing cost a history tail each, nothing per tracked prompt."""
    fake.hold_running()
    blocker = fake.submit()
    waiting = [fake.submit() for _ in range(200)]
    jobs = [{"server": "local", "prompt_id": pid} for pid in [blocker, *waiting]]
    daemon = await run_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    await daemon.until_states(dict.fromkeys(waiting, JobState.QUEUED))
    await until(lambda: requests(fake, "GET /history") >= 1)  # the socket's first look
    queue_reads = requests(fake, "GET /queue")
    tails = requests(fake, "GET /history")

    # An untracked prompt jumps the line and finishes: one tail shows it is not ours.
    fake.release()
    await until(lambda: requests(fake, "GET /history") > tails)
    assert requests(fake, "GET /queue") == queue_reads == 1
    assert requests(fake, "GET /history/{id}") == 0
    await daemon.until_states({blocker: JobState.SUCCESS})
    assert requests(fake, "GET /queue") == 1


async def test_one_finish_costs_one_tail_read(
    tmp_path: Path, fake: FakeComfyUI, run_daemon: StartDaemon
) -> None:
    fake.hold_running()
    pid = fake.submit()
    others = [fake.submit() for _ in range(20)]
    jobs = [{"server": "local", "prompt_id": p} for p in [pid, *others]]
    daemon = await run_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    await daemon.until_states(dict.fromkeys(others, JobState.QUEUED))
    await until(lambda: requests(fake, "GET /history") >= 1)
    tails = requests(fake, "GET /history")
    fake.pause()  # the next prompt stays pending: exactly one finishes
    fake.release()
    await daemon.until_states({pid: JobState.SUCCESS})
    assert requests(fake, "GET /history") == tails + 1
    assert requests(fake, "GET /queue") == 1
    assert requests(fake, "GET /history/{id}") == 0


async def test_a_deleted_prompt_is_found_by_one_queue_read(
    tmp_path: Path, fake: FakeComfyUI, run_daemon: StartDaemon
) -> None:
    """A drop that no history entry explains reads the queue (twice: gone is confirmed)."""
    fake.pause()
    kept, deleted = fake.submit(), fake.submit()
    jobs = [{"server": "local", "prompt_id": p} for p in (kept, deleted)]
    daemon = await run_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    await daemon.until_states({kept: JobState.QUEUED, deleted: JobState.QUEUED})
    await until(lambda: requests(fake, "GET /history") >= 1)
    fake.delete_from_queue([deleted])
    await daemon.until_states({deleted: JobState.CANCELLED})
    assert requests(fake, "GET /queue") == 3  # start-up, the unexplained drop, the confirmation
    assert (await daemon.states())[kept] is JobState.QUEUED


async def test_without_the_socket_a_probe_each_interval_finds_the_finish(
    tmp_path: Path, fake: FakeComfyUI, run_daemon: StartDaemon
) -> None:
    fake.hold_running()
    pid = fake.submit()
    server = {"url": fake.url, "websocket": False}
    config = write_config(tmp_path, {"local": server}, [{"server": "local", "prompt_id": pid}])
    daemon = await run_daemon(config)
    await until(lambda: requests(fake, "GET /prompt") >= 3)
    tails = requests(fake, "GET /history")  # the first probe's baseline may read one
    assert requests(fake, "GET /queue") == 1 and tails <= 1
    fake.release()
    await daemon.until_states({pid: JobState.SUCCESS})
    assert requests(fake, "GET /history") == tails + 1
    assert requests(fake, "GET /queue") == 1
    assert requests(fake, "GET /history/{id}") == 0


async def test_a_silent_socket_falls_back_to_polling(
    tmp_path: Path, fake: FakeComfyUI, run_daemon: StartDaemon
) -> None:
    """The socket stays open but no frame arrives: the probes see the count move, the
    daemon stops trusting the socket and finds the finish by polling."""
    fake.hold_running()
    pid = fake.submit()
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid}],
        daemon={"poll_interval_s": 0.05},
    )
    daemon = await run_daemon(config)
    await until(lambda: requests(fake, "GET /history") >= 1)
    fake.mute_sockets()
    await until(lambda: requests(fake, "GET /prompt") >= 1, timeout_s=30)  # a stall check
    fake.release()
    # Two probes, a stall check interval apart, must disagree with the silent socket.
    await daemon.until_states({pid: JobState.SUCCESS}, timeout_s=60)
    assert requests(fake, "GET /prompt") >= 2
