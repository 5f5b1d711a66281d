"""Several replicas on one PostgreSQL database: completions per second, detection lag, and
the takeover of a SIGKILLed replica's servers.

Each setup (one daemon on SQLite, one replica and three replicas on a fresh PostgreSQL
database) gets fresh fake servers. Each server is first given a "gate" prompt that runs a
few seconds, then many short prompts (all submitted with ids of ours, and registered
through the spool while the gate runs), so the short ones finish only once they are
tracked. Measured from the jobs table: completions per second (jobs, over first finish
to last ``detected_at``), and the lag ``detected_at - comfy_finished_at_ms`` (the fakes
run on this host: one clock). With three replicas, the one holding the most leases is then
SIGKILLed while every server still runs prompts: the takeover is the time from the kill
until each of its servers has a live lease of another replica (``server_leases``) and has
been polled by that replica (the fake's request log, by ``User-Agent``, on the monotonic
clock this process shares with it); the killed replica is restarted between rounds.

PostgreSQL is reached at ``COMFYWATCH_BENCH_PG`` (an admin URL; default
``postgresql://postgres@127.0.0.1:5432/postgres``); each run creates a database
``comfywatch_bench_<hex>`` and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .farm import Result, Sizes, _ms, _percentiles, farm
from .procs import SETUP_AGENT, TERMINAL_SQL, Daemon, FakeServer, get_json, write_spool

ADMIN_URL = os.environ.get("COMFYWATCH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
LEASE_S = 3.0
POLL_INTERVAL_S = 1.0
GATE_S = 5.0  # the first prompt on each server: time to register the others
RUN_TIME_S = 0.01  # each short prompt
TRICKLE_RUN_S = 0.5  # prompts that keep the servers busy around a kill
WAIT_S = 120.0  # bounds on waits for conditions; reached only when something is broken
GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
}

Fetch = Callable[[str], Awaitable[list[tuple[Any, ...]]]]


@dataclass(frozen=True)
class Setup:
    backend: str  # "sqlite" or "postgresql"
    replicas: int

    @property
    def label(self) -> str:
        return f"{self.backend} x{self.replicas}"


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> float:
    """Seconds until ``check`` holds (raises TimeoutError after WAIT_S)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > WAIT_S:
            raise TimeoutError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _admin() -> Any:
    import asyncpg  # type: ignore[import-untyped]  # the "postgres" extra (in "test" too)

    return await asyncpg.connect(ADMIN_URL.replace("postgresql://", "postgres://", 1), timeout=10)


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server (its URL), dropped afterwards."""
    admin = await _admin()
    name = f"comfywatch_bench_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def pg_fetch(url: str) -> AsyncIterator[Fetch]:
    import asyncpg

    db = await asyncpg.connect(url.replace("postgresql://", "postgres://", 1), timeout=10)

    async def fetch(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await db.fetch(sql)]

    try:
        yield fetch
    finally:
        await db.close()


async def _submit(
    session: aiohttp.ClientSession, server: FakeServer, run_times: list[float]
) -> list[str]:
    """Queue one prompt per run time, in order, with ids of ours."""
    ids = []
    for run_time_s in run_times:
        prompt_id = str(uuid.uuid4())
        body = {
            "prompt": GRAPH,
            "prompt_id": prompt_id,
            "extra_data": {"comfywatch_fake": {"run_time_s": run_time_s}},
        }
        headers = {"User-Agent": SETUP_AGENT}
        async with session.post(f"{server.url}/prompt", json=body, headers=headers) as response:
            response.raise_for_status()
        ids.append(prompt_id)
    return ids


async def _count(fetch: Fetch, where: str = "1 = 1") -> int:
    rows = await fetch(f"SELECT count(*) FROM jobs WHERE {where}")
    return int(rows[0][0]) if rows else 0


def _stamp_ms(value: Any) -> float:
    return value.timestamp() * 1000 if isinstance(value, datetime) else _ms(str(value))


async def _leases(fetch: Fetch) -> dict[str, str]:
    """Server -> owner of the live leases."""
    rows = await fetch(
        "SELECT server, owner FROM server_leases "
        "WHERE owner IS NOT NULL AND expires_at > clock_timestamp()"
    )
    return {str(server): str(owner) for server, owner in rows}


def _in(ids: list[list[str]]) -> str:
    return ",".join(f"'{prompt_id}'" for prompt_ids in ids for prompt_id in prompt_ids)


async def _register(
    fetch: Fetch, jobs_dir: Path, servers: list[FakeServer], ids: list[list[str]]
) -> tuple[int, float]:
    """Spool files for ``ids`` (one list per server); the jobs then expected in the table,
    and the wall-clock time the files went in."""
    total = await _count(fetch) + sum(len(i) for i in ids)
    written = time.time()
    for server, prompt_ids in zip(servers, ids, strict=True):
        write_spool(jobs_dir, f"{server.name}", prompt_ids, per_file=1_000)
    return total, written


async def _live(
    session: aiohttp.ClientSession,
    servers: list[FakeServer],
    jobs_dir: Path,
    fetch: Fetch,
    per_server: int,
) -> Result:
    """The gate and ``per_server`` short prompts on every server, tracked to the end:
    the lag, and whether the daemons keep up with what the servers finish."""
    runs = [GATE_S] + [RUN_TIME_S] * per_server
    ids = await asyncio.gather(*(_submit(session, s, runs) for s in servers))
    total, _ = await _register(fetch, jobs_dir, servers, ids)

    async def registered() -> bool:
        return await _count(fetch) >= total

    async def terminal() -> bool:
        return await _count(fetch, TERMINAL_SQL) >= total

    registered_s = await _eventually(registered, "every job registered")
    await _eventually(terminal, "every job terminal")
    short = _in([prompt_ids[1:] for prompt_ids in ids])
    rows = await fetch(
        f"SELECT detected_at, comfy_finished_at_ms FROM jobs WHERE prompt_id IN ({short})"
    )
    detected = [_stamp_ms(d) for d, _ in rows]
    finished = [float(f) for _, f in rows if f]
    lags = [_stamp_ms(d) - f for d, f in rows if d and f]
    span_s = (max(detected) - min(finished)) / 1000
    produced_s = (max(finished) - min(finished)) / 1000
    return {
        "jobs": len(rows),
        "registered_s": registered_s,
        "servers_finished_per_s": len(rows) / produced_s if produced_s > 0 else None,
        "completions_per_s": len(rows) / span_s if span_s > 0 else None,
        "lag_ms": _percentiles(lags),
    }


async def _catch_up(
    session: aiohttp.ClientSession,
    servers: list[FakeServer],
    jobs_dir: Path,
    fetch: Fetch,
    per_server: int,
) -> Result:
    """Prompts that all finished before they are registered: jobs committed terminal per
    second, from the spool files' rename to the last ``detected_at``."""
    ids = await asyncio.gather(*(_submit(session, s, [0.0] * per_server) for s in servers))
    for server in servers:
        while await server.remaining(session):
            await asyncio.sleep(0.1)
    total, written = await _register(fetch, jobs_dir, servers, ids)

    async def terminal() -> bool:
        return await _count(fetch, TERMINAL_SQL) >= total

    await _eventually(terminal, "every job terminal")
    rows = await fetch(f"SELECT max(detected_at) FROM jobs WHERE prompt_id IN ({_in(ids)})")
    span_s = _stamp_ms(rows[0][0]) / 1000 - written
    jobs = sum(len(i) for i in ids)
    return {"jobs": jobs, "seconds": span_s, "completions_per_s": jobs / span_s}


