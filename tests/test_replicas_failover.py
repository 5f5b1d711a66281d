"""Three ``comfywatch run`` replicas on one PostgreSQL database, SIGKILLed in turn while
several fake ComfyUI servers run a few hundred prompts: servers are taken over within the
lease time, every job ends terminal exactly once, every owed hook arrives (all requests
for one job under one ``webhook-id``), and no server is ever polled by two replicas at
once (the fakes log each request with the replica id its ``User-Agent`` carries). And a
replica cut off from the database stops polling before its lease expires."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from comfywatch.testing import FakeComfyUI

from .conftest import jobs_toml, toml_value, write_config
from .daemon_proc import DaemonProcess
from .receiver import Receiver
from .tcp_proxy import TcpProxy
from .test_replicas import pg  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

SERVERS = 4
JOBS_PER_ROUND = 25  # per server
ROUNDS = 3
LEASE_S = 3.0
WAIT_S = 60.0  # bounds on waits for conditions; never reached when things work


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.1)


async def _connect(url: str) -> Any:
    import asyncpg

    return await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=10)


def _drop_in(folder: Path, name: str, jobs: list[dict[str, Any]]) -> None:
    tmp = folder / "jobs.d" / f".{name}.tmp"
    tmp.write_text(jobs_toml(jobs))
    tmp.rename(folder / "jobs.d" / f"{name}.toml")


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeComfyUI]]:
    servers = {f"gpu-{i}": FakeComfyUI(run_time_s=0.02) for i in range(SERVERS)}
    for fake in servers.values():
        await fake.start()
    try:
        yield servers
    finally:
        for fake in servers.values():
            await fake.stop()


def _config(tmp_path: Path, url: str, fakes: dict[str, FakeComfyUI], hook_url: str) -> Path:
    extra = f"""
[hooks.notify]
type = "webhook"
url = {toml_value(hook_url)}
retry_schedule_s = [0.2, 0.5, 1, 2]
"""
    return write_config(
        tmp_path,
        {name: fake.url for name, fake in fakes.items()},
        daemon={
            "database": url,
            "replicas": True,
            "lease_s": LEASE_S,
            "poll_interval_s": 0.1,
            "default_hooks": ["notify"],
        },
        extra=extra,
    )


async def _start(config: Path) -> tuple[DaemonProcess, str]:
    proc = await DaemonProcess.start(config)
    index = await proc.wait_event("daemon_started")
    return proc, str(proc.events[index]["replica"])


def _overlaps(fakes: dict[str, FakeComfyUI]) -> list[str]:
    """Requests to one server by two replicas at once: one started before another
    replica's earlier request had been answered."""
    problems = []
    for name, fake in fakes.items():
        finished: dict[str, tuple[float, str]] = {}
        for poll in fake.stats.polls():
            for client, (until_s, route) in finished.items():
                if client != poll.client and until_s > poll.started_s:
                    problems.append(
                        f"{name}: {poll.client} {poll.route} at {poll.started_s:.3f} while "
                        f"{client} {route} ran until {until_s:.3f}"
                    )
            last = finished.get(poll.client, (0.0, ""))[0]
            if poll.finished_s > last:
                finished[poll.client] = (poll.finished_s, poll.route)
    return problems


async def test_replicas_take_over_from_killed_ones(
    pg: str,  # noqa: F811
    tmp_path: Path,
    fakes: dict[str, FakeComfyUI],
) -> None:
    receiver = Receiver()
    await receiver.start()
    config = _config(tmp_path, pg, fakes, receiver.url)
    procs: list[DaemonProcess] = []
    db = await _connect(pg)
    outcome: dict[str, str] = {}
    try:
        live: dict[str, DaemonProcess] = {}
        dead: set[str] = set()
        for proc, replica in await asyncio.gather(*(_start(config) for _ in range(3))):
            procs.append(proc)
            live[replica] = proc

        async def leases_held_by_live() -> bool:
            rows = await db.fetch(
                "SELECT server, owner FROM server_leases WHERE expires_at > clock_timestamp()"
            )
            # (a replica restarted since may hold some: any but the dead count)
            held = {r["server"] for r in rows if r["owner"] is not None and r["owner"] not in dead}
            return held == set(fakes)

        await _eventually(leases_held_by_live, "every server leased", WAIT_S)
        for round_ in range(ROUNDS):
            jobs = []
            for name, fake in fakes.items():
                for _ in range(JOBS_PER_ROUND):
                    prompt_id = fake.submit(outcome="success")
                    outcome[prompt_id] = "success"
                    jobs.append({"server": name, "prompt_id": prompt_id})
            _drop_in(tmp_path, f"round-{round_}", jobs)
            done_before = len(outcome) - len(jobs)

            async def some_finished(at_least: int = done_before + 10) -> bool:
                count = await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'success'")
                return bool(count >= at_least)

            await _eventually(some_finished, "jobs of the round finish", WAIT_S)
            victim = sorted(live)[round_ % len(live)]
            killed = live.pop(victim)
            dead.add(victim)
            assert await killed.kill() == -signal.SIGKILL
            killed_at = time.monotonic()
            # Restarted at once (it joins once started, taking its share back); meanwhile
            # the others take its servers over within the lease time (and a heartbeat),
            # plus slack for a loaded machine.
            restart = asyncio.ensure_future(_start(config))
            try:
                await _eventually(leases_held_by_live, "servers taken over", 2 * LEASE_S + 10)
                taken_after_s = time.monotonic() - killed_at
                assert taken_after_s < 2 * LEASE_S + 10
            finally:
                proc, replica = await restart
                procs.append(proc)
            live[replica] = proc

        async def all_done() -> bool:
            open_jobs = await db.fetchval(
                "SELECT count(*) FROM jobs WHERE state IN ('registered', 'queued', 'running')"
            )
            pending = await db.fetchval(
                "SELECT count(*) FROM hook_deliveries WHERE state <> 'delivered'"
            )
            total = await db.fetchval("SELECT count(*) FROM jobs")
            return bool(total == len(outcome) and open_jobs == 0 and pending == 0)

        await _eventually(all_done, "every job terminal, every hook delivered", WAIT_S)
        for proc in live.values():
            proc.send(signal.SIGTERM)
        for proc in live.values():
            assert await proc.wait() == 0, proc.describe()

        # -- every job terminal exactly once --------------------------------------------
        rows = await db.fetch("SELECT prompt_id, state FROM jobs")
        assert {r["prompt_id"]: r["state"] for r in rows} == outcome
        finished = Counter(e["prompt_id"] for p in procs for e in p.named("job_finished"))
        assert max(finished.values()) == 1, finished.most_common(3)
        # -- every owed hook arrived, duplicates under one webhook-id ---------------------
        deliveries = await db.fetch(
            "SELECT j.prompt_id, d.event_id FROM hook_deliveries d JOIN jobs j ON j.id = d.job_id"
        )
        owed = {r["prompt_id"]: r["event_id"] for r in deliveries}
        assert set(owed) == set(outcome)
        seen: defaultdict[str, set[str]] = defaultdict(set)
        for headers, body in receiver.requests:
            seen[json.loads(body)["data"]["prompt_id"]].add(headers["webhook-id"])
        assert {p: {e} for p, e in owed.items()} == dict(seen)
        # -- no server polled by two replicas at once -------------------------------------
        clients = {poll.client for fake in fakes.values() for poll in fake.stats.polls()}
        assert all(c.startswith("comfywatch/") for c in clients), clients
        assert len(clients) > 1
        assert _overlaps(fakes) == []
    finally:
        for proc in procs:
            await proc.close()
        await db.close()
        await receiver.stop()


