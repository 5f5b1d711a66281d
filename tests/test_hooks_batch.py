"""The hook dispatcher at volume: deliveries claimed in batches, attempts in per-hook lanes,
outcomes recorded in batches. Real SQLite files and real aiohttp receivers on 127.0.0.1; the
loop runs on the real clock with tiny schedules, and tests wait on events, never on time.

The invariant checked throughout: every request a receiver saw is counted in its delivery's
``attempts`` (nothing sent and forgotten, nothing sent twice for one recorded attempt).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from comfywatch.clock import SYSTEM_CLOCK
from comfywatch.clock import Clock as ClockLike
from comfywatch.config import HookSettings, WebhookHookSettings
from comfywatch.hooks import HookDispatcher
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, NewJob, Store, engine

from .conftest import Clock
from .receiver import WAIT_S, Receiver
from .test_hooks import webhook


class LogWatch:
    """A structlog processor that counts events as they are logged, to wait for them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Event()

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        self.counts[str(event["event"])] += 1
        self._changed.set()
        return event

    async def wait_for(self, event: str, count: int = 1) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.counts[event] < count:
                self._changed.clear()
                await self._changed.wait()


@contextmanager
def watch_logs() -> Iterator[LogWatch]:
    """Count log events (and keep them off the output) within the block."""
    watch = LogWatch()
    with structlog.testing.capture_logs():
        processors = structlog.get_config()["processors"]
        processors.insert(0, watch)
        structlog.configure(processors=processors)
        yield watch


