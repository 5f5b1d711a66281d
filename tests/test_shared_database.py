"""Several daemons on one PostgreSQL database: each hook delivery claimed by one dispatcher
(``FOR UPDATE SKIP LOCKED``), a dead dispatcher's claims taken over once they expire, a
result recorded under a lost claim changing nothing; and change notification (``NOTIFY``)
waking the daemon and ``comfywatch wait`` long before their safety-net polls.

Runs against the local server on 127.0.0.1:5432 in a database of its own; skipped where
none answers (never on CI)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from comfywatch.cli.wait import JobWatch, Look, follow
from comfywatch.config import load_settings
from comfywatch.hooks import HookDispatcher
from comfywatch.service import Daemon
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, FinishedAttempt, NewJob, Store
from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .helpers import comfywatch
from .receiver import Receiver
from .test_hooks import webhook

HOOKS = """
[hooks.notify]
type = "webhook"
url = "{url}"
on = ["success"]
retry_schedule_s = [0.05]
"""


async def terminal_jobs(store: Store, count: int, *, now_s: float | None = None) -> list[int]:
    """``count`` successful jobs owing the ``notify`` hook; their ids."""
    now = time.time() if now_s is None else now_s
    await store.register(
        [NewJob("local", f"p{n}", {}, ("notify",), "t") for n in range(count)], now
    )
    ids = sorted(j.id for j in await store.active_jobs())
    changes = [Change(i, JobState.SUCCESS, Reason.FINISHED, deliveries=["notify"]) for i in ids]
    await store.record(changes, now)
    return ids


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Until ``check()`` holds (bounded: it never takes that long when things work)."""
    async with asyncio.timeout(30):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def no_pending(store: Store) -> bool:
    return await store.pending_delivery_count() == 0


def by_webhook_id(receiver: Receiver) -> Counter[str]:
    return Counter(headers["webhook-id"] for headers, _ in receiver.requests)


async def test_two_dispatchers_send_each_delivery_once(pg_url: str) -> None:
    """Two dispatchers, each with its own store (pool), empty one outbox together: every
    delivery is sent exactly once, and both took a share."""
    first, second = Store.open(pg_url), Store.open(pg_url)
    receiver = Receiver()
    await receiver.start()
    dispatchers = [
        HookDispatcher(store=s, hooks=webhook(receiver.url), concurrency=4, claim_size=5)
        for s in (first, second)
    ]
    stop = asyncio.Event()
    try:
        await first.migrate()
        await terminal_jobs(first, 120)
        runs = [asyncio.create_task(d.run(stop)) for d in dispatchers]
        await receiver.wait_until(lambda: len(receiver.requests) >= 120)
        await eventually(lambda: no_pending(first))
        stop.set()
        await asyncio.gather(*runs)
        rows = [d for d, _ in await first.deliveries()]
    finally:
        stop.set()
        for d in dispatchers:
            await d.close()
        await receiver.stop()
        await first.close()
        await second.close()
    assert by_webhook_id(receiver) == Counter({d.event_id: 1 for d in rows})
    assert {(d.state, d.attempts, d.claimed_by) for d in rows} == {
        (DeliveryState.DELIVERED, 1, None)
    }


async def test_a_result_recorded_under_a_lost_claim_changes_nothing(
    pg_url: str,
) -> None:
    """A claims a delivery; B sees it held until A's claim expires, then takes it over and
    records its attempt. A's late result (delivered) changes nothing: B's state stays. A
    dead delivery with a stale claim, queued again (``hooks retry``), is free at once."""
    a, b = Store.open(pg_url), Store.open(pg_url)
    try:
        await a.migrate()
        now = 1_800_000_000.0
        [job_id] = await terminal_jobs(a, 1, now_s=now)
        batch = await a.due_batch(now, 10, owner="a", claim_s=5)
        [(delivery, _)] = batch.deliveries
        assert (delivery.claimed_by, delivery.job_id) == ("a", job_id)
        held = await b.due_batch(now + 1, 10, owner="b", claim_s=5)
        assert held.deliveries == ()
        assert held.next_at == datetime.fromtimestamp(now + 5, tz=UTC)  # A's claim ends
        [(taken, _)] = (await b.due_batch(now + 6, 10, owner="b", claim_s=5)).deliveries
        assert (taken.id, taken.claimed_by) == (delivery.id, "b")

        retry = FinishedAttempt(
            delivery.id, 1, DeliveryState.PENDING, now + 7, now + 60, 500, "x", None
        )
        late = FinishedAttempt(
            delivery.id, 1, DeliveryState.DELIVERED, now + 8, None, 200, None, None
        )
        assert await a.record_attempts([late], owner="a") == 0  # B holds it
        assert await b.record_attempts([retry], owner="b") == 1
        assert await a.record_attempts([late], owner="a") == 0  # nobody holds it now
        [(row, _)] = await a.deliveries()
        assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.PENDING, 1, 500)
        assert (row.claimed_by, row.claimed_until) == (None, None)

        async with a.engine.begin() as conn:  # dead, with the claim of a daemon that died
            await conn.execute(
                text(
                    "UPDATE hook_deliveries SET state = 'dead', claimed_by = 'gone',"
                    " claimed_until = :until"
                ),
                {"until": datetime.fromtimestamp(now + 3600, tz=UTC)},
            )
        assert await b.requeue_deliveries([delivery.id], now_s=now + 10) == {
            delivery.id: DeliveryState.DEAD
        }
        [(again, _)] = (await a.due_batch(now + 10, 10, owner="a", claim_s=5)).deliveries
        assert (again.id, again.claimed_by, again.attempts) == (delivery.id, "a", 0)
    finally:
        await a.close()
        await b.close()


