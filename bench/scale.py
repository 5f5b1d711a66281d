"""Scenarios of scale: daemon CPU and memory by size, start-up with many stored jobs, and a
burst of spool files while ``/healthz`` is probed.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import aiohttp

from .farm import FOREVER_S, Result, Sizes, daemon_on, farm, measure
from .procs import DAEMON_AGENT, TERMINAL_SQL, Daemon, write_spool

SERVERS = 4


async def _register_all(daemon: Daemon, ids: dict[str, list[str]]) -> tuple[float, float]:
    for name, prompt_ids in ids.items():
        write_spool(daemon.jobs_dir, name, prompt_ids, per_file=1_000)
    ready_s = await daemon.start()
    total = sum(len(v) for v in ids.values())
    return ready_s, await daemon.wait_count(total, timeout_s=1_800)


async def _one_size(total: int, window_s: float, restart: bool) -> Result:
    async with farm(SERVERS, total // SERVERS, FOREVER_S) as (session, servers):
        ids = {s.name: await s.queued_ids(session) for s in servers}
        async with daemon_on(servers) as (daemon, _):
            ready_s, registered_s = await _register_all(daemon, ids)
            await asyncio.sleep(min(30, 5 + total / 10_000))
            result = await measure(
                session, servers, window_s, DAEMON_AGENT, lambda: daemon.count(TERMINAL_SQL), daemon
            )
            result.update(ready_s=ready_s, registered_after_ready_s=registered_s, pending=total)
            if restart:
                daemon.stop()
                result["restart_ready_s"] = await daemon.start(ready_timeout_s=1_800)
                result["restart_rss_mb_at_ready"] = daemon.peak_rss_mb()
            return result


async def memory(sizes: Sizes, with_startup: bool = False) -> Result:
    """(5) Daemon CPU and peak RSS by number pending; (6) the restart, on the largest."""
    counts = sizes.pick([1_000, 10_000, 100_000], [1_000, 10_000])
    window = sizes.pick(20, 8)
    results = {}
    for count in counts:
        results[count] = await _one_size(
            count, window, restart=with_startup and count == counts[-1]
        )
    rows = []
    for count, result in results.items():
        target = "<= 150" if count == 10_000 else ""
        rows.append(
            [f"scale {count}: daemon peak RSS MB", target, result["daemon_peak_rss_mb"], None]
        )
        rows.append([f"scale {count}: daemon CPU %", "", result["daemon_cpu_pct"], None])
        rows.append([f"scale {count}: max req/s per server", "", result["max_server_req_s"], None])
        rows.append(
            [
                f"scale {count}: registered s after READY",
                "",
                result["registered_after_ready_s"],
                None,
            ]
        )
        if "restart_ready_s" in result:
            rows.append(
                [f"startup: READY s with {count} stored", "", result["restart_ready_s"], None]
            )
    return {"rows": rows, "details": {str(k): v for k, v in results.items()}}


async def startup(sizes: Sizes) -> Result:
    """(6) Start to READY with many stored jobs (alone: fill, then restart)."""
    count = sizes.pick(100_000, 10_000)
    result = await _one_size(count, 5, restart=True)
    rows = [
        [f"startup: first READY s ({count} to load from spool)", "", result["ready_s"], None],
        [f"startup: READY s with {count} stored", "", result["restart_ready_s"], None],
    ]
    return {"rows": rows, "details": result}


class Prober:
    """``GET /healthz`` about every 10 ms; the slowest answer and any failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.probes: list[tuple[float, int]] = []  # (latency ms, status; 0: no answer)

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                started = time.monotonic()
                status = 0
                try:
                    async with session.get(self.url) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    pass
                self.probes.append(((time.monotonic() - started) * 1000, status))
                await asyncio.sleep(0.01)


def _drop_files(jobs_dir: Path, server: str, ids: list[str]) -> None:
    """Write every file under a temporary name, then rename them all in one burst."""
    names = []
    for index, prompt_id in enumerate(ids):
        temporary = jobs_dir / f".job-{index:06d}.tmp"
        temporary.write_text(f'[[jobs]]\nserver = "{server}"\nprompt_id = "{prompt_id}"\n')
        names.append(temporary)
    for index, temporary in enumerate(names):
        temporary.rename(jobs_dir / f"job-{index:06d}.toml")


async def spool(sizes: Sizes) -> Result:
    """(7) Many spool files at once: time until registered, /healthz meanwhile."""
    count = sizes.pick(20_000, 2_000)
    async with farm(1, count, FOREVER_S) as (session, servers):
        ids = await servers[0].queued_ids(session)
        async with daemon_on(servers) as (daemon, _):
            await daemon.start()
            prober = Prober(f"http://127.0.0.1:{daemon.port}/healthz")
            stop = asyncio.Event()
            task = asyncio.create_task(prober.run(stop))
            await asyncio.sleep(1)
            baseline = len(prober.probes)
            started = time.monotonic()
            await asyncio.to_thread(_drop_files, daemon.jobs_dir, "s0", ids)
            written_s = time.monotonic() - started
            try:
                registered_s = await daemon.wait_count(count, timeout_s=1_800)
            finally:
                await asyncio.sleep(1)
                stop.set()
                await task
    during = sorted(latency for latency, _ in prober.probes[baseline:])
    statuses = collections.Counter(status for _, status in prober.probes[baseline:])
    failures = sum(n for status, n in statuses.items() if status != 200)
    details: dict[str, Any] = {
        "files": count,
        "written_s": written_s,
        "registered_s": registered_s,
        "files_per_s": count / registered_s,
        "healthz_probes": len(during),
        "healthz_max_ms": max(during, default=None),
        "healthz_p99_ms": during[int(0.99 * (len(during) - 1))] if during else None,
        "healthz_statuses": {str(status): n for status, n in statuses.items()},
        "answered_throughout": failures == 0,
    }
    rows = [
        [f"spool {count} files: s until registered", "", registered_s, None],
        ["spool: /healthz max ms", "", details["healthz_max_ms"], None],
        ["spool: /healthz answered throughout", "yes", details["answered_throughout"], None],
    ]
    return {"rows": rows, "details": details}
