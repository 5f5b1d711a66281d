"""Benchmark: bulk completion and hook delivery, for farm scale.

Run from the repository root: ``python -m bench.bulk [--jobs 10000] [--batch 1000]
[--deliveries 3000] [--concurrency 8 64] [--repeat 3]``. Prints the best of the runs and
every run (the machine is shared: the best is the least disturbed). Asserts nothing about
time: timings are data, not pass/fail.

1. jobs/s committed by ``Store.record`` for batches of terminal changes, each with two
   output records and one hook delivery (a SQLite file in a temporary folder).
2. webhooks/s from the hook dispatcher to a fast aiohttp receiver on a free loopback port
   (run in a child process of its own, so it does not share our event loop), for N due
   deliveries, with each ``hook_concurrency`` given.

The daemon's log lines (JSON, one per delivery at the default level) are written to
``/dev/null``: their cost counts, a terminal's does not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from comfywatch.config import WebhookHookSettings
from comfywatch.history import HistoryRecord, OutputRecord
from comfywatch.hooks import HookDispatcher
from comfywatch.logs import configure_logging
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, NewJob, Store

HOOK = "notify"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def history(prompt_id: str, now_ms: int) -> HistoryRecord:
    """A finished prompt's history as the poller hands it over: two images."""
    outputs = tuple(
        OutputRecord(
            node_id="9",
            kind="images",
            position=n,
            filename=f"ComfyUI_{prompt_id[:8]}_{n:05}_.png",
            subfolder="",
            type="output",
        )
        for n in range(2)
    )
    entry = {
        "prompt": [0, prompt_id, {}, {}, ["9"]],
        "outputs": {"9": {"images": [{"filename": o.filename, "type": "output"} for o in outputs]}},
        "status": {"status_str": "success", "completed": True, "messages": []},
    }
    return HistoryRecord(
        prompt_id=prompt_id,
        outcome=JobState.SUCCESS,
        status_str="success",
        completed=True,
        number=1,
        created_at_ms=now_ms - 3000,
        started_at_ms=now_ms - 2000,
        finished_at_ms=now_ms - 10,
        error=None,
        outputs=outputs,
        entry=entry,
    )


async def fresh_store(folder: Path, name: str) -> Store:
    store = Store.open("sqlite:///" + str(folder / name))
    await store.migrate()
    return store


async def register(store: Store, n_jobs: int, now_s: float) -> list[tuple[int, str]]:
    """Register ``n_jobs`` jobs owing the hook; their (id, prompt id), in id order."""
    jobs = [
        NewJob("farm", f"prompt-{n:07}", {"team": "a"}, (HOOK,), "bench") for n in range(n_jobs)
    ]
    await store.register(jobs, now_s)
    return sorted((j.id, j.prompt_id) for j in await store.active_jobs())


def changes(jobs: Sequence[tuple[int, str]], now_s: float) -> list[Change]:
    now_ms = int(now_s * 1000)
    return [
        Change(
            job_id,
            JobState.SUCCESS,
            reason=Reason.FINISHED,
            history=history(prompt_id, now_ms),
            deliveries=(HOOK,),
        )
        for job_id, prompt_id in jobs
    ]


async def bench_record(folder: Path, n_jobs: int, batch: int) -> float:
    """Jobs/s committed by ``Store.record`` (registration not counted)."""
    store = await fresh_store(folder, f"record-{time.monotonic_ns()}.sqlite")
    try:
        now_s = time.time()
        jobs = await register(store, n_jobs, now_s)
        spent_s = 0.0
        for start in range(0, len(jobs), batch):
            batch_changes = changes(jobs[start : start + batch], now_s)
            t0 = time.perf_counter()
            applied = await store.record(batch_changes, now_s)
            spent_s += time.perf_counter() - t0
            assert len(applied) == len(batch_changes)
        return n_jobs / spent_s
    finally:
        await store.close()


RECEIVER = """
import asyncio, sys
from aiohttp import web

async def main():
    count = 0
    async def hook(request):
        nonlocal count
        await request.read()
        count += 1
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(count, flush=True)
    await runner.cleanup()

asyncio.run(main())
"""


async def bench_webhooks(folder: Path, n_deliveries: int, concurrency: int) -> tuple[float, int]:
    """Webhooks/s (attempts made per second) of one ``run_once`` pass over ``n_deliveries``
    due deliveries, and how many of them ended delivered."""
    store = await fresh_store(folder, f"hooks-{concurrency}-{time.monotonic_ns()}.sqlite")
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RECEIVER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert receiver.stdin is not None and receiver.stdout is not None
    try:
        port = int(await receiver.stdout.readline())
        now_s = time.time()
        jobs = await register(store, n_deliveries, now_s)
        for start in range(0, len(jobs), 1000):
            await store.record(changes(jobs[start : start + 1000], now_s), now_s)
        hook = WebhookHookSettings(
            name=HOOK,
            type="webhook",
            url=f"http://127.0.0.1:{port}/hook",
            secret=b"bench-key-0123456789abcdefghijkl",
            on=frozenset({JobState.SUCCESS}),
            timeout_s=10.0,
            headers={},
            retry_schedule_s=(1.0,),
        )
        dispatcher = HookDispatcher(store=store, hooks={HOOK: hook}, concurrency=concurrency)
        try:
            t0 = time.perf_counter()
            attempts = await dispatcher.run_once()
            spent_s = time.perf_counter() - t0
        finally:
            await dispatcher.close()
        delivered = await store.deliveries(states=[DeliveryState.DELIVERED])
        return attempts / spent_s, len(delivered)
    finally:
        receiver.stdin.close()
        await receiver.wait()
        await store.close()


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates = [await bench_record(folder, args.jobs, args.batch) for _ in range(args.repeat)]
        say(
            f"record: {args.jobs} jobs in batches of {args.batch}:"
            f" {max(rates):,.0f} jobs/s (best of {args.repeat}; all: {_listed(rates)})"
        )
        for concurrency in args.concurrency:
            runs = [
                await bench_webhooks(folder, args.deliveries, concurrency)
                for _ in range(args.repeat)
            ]
            rates = [rate for rate, _ in runs]
            say(
                f"webhooks: {args.deliveries} due, hook_concurrency {concurrency}:"
                f" {max(rates):,.0f} webhooks/s (best of {args.repeat}; all: {_listed(rates)});"
                f" each run delivered at least {min(n for _, n in runs)} of {args.deliveries}"
            )


def _listed(rates: Sequence[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs recorded terminal")
    parser.add_argument("--batch", type=int, default=1_000, help="changes per Store.record")
    parser.add_argument("--deliveries", type=int, default=3_000, help="due webhooks to send")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[8, 64], help="hook_concurrency values"
    )
    parser.add_argument("--log-level", default="info", help="the daemon's log level")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--quick", action="store_true", help="one run of each measurement")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.repeat = 1
        args.jobs = min(args.jobs, 2_000)
        args.deliveries = min(args.deliveries, 1_000)
    # The daemon's JSON log lines are part of the cost; they go to /dev/null.
    with Path(os.devnull).open("w") as devnull:
        configure_logging(args.log_level, "json", stream=devnull)
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