@pytest.mark.parametrize("partition", ["cut", "stall"])
async def test_a_replica_cut_off_from_the_database_stops_polling_before_its_lease_expires(
    pg: str,  # noqa: F811
    tmp_path: Path,
    fakes: dict[str, FakeComfyUI],
    partition: str,
) -> None:
    """``cut``: its connections end and new ones are refused; ``stall``: the database
    answers nothing more (the connections stay open, their requests hang)."""
    _, _, rest = pg.removeprefix("postgresql://").partition("@")
    address, _, name = rest.partition("/")
    host, _, port = address.partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    await proxy.start()
    user = pg.removeprefix("postgresql://").partition("@")[0]
    behind_proxy = f"postgresql://{user}@127.0.0.1:{proxy.port}/{name}"
    receiver = Receiver()
    await receiver.start()
    config = _config(tmp_path, behind_proxy, fakes, receiver.url)
    db = await _connect(pg)
    proc: DaemonProcess | None = None
    try:
        # Prompts that run long: the servers stay busy, so the replica keeps polling.
        jobs = []
        for server, fake in fakes.items():
            fake.run_time_s = 30.0
            jobs.append({"server": server, "prompt_id": fake.submit(outcome="success")})
        _drop_in(tmp_path, "long", jobs)
        proc, replica = await _start(config)

        async def owns_all() -> bool:
            rows = await db.fetch(
                "SELECT server FROM server_leases WHERE owner = $1 AND expires_at > "
                "clock_timestamp()",
                replica,
            )
            return {r["server"] for r in rows} == set(fakes)

        async def polled_by_it() -> bool:
            return all(f.stats.polls(f"comfywatch/{replica}") for f in fakes.values())

        await _eventually(owns_all, "the replica holds every lease", WAIT_S)
        await _eventually(polled_by_it, "the replica polls every server", WAIT_S)
        expiry = {
            r["server"]: r["expires_at"]
            for r in await db.fetch("SELECT server, expires_at FROM server_leases")
        }
        if partition == "cut":
            proxy.cut()  # the replica's database connections drop, and new ones fail
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        else:
            proxy.stall()
        await proc.wait_event("lease_expired", timeout_s=WAIT_S)
        stopped_at = {
            server: max((p.finished_s for p in f.stats.polls(f"comfywatch/{replica}")), default=0.0)
            for server, f in fakes.items()
        }
        # The database's clock says when each lease runs out; convert with the gap between
        # it and this host's monotonic clock, both read now.
        db_now = await db.fetchval("SELECT clock_timestamp()")
        mono_now = time.monotonic()
        for server, at in stopped_at.items():
            lease_expiry = await db.fetchval(
                "SELECT expires_at FROM server_leases WHERE server = $1", server
            )
            assert lease_expiry >= expiry[server]  # not renewed since the cut, at most once
            expires_m = mono_now + (lease_expiry - db_now).total_seconds()
            assert at < expires_m, f"{server}: polled until {at}, lease expired at {expires_m}"
        # Nothing more: no poll at all once it stopped counting its leases.
        polls = sum(len(f.stats.polls(f"comfywatch/{replica}")) for f in fakes.values())
        await asyncio.sleep(LEASE_S)
        assert sum(len(f.stats.polls(f"comfywatch/{replica}")) for f in fakes.values()) == polls
    finally:
        if proc is not None:
            await proc.close()
        await db.close()
        await receiver.stop()
        await proxy.stop()