async def _polled_by(
    session: aiohttp.ClientSession, server: FakeServer, client: str, since: float
) -> bool:
    log = await get_json(session, f"{server.url}/_fake/polls?client={client}")
    return any(float(poll["started_s"]) > since for poll in log["polls"])


async def _takeover(
    session: aiohttp.ClientSession,
    servers: list[FakeServer],
    daemons: list[Daemon],
    jobs_dir: Path,
    fetch: Fetch,
) -> Result:
    """SIGKILL the replica holding the most leases; time until its servers are leased and
    polled by others; restart it."""
    ids = await asyncio.gather(*(_submit(session, s, [TRICKLE_RUN_S] * 40) for s in servers))
    total, _ = await _register(fetch, jobs_dir, servers, ids)

    async def settled() -> bool:
        return await _count(fetch) >= total and set(await _leases(fetch)) == set(by_name)

    by_name = {s.name: s for s in servers}
    await _eventually(settled, "the busy prompts registered, every server leased")
    await asyncio.sleep(POLL_INTERVAL_S)
    leases = await _leases(fetch)
    owners = set(leases.values())
    pids = {str(rid): int(pid) for rid, pid in await fetch("SELECT id, pid FROM replicas")}
    victim = max(owners, key=lambda o: sum(1 for v in leases.values() if v == o))
    held = sorted(name for name, owner in leases.items() if owner == victim)
    daemon = next(d for d in daemons if d.proc is not None and d.proc.pid == pids[victim])
    daemon.kill()
    killed = time.monotonic()
    leased_s: dict[str, float] = {}
    polled_s: dict[str, float] = {}
    while len(polled_s) < len(held):
        if time.monotonic() - killed > WAIT_S:
            raise TimeoutError(f"servers {held} not taken over from {victim}")
        now_leases = await _leases(fetch)
        for name in held:
            owner = now_leases.get(name)
            if owner is None or owner == victim or name in polled_s:
                continue
            leased_s.setdefault(name, time.monotonic() - killed)
            if await _polled_by(session, by_name[name], f"comfywatch/{owner}", killed):
                polled_s[name] = time.monotonic() - killed
        await asyncio.sleep(0.05)
    await daemon.start()
    await asyncio.sleep(LEASE_S + 2)  # it joins; the servers it gains move back to it
    return {
        "victim_servers": held,
        "leased_s": max(leased_s.values()),
        "polled_s": max(polled_s.values()),
        "per_server_polled_s": polled_s,
    }