DISPATCHER_SCRIPT = """
import asyncio, sys
from comfywatch.hooks import HookDispatcher
from comfywatch.store import Store
from tests.test_hooks import webhook

async def main() -> None:
    store = Store.open(sys.argv[1])
    dispatcher = HookDispatcher(
        store=store, hooks=webhook(sys.argv[2], timeout_s=60), concurrency=1,
        owner="doomed", claim_s=float(sys.argv[3]),
    )
    await dispatcher.run(asyncio.Event())

asyncio.run(main())
"""


async def test_a_killed_dispatcher_leaves_claims_another_takes_over(
    pg_url: str,
    tmp_path: Path,
) -> None:
    """A dispatcher in a child process is SIGKILLed while its attempt hangs: the delivery
    stays claimed by it until the claim expires, then another dispatcher sends it (the same
    webhook-id: at least once) and records it."""
    store = Store.open(pg_url)
    receiver = Receiver(hang=True)
    await receiver.start()
    survivor = HookDispatcher(store=store, hooks=webhook(receiver.url), concurrency=1)
    stop = asyncio.Event()
    claim_s = 3.0
    script = tmp_path / "dispatch.py"
    script.write_text(textwrap.dedent(DISPATCHER_SCRIPT))
    child = None
    try:
        await store.migrate()
        await terminal_jobs(store, 1)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            pg_url,
            receiver.url,
            str(claim_s),
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        await receiver.wait_until(lambda: len(receiver.requests) == 1)
        child.send_signal(signal.SIGKILL)
        await child.wait()
        [(row, _)] = await store.deliveries()
        assert (row.state, row.attempts, row.claimed_by) == (DeliveryState.PENDING, 0, "doomed")
        assert row.claimed_until is not None
        receiver.hang = False
        run = asyncio.create_task(survivor.run(stop))
        await receiver.wait_until(lambda: len(receiver.requests) == 2)
        taken_over_at = time.time()
        await eventually(lambda: no_pending(store))
        stop.set()
        await run
        [(done, _)] = await store.deliveries()
    finally:
        stop.set()
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await survivor.close()
        await receiver.stop()
        await store.close()
    assert taken_over_at >= row.claimed_until.timestamp()  # not before the claim expired
    [(first, _), (second, _)] = receiver.requests
    assert first["webhook-id"] == second["webhook-id"] == done.event_id
    assert (done.state, done.attempts, done.claimed_by) == (DeliveryState.DELIVERED, 1, None)


async def test_notifications_wake_the_daemon_before_its_poll(
    pg_url: str,
    tmp_path: Path,
) -> None:
    """The daemon polls every hour (its safety net), yet a job registered by another
    process is polled, recorded and its hook sent at once, and a delivery queued again by
    ``comfywatch hooks retry`` goes out at once: both heard through LISTEN. A listening
    connection that is terminated is made again, and heard through."""
    fake = FakeComfyUI()
    await fake.start()
    receiver = Receiver([410])  # the first attempt: dead at once
    await receiver.start()
    config = write_config(
        tmp_path,
        {"local": fake.url},
        daemon={"database": pg_url, "poll_interval_s": 3600},
        extra=HOOKS.format(url=receiver.url),
    )
    other = Store.open(pg_url)
    store = Store.open(pg_url)
    daemon = Daemon(load_settings(config), store=store)
    run = None
    try:
        await other.migrate()
        run = asyncio.create_task(daemon.run())
        await eventually(lambda: listening(pg_url))
        pid = fake.submit()
        await fake.wait_finished(pid)
        await other.register([NewJob("local", pid, {}, ("notify",), "elsewhere")], time.time())
        await receiver.wait_until(lambda: len(receiver.requests) == 1)

        async def dead_one() -> bool:
            return bool(await other.deliveries(states=[DeliveryState.DEAD]))

        await eventually(dead_one)
        [(dead, _)] = await other.deliveries(states=[DeliveryState.DEAD])

        await terminate_listeners(pg_url)
        await eventually(lambda: listening(pg_url))
        code, out, err = await comfywatch("hooks", "retry", str(dead.id), "--config", str(config))
        assert (code, out) == (0, "1 delivery queued again\n"), err
        await receiver.wait_until(lambda: len(receiver.requests) == 2)
    finally:
        daemon.request_stop()
        if run is not None:
            async with asyncio.timeout(30):
                await run
        await other.close()
        await store.close()
        await receiver.stop()
        await fake.stop()
    [(first, _), (second, _)] = receiver.requests
    assert first["webhook-id"] == second["webhook-id"]


