"""Scenarios against a farm of fake ComfyUI servers: quiet, trickle, lag and burst.

Each scenario runs the same workload twice in one run, on fresh identical fake servers:
first watched by the daemon, then by the naive poller (:mod:`bench.naive`). It returns
``{"rows": [[metric, target, comfywatch, naive], ...], "details": {...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .naive import NaivePoller
from .procs import (
    DAEMON_AGENT,
    NAIVE_AGENT,
    TERMINAL_SQL,
    Daemon,
    FakeServer,
    client_costs,
    write_spool,
)

FOREVER_S = 1_000_000.0
Result = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``quick`` shrinks them."""

    quick: bool

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@contextlib.asynccontextmanager
async def farm(
    count: int, prefill: int, run_time_s: float, graph_bytes: int | None = None
) -> AsyncIterator[tuple[aiohttp.ClientSession, list[FakeServer]]]:
    """``count`` fake servers, each with ``prefill`` prompts queued."""
    servers = [
        FakeServer(f"s{i}", prefill=prefill, run_time_s=run_time_s, graph_bytes=graph_bytes)
        for i in range(count)
    ]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await asyncio.gather(*(s.wait_listening(session) for s in servers))
            yield session, servers
        finally:
            for server in servers:
                server.stop()


@contextlib.asynccontextmanager
async def daemon_on(
    servers: list[FakeServer], **options: Any
) -> AsyncIterator[tuple[Daemon, Path]]:
    with tempfile.TemporaryDirectory(prefix="comfywatch-bench-") as folder:
        daemon = Daemon(Path(folder), {s.name: s.url for s in servers}, **options)
        daemon.jobs_dir.mkdir(parents=True)
        try:
            yield daemon, Path(folder)
        finally:
            daemon.stop()


async def measure(
    session: aiohttp.ClientSession,
    servers: list[FakeServer],
    window_s: float,
    agent: str,
    finished: Callable[[], Any],
    daemon: Daemon | None = None,
) -> Result:
    """What ``agent`` cost the servers (and the daemon itself) over ``window_s``."""
    await asyncio.gather(*(s.reset_stats(session) for s in servers))
    done_before = await finished()
    cpu_before = daemon.cpu_s() if daemon else 0.0
    servers_cpu_before = sum(s.cpu_s() for s in servers)
    started = time.monotonic()
    await asyncio.sleep(window_s)
    elapsed = time.monotonic() - started
    cpu = (daemon.cpu_s() - cpu_before) if daemon else None
    servers_cpu = sum(s.cpu_s() for s in servers) - servers_cpu_before
    done = await finished() - done_before
    costs = [client_costs(await s.stats(session), agent) for s in servers]
    per_server = {
        "req_s": [c["requests"] / elapsed for c in costs],
        "bytes_s": [c["response_bytes"] / elapsed for c in costs],
        "server_cpu_pct": [100 * c["cpu_s"] / elapsed for c in costs],
    }
    totals = {k: sum(c[k] for c in costs) for k in ("requests", "response_bytes", "cpu_s")}
    per_job = {k: (v / done if done else None) for k, v in totals.items()}
    return {
        "window_s": round(elapsed, 2),
        "finished": done,
        "per_server": {k: [round(x, 3) for x in v] for k, v in per_server.items()},
        "max_server_req_s": max(per_server["req_s"]),
        "max_server_bytes_s": max(per_server["bytes_s"]),
        "server_cpu_s": totals["cpu_s"],
        "server_process_cpu_s": servers_cpu,
        "per_finished_job": per_job,
        "routes": [c["routes"] for c in costs],
        "daemon_cpu_pct": None if cpu is None else 100 * cpu / elapsed,
        "daemon_peak_rss_mb": daemon.peak_rss_mb() if daemon else None,
    }


async def _daemon_side(
    servers: list[FakeServer],
    session: aiohttp.ClientSession,
    window_s: float,
    settle_s: float,
    **options: Any,
) -> Result:
    ids = {s.name: await s.queued_ids(session) for s in servers}
    async with daemon_on(servers, **options) as (daemon, _):
        for name, prompt_ids in ids.items():
            write_spool(daemon.jobs_dir, name, prompt_ids, per_file=1_000)
        ready_s = await daemon.start()
        registered_s = await daemon.wait_count(sum(len(v) for v in ids.values()))
        await asyncio.sleep(settle_s)
        result = await measure(
            session, servers, window_s, DAEMON_AGENT, lambda: daemon.count(TERMINAL_SQL), daemon
        )
        return {**result, "ready_s": ready_s, "registered_after_ready_s": registered_s}


