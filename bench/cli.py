"""How fast the command line answers on a large database: ``python -m bench.cli``.

Builds (once, then reuses) a SQLite database of terminal jobs with outputs, history entries
and hook deliveries, written with bulk Core inserts, and times ``comfywatch --version``,
``jobs --limit 20``, ``show ID`` and ``jobs --json --limit 10000``, each as a subprocess:
the median of a few runs, beside its target. A measurement, not a test: nothing here fails
on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from comfywatch.history import OutputRecord
from comfywatch.store import Store, output_columns
from comfywatch.store.models import HookDelivery, Job, JobOutput

#: Bumped whenever the generated data changes, so that a cached database is rebuilt.
DATA_VERSION = 1
BATCH = 5_000
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    target_s: float
    with_config: bool = True


def prompt_id(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i * 7919:012x}"


def _history(i: int, state: str) -> dict[str, Any]:
    """A history entry of about a kilobyte, shaped like ComfyUI's."""
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": i, "steps": 20, "cfg": 7.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk " * 8}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}},
    }
    return {
        "prompt": [i, prompt_id(i), graph, {"client_id": "bench"}, ["9"]],
        "outputs": {"9": {"images": [{"filename": f"ComfyUI_{i:06d}_.png", "type": "output"}]}},
        "status": {
            "status_str": state,
            "completed": state == "success",
            "messages": [["execution_start", {"prompt_id": prompt_id(i)}]],
        },
    }


def _job(i: int) -> dict[str, Any]:
    state = "error" if i % 20 == 0 else "success"
    at = START + timedelta(seconds=60 * i)
    failed = state == "error"
    return {
        "id": i,
        "server": f"gpu-{i % 4}",
        "prompt_id": prompt_id(i),
        "state": state,
        "reason": "finished",
        "status_str": state,
        "completed": not failed,
        "number": i,
        "labels": {"batch": f"b{i // 100}", "user": f"u{i % 7}"},
        "hooks": ["notify"] if i % 2 == 0 else [],
        "source": f"/etc/comfywatch/jobs.d/batch-{i // 100}.toml",
        "registered_at": at,
        "queued_at": at + timedelta(seconds=1),
        "started_at": at + timedelta(seconds=2),
        "finished_at": at + timedelta(seconds=30),
        "detected_at": at + timedelta(seconds=31),
        "updated_at": at + timedelta(seconds=31),
        "comfy_created_at_ms": int(at.timestamp() * 1000) + 1000,
        "comfy_started_at_ms": int(at.timestamp() * 1000) + 2000,
        "comfy_finished_at_ms": int(at.timestamp() * 1000) + 30000,
        "error_node_id": "9" if failed else None,
        "error_node_type": "SaveImage" if failed else None,
        "error_exception_type": "OSError" if failed else None,
        "error_exception_message": "No space left on device" if failed else None,
        "error_traceback": "Traceback (most recent call last):\n  ...\n" if failed else None,
        "history": _history(i, state),
    }


def _outputs(i: int) -> Iterator[dict[str, Any]]:
    image = OutputRecord("9", "images", 0, f"ComfyUI_{i:06d}_.png", "", "output")
    yield {"job_id": i, **output_columns(image)}
    if i % 10 == 0:
        yield {"job_id": i, **output_columns(OutputRecord("12", "text", 0, value=["a caption"]))}


def _delivery(i: int) -> dict[str, Any]:
    at = START + timedelta(seconds=60 * i + 31)
    return {
        "job_id": i,
        "hook": "notify",
        "event_id": f"msg_{i:032x}",
        "event_type": "job.error" if i % 20 == 0 else "job.success",
        "state": "delivered",
        "attempts": 1,
        "last_status_code": 200,
        "created_at": at,
        "updated_at": at,
        "delivered_at": at,
    }