async def listening(url: str) -> bool:
    """Whether a connection of ``url``'s database LISTENs (waits for notifications)."""
    return bool(await listener_pids(url))


async def listener_pids(url: str) -> list[int]:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def terminate_listeners(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=5)
    try:
        for pid in await listener_pids(url):
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def test_wait_returns_on_a_notification(pg_url: str, tmp_path: Path) -> None:
    """``wait`` (its looks) on PostgreSQL with an hour between safety-net looks: the job
    becoming terminal is heard, and the wait ends long before its timeout."""
    store = Store.open(pg_url)
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, daemon={"database": pg_url})
    try:
        await store.migrate()
        await store.register([NewJob("local", "p1", {}, (), "t")], time.time())
        [job] = await store.active_jobs()
        looks: list[Look] = []
        looked = threading.Event()

        def on_look(look: Look) -> None:
            looks.append(look)
            looked.set()

        watch = JobWatch(load_settings(config))
        waiting = asyncio.create_task(
            asyncio.to_thread(
                follow, watch, ["p1"], timeout_s=60, on_look=on_look, listen_poll_s=3600
            )
        )
        await asyncio.to_thread(looked.wait, 30)
        await store.record([Change(job.id, JobState.SUCCESS, Reason.FINISHED)], time.time())
        look, timed_out = await waiting
    finally:
        await store.close()
    assert not timed_out
    assert look.succeeded("p1")
    assert not looks[0].ended("p1")


async def test_held_claims_are_renewed_and_released_on_stop(pg_url: str) -> None:
    """A's attempt hangs past its claim's first expiry: the claim is renewed, so B (running
    all along) never takes it. The deliveries A claimed but never started are released
    when A stops: B sends them without waiting for their claims to expire."""
    a_store, b_store = Store.open(pg_url), Store.open(pg_url)
    receiver = Receiver(hang=True)
    await receiver.start()
    a = HookDispatcher(
        store=a_store,
        hooks=webhook(receiver.url, timeout_s=60),
        concurrency=1,
        owner="a",
        claim_s=1.0,
    )
    b = HookDispatcher(store=b_store, hooks=webhook(receiver.url), concurrency=1, owner="b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    try:
        await a_store.migrate()
        await terminal_jobs(a_store, 3)
        runs.append(asyncio.create_task(a.run(stop_a)))
        await receiver.wait_until(lambda: len(receiver.requests) == 1)
        claims = {d.id: d for d, _ in await a_store.deliveries()}
        assert {d.claimed_by for d in claims.values()} == {"a"}
        first_until = max(d.claimed_until for d in claims.values() if d.claimed_until)
        runs.append(asyncio.create_task(b.run(stop_b)))

        async def renewed_twice() -> bool:
            rows = [d for d, _ in await a_store.deliveries()]
            return all(
                d.claimed_by == "a"
                and d.claimed_until is not None
                and d.claimed_until.timestamp() > first_until.timestamp() + 1.0
                for d in rows
            )

        await eventually(renewed_twice)
        assert len(receiver.requests) == 1  # B took nothing A holds
        receiver.hang = False
        stop_a.set()
        receiver.release.set()  # A's attempt ends; its 2 others are released
        await runs[0]
        after_a = [d for d, _ in await a_store.deliveries()]
        assert "a" not in {d.claimed_by for d in after_a}  # released, or recorded
        await receiver.wait_until(lambda: len(receiver.requests) == 3)
        await eventually(lambda: no_pending(a_store))
        stop_b.set()
        await runs[1]
        rows = [d for d, _ in await a_store.deliveries()]
    finally:
        stop_a.set()
        stop_b.set()
        receiver.release.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await a.close()
        await b.close()
        await receiver.stop()
        await a_store.close()
        await b_store.close()
    assert by_webhook_id(receiver) == Counter({d.event_id: 1 for d in rows})
    assert {(d.state, d.claimed_by) for d in rows} == {(DeliveryState.DELIVERED, None)}