async def _naive_side(
    servers: list[FakeServer], session: aiohttp.ClientSession, window_s: float, settle_s: float
) -> Result:
    poller = NaivePoller({s.url: await s.queued_ids(session) for s in servers})
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))

    async def finished() -> int:
        return len(poller.detected)

    try:
        await asyncio.sleep(settle_s)
        return await measure(session, servers, window_s, NAIVE_AGENT, finished)
    finally:
        stop.set()
        await task


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


async def quiet(sizes: Sizes) -> Result:
    """(1) Many pending over 4 servers, nothing finishing, socket up."""
    total = sizes.pick(10_000, 2_000)
    window, settle = sizes.pick(30, 8), sizes.pick(10, 3)
    async with farm(4, total // 4, FOREVER_S) as (session, servers):
        ours = await _daemon_side(servers, session, window, settle)
    async with farm(4, total // 4, FOREVER_S) as (session, servers):
        naive = await _naive_side(servers, session, sizes.pick(20, 6), 2)
    rows = [
        [f"quiet {total}: daemon CPU % of a core", "<= 3", ours["daemon_cpu_pct"], None],
        [
            "quiet: max req/s per server",
            "<= 1",
            ours["max_server_req_s"],
            naive["max_server_req_s"],
        ],
        [
            "quiet: max bytes/s per server",
            "<= 2048",
            ours["max_server_bytes_s"],
            naive["max_server_bytes_s"],
        ],
        ["quiet: daemon peak RSS MB", "", ours["daemon_peak_rss_mb"], None],
    ]
    return {"rows": rows, "details": {"pending": total, "comfywatch": ours, "naive": naive}}


async def trickle(sizes: Sizes) -> Result:
    """(2) Pending on one server, graphs of a few KB, one finishing per second."""
    pending = sizes.pick(1_000, 200)
    window, settle = sizes.pick(40, 10), sizes.pick(5, 3)
    args = (1, pending, 1.0, 4_000)
    async with farm(*args) as (session, servers):
        ours = await _daemon_side(servers, session, window, settle)
    async with farm(*args) as (session, servers):
        naive = await _naive_side(servers, session, window, settle)
    rows = [
        [
            f"trickle {pending}: req/s per server",
            "<= 3",
            ours["max_server_req_s"],
            naive["max_server_req_s"],
        ],
        [
            "trickle: KB/s per server",
            "<= 20",
            ours["max_server_bytes_s"] / 1024,
            naive["max_server_bytes_s"] / 1024,
        ],
        [
            "trickle: server handler CPU s",
            "ratio <= 0.05",
            ours["server_cpu_s"],
            naive["server_cpu_s"],
        ],
        [
            "trickle: server process CPU s",
            "",
            ours["server_process_cpu_s"],
            naive["server_process_cpu_s"],
        ],
        ["trickle: finished in window", "", ours["finished"], naive["finished"]],
    ]
    details = {"pending": pending, "comfywatch": ours, "naive": naive}
    details["server_cpu_ratio"] = ratio(ours["server_cpu_s"], naive["server_cpu_s"])
    return {"rows": rows, "details": details}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


def _ms(text: str) -> float:
    """A stored UTC datetime (naive means UTC) as Unix milliseconds."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000


async def _daemon_lag(count: int, run_time_s: float, websocket: bool) -> dict[str, Any]:
    async with farm(1, count, run_time_s) as (session, servers):
        ids = await servers[0].queued_ids(session)
        async with daemon_on(servers, websocket=websocket) as (daemon, _):
            write_spool(daemon.jobs_dir, "s0", ids, per_file=1_000)
            await daemon.start()
            await daemon.wait_count(len(ids))
            since_ms = time.time() * 1000 + 2_000
            await daemon.wait_count(len(ids), TERMINAL_SQL, timeout_s=count * run_time_s + 120)
            rows = daemon.query("SELECT detected_at, comfy_finished_at_ms FROM jobs")
    lags = [_ms(d) - f for d, f in rows if d and f and f > since_ms]
    return _percentiles(lags)


async def _naive_lag(count: int, run_time_s: float) -> dict[str, Any]:
    async with farm(1, count, run_time_s) as (session, servers):
        poller = NaivePoller({servers[0].url: await servers[0].queued_ids(session)})
        since_ms = time.time() * 1000 + 2_000
        await asyncio.wait_for(poller.run(asyncio.Event()), count * run_time_s + 120)
    lags = [seen - done for seen, done in poller.detected.values() if done and done > since_ms]
    return _percentiles(lags)


async def lag(sizes: Sizes) -> Result:
    """(3) Detection lag, with the socket and with ``websocket = false`` (interval 1 s)."""
    count, run_time = sizes.pick(160, 28), 0.25
    socket = await _daemon_lag(count, run_time, True)
    polled = await _daemon_lag(count, run_time, False)
    naive = await _naive_lag(count, run_time)
    rows = [
        ["lag ms p50, socket", "<= 50", socket["p50"], naive["p50"]],
        ["lag ms p99, socket", "", socket["p99"], naive["p99"]],
        ["lag ms max, socket", "", socket["max"], naive["max"]],
        ["lag ms p50, no socket", "", polled["p50"], naive["p50"]],
        ["lag ms p99, no socket", "<= 1100", polled["p99"], naive["p99"]],
        ["lag ms max, no socket", "", polled["max"], naive["max"]],
    ]
    details = {"socket": socket, "no_socket": polled, "naive": naive, "interval_s": 1.0}
    return {"rows": rows, "details": details}


class Receiver:
    """A local webhook receiver that counts what it got and when."""

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.count += 1
        return web.Response(status=204)


async def burst(sizes: Sizes) -> Result:
    """(4) Prompts finished before the daemon starts: commits/s and webhooks/s."""
    count = sizes.pick(10_000, 1_000)
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        ours = await _burst_daemon(count, hook_url, receiver)
    finally:
        await runner.cleanup()
    async with farm(1, count, 0.0) as (session, servers):
        while await servers[0].remaining(session):
            await asyncio.sleep(0.2)
        poller = NaivePoller({servers[0].url: await servers[0].finished_ids(session)})
        started = time.monotonic()
        await poller.run(asyncio.Event())
        naive_s = time.monotonic() - started
    rows = [
        [
            f"burst {count}: jobs/s committed (from spawn)",
            ">= 5000",
            ours["jobs_per_s"],
            count / naive_s,
        ],
        ["burst: webhooks/s (first to last)", "", ours["webhooks_per_s"], None],
        ["burst: webhooks received", str(count), ours["webhooks"], None],
        ["burst: seconds to all terminal", "", ours["terminal_s"], naive_s],
    ]
    return {"rows": rows, "details": {"count": count, "comfywatch": ours, "naive_s": naive_s}}


async def _burst_daemon(count: int, hook_url: str, receiver: Receiver) -> Result:
    async with farm(1, count, 0.0) as (session, servers):
        while await servers[0].remaining(session):
            await asyncio.sleep(0.2)
        ids = await servers[0].finished_ids(session)
        async with daemon_on(servers, webhook_url=hook_url) as (daemon, _):
            write_spool(daemon.jobs_dir, "s0", ids, per_file=1_000)
            await servers[0].reset_stats(session)
            spawned = time.monotonic()
            ready_s = await daemon.start()
            terminal_s = ready_s + await daemon.wait_count(count, TERMINAL_SQL, timeout_s=900)
            # Webhooks are timed until all arrived, or for at most a minute more.
            deadline = time.monotonic() + 60
            while receiver.count < count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            hooks_s = time.monotonic() - spawned
            hooks_span_s = (receiver.last or 0) - (receiver.first or 0)
            costs = client_costs(await servers[0].stats(session), DAEMON_AGENT)
            peak = daemon.peak_rss_mb()
    return {
        "ready_s": ready_s,
        "terminal_s": terminal_s,
        "jobs_per_s": count / terminal_s,
        "jobs_per_s_after_ready": count / max(terminal_s - ready_s, 1e-9),
        "webhooks": receiver.count,
        "webhooks_s": hooks_s,
        "webhooks_per_s": receiver.count / hooks_span_s if hooks_span_s > 0 else None,
        "webhooks_per_s_from_spawn": receiver.count / hooks_s,
        "server_costs": costs,
        "peak_rss_mb": peak,
    }