@pytest.fixture
async def dispatchers(store: Store) -> AsyncIterator[Callable[..., HookDispatcher]]:
    made: list[HookDispatcher] = []

    def make(
        hooks: dict[str, HookSettings], *, clock: ClockLike = SYSTEM_CLOCK, **kwargs: Any
    ) -> HookDispatcher:
        dispatcher = HookDispatcher(store=store, hooks=hooks, clock=clock, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.close()


def hook(name: str, url: str, *, timeout_s: float = 5.0) -> WebhookHookSettings:
    return WebhookHookSettings(
        name=name,
        type="webhook",
        url=url,
        secret=None,
        on=frozenset({JobState.SUCCESS}),
        timeout_s=timeout_s,
        headers={},
        retry_schedule_s=(0.0, 0.0),
    )


async def finished_jobs(
    store: Store, count: int, hooks: Sequence[str] = ("notify",), *, now_s: float | None = None
) -> None:
    """``count`` jobs recorded as successes in one batch (at ``now_s``), owing ``hooks``."""
    now_s = time.time() if now_s is None else now_s
    new = [NewJob("local", f"p{n:04}", {}, tuple(hooks), "t") for n in range(count)]
    await store.register(new, now_s)
    changes = [
        Change(j.id, JobState.SUCCESS, Reason.FINISHED, deliveries=list(hooks))
        for j in await store.active_jobs()
    ]
    assert len(await store.record(changes, now_s)) == count


async def attempts_by_event(store: Store) -> Counter[str]:
    return Counter({d.event_id: d.attempts for d, _ in await store.deliveries()})


def requests_by_event(*receivers: Receiver) -> Counter[str]:
    return Counter(h["webhook-id"] for r in receivers for h, _ in r.requests)


async def run_until(dispatcher: HookDispatcher, done: Callable[[], Any]) -> None:
    """run() until the awaitable ``done()`` returns, then stop it."""
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    try:
        await done()
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await runner


# -- batches --------------------------------------------------------------------------


async def test_run_once_sends_more_than_a_claim_each_exactly_once(
    store: Store, receivers: Any, dispatchers: Any
) -> None:
    """Far more due deliveries than one claim holds: each is sent once and recorded once,
    never more than ``concurrency`` at once."""
    receiver = await receivers()
    await finished_jobs(store, 60)
    dispatcher = dispatchers(webhook(receiver.url), concurrency=3, claim_size=7)
    assert await dispatcher.run_once() == 60
    rows = [d for d, _ in await store.deliveries()]
    assert {(d.state, d.attempts) for d in rows} == {(DeliveryState.DELIVERED, 1)}
    assert requests_by_event(receiver) == Counter({d.event_id: 1 for d in rows})
    assert receiver.max_active <= 3


async def test_run_retries_within_batches_and_counts_every_request(
    store: Store, receivers: Any, dispatchers: Any
) -> None:
    """run() with failures mixed in (retried at once): every request the receiver saw is an
    attempt recorded on its delivery, and each delivery ends delivered."""
    receiver = await receivers([500] * 15)
    await finished_jobs(store, 50)
    dispatcher = dispatchers({"notify": hook("notify", receiver.url)}, concurrency=4, claim_size=6)
    with watch_logs() as logs:
        await run_until(dispatcher, lambda: logs.wait_for("hook_delivered", 50))
        assert logs.counts["hook_retry_scheduled"] == 15
    rows = [d for d, _ in await store.deliveries()]
    assert {d.state for d in rows} == {DeliveryState.DELIVERED}
    assert requests_by_event(receiver) == await attempts_by_event(store)
    assert sum(d.attempts for d in rows) == 65


async def test_run_once_attempts_a_delivery_due_again_only_once(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """A failure retried after 0 s is due again within the pass (the clock stands still):
    run_once leaves it to the next pass."""
    receiver = await receivers([500] * 10)
    await finished_jobs(store, 10, now_s=clock())
    dispatcher = dispatchers({"notify": hook("notify", receiver.url)}, concurrency=2, clock=clock)
    assert await dispatcher.run_once() == 10
    assert set((await attempts_by_event(store)).values()) == {1}
    assert await dispatcher.run_once() == 10
    assert requests_by_event(receiver) == await attempts_by_event(store)


# -- a busy database ----------------------------------------------------------------------


async def test_results_the_database_cannot_take_are_kept_not_sent_again(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, receivers: Any
) -> None:
    """Another connection holds the write lock while a burst of deliveries is sent: their
    results cannot be recorded, are kept, and are recorded once the lock is released. No
    delivery is sent twice."""
    monkeypatch.setattr(engine, "BUSY_TIMEOUT_MS", 50)  # give up on the lock quickly
    store = Store.open("sqlite:///" + str(db_path))
    receiver = await receivers()
    dispatcher = HookDispatcher(
        store=store, hooks=webhook(receiver.url), concurrency=4, claim_size=8
    )
    try:
        await store.migrate()
        await finished_jobs(store, 30)
        with (
            closing(sqlite3.connect(db_path, isolation_level=None)) as locker,
            watch_logs() as logs,
        ):
            locker.execute("BEGIN IMMEDIATE")  # the write lock, until the rollback below

            async def busy_then_released() -> None:
                await receiver.wait_until(lambda: len(receiver.requests) == 30)
                await logs.wait_for("hook_result_not_recorded", 2)  # failed, and failed again
                recorded = locker.execute("SELECT sum(attempts) FROM hook_deliveries")
                assert recorded.fetchone() == (0,)
                locker.execute("ROLLBACK")
                await logs.wait_for("hook_delivered", 30)

            await run_until(dispatcher, busy_then_released)
        rows = [d for d, _ in await store.deliveries()]
    finally:
        await dispatcher.close()
        await store.close()
    assert {(d.state, d.attempts) for d in rows} == {(DeliveryState.DELIVERED, 1)}
    assert requests_by_event(receiver) == Counter({d.event_id: 1 for d in rows})


# -- lanes ----------------------------------------------------------------------------------


async def test_a_slow_receiver_does_not_hold_up_another_hook(
    store: Store, receivers: Any, dispatchers: Any
) -> None:
    """Every slot the slow hook may use is taken by a hanging request, and deliveries of
    another hook still go out; the slow one never has more than its own slots."""
    slow = await receivers(hang=True)
    fast = await receivers()
    await finished_jobs(store, 6, hooks=("slow", "fast"))
    hooks: dict[str, HookSettings] = {
        "slow": hook("slow", slow.url, timeout_s=WAIT_S),
        "fast": hook("fast", fast.url),
    }
    dispatcher = dispatchers(hooks, concurrency=2, claim_size=3)

    with watch_logs() as logs:

        async def fast_done_while_slow_hangs() -> None:
            await slow.wait_until(lambda: slow.active == 2)
            await fast.wait_until(lambda: len(fast.requests) == 6)
            await logs.wait_for("hook_delivered", 6)  # the fast ones, recorded too
            assert (slow.active, len(slow.requests)) == (2, 2)  # still hanging
            slow.release.set()
            await logs.wait_for("hook_delivered", 12)

        await run_until(dispatcher, fast_done_while_slow_hangs)
    assert slow.max_active == 2
    assert requests_by_event(slow, fast) == await attempts_by_event(store)


async def test_a_slow_hook_does_not_hold_up_another_hook_on_the_same_host(
    db_path: Path,
) -> None:
    """Two hooks on one host and port, one path hanging: the other's deliveries still go
    out (no connection limit shared by the host)."""
    slow, fast = Receiver(hang=True), Receiver()
    app = web.Application()
    app.router.add_post("/slow", slow._handle)
    app.router.add_post("/fast", fast._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    db = Store.open("sqlite:///" + str(db_path))
    hooks: dict[str, HookSettings] = {
        "slow": hook("slow", f"http://{host}:{port}/slow", timeout_s=WAIT_S),
        "fast": hook("fast", f"http://{host}:{port}/fast"),
    }
    dispatcher = HookDispatcher(store=db, hooks=hooks, concurrency=2, claim_size=4)
    try:
        await db.migrate()
        await finished_jobs(db, 5, hooks=("slow", "fast"))
        with watch_logs() as logs:

            async def fast_done_while_slow_hangs() -> None:
                await slow.wait_until(lambda: slow.active == 2)
                await logs.wait_for("hook_delivered", 5)
                assert (len(fast.requests), slow.active, len(slow.requests)) == (5, 2, 2)
                slow.release.set()
                await logs.wait_for("hook_delivered", 10)

            await run_until(dispatcher, fast_done_while_slow_hangs)
        assert requests_by_event(slow, fast) == await attempts_by_event(db)
    finally:
        slow.release.set()
        await dispatcher.close()
        await db.close()
        await runner.cleanup()


async def test_stop_lets_attempts_in_flight_finish_and_records_them(
    store: Store, receivers: Any, dispatchers: Any
) -> None:
    """A stop while attempts hang: they finish and are recorded before run() returns; the
    deliveries claimed but not started stay pending, untouched."""
    receiver = await receivers(hang=True)
    await finished_jobs(store, 20)
    dispatcher = dispatchers(webhook(receiver.url), concurrency=4, claim_size=10)
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await receiver.wait_until(lambda: receiver.active == 4)
    stop.set()
    receiver.release.set()
    async with asyncio.timeout(WAIT_S):
        await runner
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("hook-")]
    rows = [d for d, _ in await store.deliveries()]
    sent = requests_by_event(receiver)
    assert len(sent) == 4
    assert {d.event_id for d in rows if d.state is DeliveryState.DELIVERED} == set(sent)
    assert {(d.state, d.attempts) for d in rows if d.event_id not in sent} == {
        (DeliveryState.PENDING, 0)
    }