async def build(db: Path, jobs: int) -> None:
    """A database of ``jobs`` terminal jobs (ids 1..jobs), migrated like the daemon does."""
    store = Store.open(f"sqlite:///{db}")
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            for start in range(1, jobs + 1, BATCH):
                ids = range(start, min(start + BATCH, jobs + 1))
                await conn.execute(insert(Job.__table__), [_job(i) for i in ids])
                outputs = [out for i in ids for out in _outputs(i)]
                await conn.execute(insert(JobOutput.__table__), outputs)
                deliveries = [_delivery(i) for i in ids if i % 2 == 0]
                await conn.execute(insert(HookDelivery.__table__), deliveries)
    finally:
        await store.close()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def command() -> list[str]:
    """The installed ``comfywatch`` script beside this interpreter, else ``-m comfywatch``."""
    script = Path(sys.executable).with_name("comfywatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "comfywatch"]


def cpu_s() -> float:
    """CPU seconds (user and system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: Sequence[str]) -> tuple[float, bytes]:
    # Bytecode is cached as an installed package's is (pip compiles it): without it every
    # run would compile comfywatch's modules again.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed, done.stdout


def check(case: Case, out: bytes, show_id: str) -> None:
    """The answer is the one asked for (a fast wrong answer is no answer)."""
    if "--json" in case.args:
        rows = json.loads(out)
        assert len(rows) == 10_000 and all(r["outputs"] for r in rows), case.name
    elif case.args[0] == "show":
        assert show_id.encode() in out and b"outputs (1):" in out, case.name
    elif case.args[0] == "jobs":
        assert len(out.splitlines()) == 21, case.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the database")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command")
    default_dir = Path(tempfile.gettempdir()) / "comfywatch-bench-cli"
    parser.add_argument("--dir", type=Path, default=default_dir, help="where the database is")
    parser.add_argument("--rebuild", action="store_true", help="build the database again")
    parser.add_argument("--quick", action="store_true", help="two timed runs per command")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 2)

    args.dir.mkdir(parents=True, exist_ok=True)
    db = args.dir / f"jobs-{args.jobs}-v{DATA_VERSION}.db"
    if args.rebuild:
        for path in args.dir.glob(db.name + "*"):
            path.unlink()
    if not db.exists():
        started = time.perf_counter()
        building = db.with_suffix(".building")
        for path in args.dir.glob(building.name + "*"):
            path.unlink()
        asyncio.run(build(building, args.jobs))
        building.rename(db)
        say(f"built {db} ({args.jobs} jobs) in {time.perf_counter() - started:.1f} s")
    config = args.dir / "comfywatch.toml"
    config.write_text(
        f'[daemon]\ndatabase = "sqlite:///{db}"\n\n[servers.gpu-0]\nurl = "http://127.0.0.1:9"\n'
    )

    # A database built by an older comfywatch gets this one's schema (new indexes).
    run([*command(), "migrate", "--config", str(config)])
    show_id = prompt_id(args.jobs // 2 + 1)
    cases = [
        Case("comfywatch --version", ("--version",), 0.15, with_config=False),
        Case("jobs --limit 20", ("jobs", "--limit", "20"), 0.6),
        Case("show ID", ("show", show_id), 0.6),
        Case("jobs --json --limit 10000", ("jobs", "--json", "--limit", "10000"), 1.5),
    ]
    # CPU time beside wall time: on a shared, loaded machine it is the steadier figure.
    say(f"{'command':28} {'median':>8} {'min':>8} {'cpu':>8} {'target':>8}")
    for case in cases:
        argv = [*command(), *case.args, *(("--config", str(config)) if case.with_config else ())]
        _, out = run(argv)  # warm the page cache; check the answer
        check(case, out, show_id)
        cpu_before = cpu_s()
        times = [run(argv)[0] for _ in range(args.runs)]
        cpu = (cpu_s() - cpu_before) / args.runs
        median = statistics.median(times)
        verdict = "ok" if median <= case.target_s else "SLOW"
        figures = f"{median:7.3f}s {min(times):7.3f}s {cpu:7.3f}s {case.target_s:7.2f}s"
        say(f"{case.name:28} {figures}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
