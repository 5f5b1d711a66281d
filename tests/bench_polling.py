"""Benchmark: what one polling tick costs the server and the daemon.

Run: ``python -m tests.bench_polling [--jobs 1000]`` from the repository root. Not part of
the test suite (timings on a shared machine are noise for assertions; they are data here).

It starts the fake ComfyUI, queues N prompts, registers them, and measures
1. a tick while all N wait in the queue (server requests per tick, tick time),
2. the tick in which all N have finished (history fetches, one transaction of N results),
3. the daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

from comfywatch.config import load_settings
from comfywatch.service import Daemon
from comfywatch.store import JobFilter, Store
from comfywatch.testing import FakeComfyUI

from .conftest import write_config


async def bench(n_jobs: int, ticks: int) -> None:
    fake = FakeComfyUI(run_time_s=0.0)
    await fake.start()
    try:
        fake.pause()
        pids = [fake.submit() for _ in range(n_jobs)]
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [{"server": "local", "prompt_id": p} for p in pids]
            config = write_config(Path(tmp), {"local": fake.url}, jobs)
            settings = load_settings(config)
            store = Store.open(settings.daemon.database_url)
            daemon = Daemon(settings, store=store)
            t0 = time.perf_counter()
            await daemon.start()
            register_s = time.perf_counter() - t0

            await daemon.poller.tick()  # registered -> queued (one write of N rows)
            fake.requests.clear()
            waiting: list[float] = []
            for _ in range(ticks):
                t0 = time.perf_counter()
                await daemon.poller.tick()
                waiting.append(time.perf_counter() - t0)
            per_tick = {k: v / ticks for k, v in fake.requests.items()}

            fake.resume()
            for pid in pids:
                await fake.wait_finished(pid, timeout_s=120)
            fake.requests.clear()
            t0 = time.perf_counter()
            report = await daemon.poller.tick()
            finish_s = time.perf_counter() - t0
            finished_requests = dict(fake.requests)
            done = await store.jobs(JobFilter(states=["success"]))
            await daemon.poller.close()
            await daemon.dispatcher.close()
            await store.close()
    finally:
        await fake.stop()

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"jobs: {n_jobs}")
    print(f"register {n_jobs} jobs at start: {register_s * 1000:.1f} ms")
    print(f"tick while all wait in the queue: requests per tick {per_tick}")
    print(
        f"  tick time median {statistics.median(waiting) * 1000:.1f} ms, "
        f"max {max(waiting) * 1000:.1f} ms over {ticks} ticks"
    )
    print(f"  (a per-prompt /history poller would make {n_jobs} requests per tick)")
    print(
        f"tick in which all {n_jobs} finished: {finish_s * 1000:.1f} ms, "
        f"requests {finished_requests}, recorded {report.changed}, success rows {len(done)}"
    )
    print(f"peak RSS of this process (daemon and fake server together): {rss_mib:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(bench(args.jobs, args.ticks))


if __name__ == "__main__":
    main()