async def _run(setup: Setup, sizes: Sizes, url: str | None) -> Result:
    count = sizes.pick(6, 4)
    per_server = sizes.pick(500, 100)  # live
    backlog = sizes.pick(500, 250)  # caught up on, per server
    async with (
        farm(count, 0, RUN_TIME_S) as (session, servers),
        contextlib.AsyncExitStack() as stack,
    ):
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfywatch-bench-")))
        urls = {s.name: s.url for s in servers}
        options: dict[str, Any] = {"poll_interval_s": POLL_INTERVAL_S}
        if url is not None:
            options |= {"database": url.replace("postgresql://", "postgresql+asyncpg://", 1)}
            options |= {"lease_s": LEASE_S}
        daemons = [
            Daemon(folder, urls, name=f"replica-{i}", **options) for i in range(setup.replicas)
        ]
        for daemon in daemons:
            stack.callback(daemon.stop)
        fetch: Fetch
        if url is None:
            only = daemons[0]

            async def fetch(sql: str) -> list[tuple[Any, ...]]:
                return await asyncio.to_thread(only.query, sql)
        else:
            fetch = await stack.enter_async_context(pg_fetch(url))
        ready = await asyncio.gather(*(d.start() for d in daemons))
        if url is not None:

            async def all_leased() -> bool:
                return set(await _leases(fetch)) == set(urls)

            await _eventually(all_leased, "every server leased")
        result: Result = {"ready_s": max(ready), "servers": count, "per_server": per_server}
        jobs_dir = daemons[0].jobs_dir
        result["live"] = await _live(session, servers, jobs_dir, fetch, per_server)
        result["catch_up"] = await _catch_up(session, servers, jobs_dir, fetch, backlog)
        if setup.replicas > 1:
            rounds = []
            for _ in range(sizes.pick(3, 1)):
                rounds.append(await _takeover(session, servers, daemons, jobs_dir, fetch))
            result["takeovers"] = rounds
            result["takeover_s"] = max(r["polled_s"] for r in rounds)
        return result


async def replicas(sizes: Sizes) -> Result:
    """One daemon on SQLite; one and three replicas on PostgreSQL."""
    setups = [Setup("sqlite", 1), Setup("postgresql", 1), Setup("postgresql", 3)]
    results: dict[str, Result] = {}
    for setup in setups:
        if setup.backend == "sqlite":
            results[setup.label] = await _run(setup, sizes, None)
            continue
        async with pg_database() as url:
            results[setup.label] = await _run(setup, sizes, url)
    rows: list[list[Any]] = []
    for label, result in results.items():
        live, catch_up = result["live"], result["catch_up"]
        rows += [
            [
                f"replicas {label}: {catch_up['jobs']} finished, committed/s",
                "",
                catch_up["completions_per_s"],
                None,
            ],
            [
                f"replicas {label}: {live['jobs']} live, servers finished/s",
                "",
                live["servers_finished_per_s"],
                None,
            ],
            [f"replicas {label}: live, committed/s", "", live["completions_per_s"], None],
            [f"replicas {label}: live, lag ms p50", "", live["lag_ms"]["p50"], None],
            [f"replicas {label}: live, lag ms p99", "", live["lag_ms"]["p99"], None],
        ]
        if "takeover_s" in result:
            worst = f"worst of {len(result['takeovers'])}"
            rows.append(
                [
                    f"replicas {label}: takeover s ({worst}, lease_s {LEASE_S:g})",
                    "",
                    result["takeover_s"],
                    None,
                ]
            )
    return {"rows": rows, "details": {"lease_s": LEASE_S, **results}}
