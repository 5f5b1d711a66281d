"""Retention: ``comfywatch prune`` and ``[daemon] retention_days``, on a real SQLite file.

The rows are built through the Store API with times chosen by the test (``now_s``), so
"40 days ago" needs no clock tricks; the command line runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from comfywatch.config import load_settings
from comfywatch.history import HistoryRecord, parse_history_entry
from comfywatch.service import Daemon
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, DeliveryState, JobFilter, NewJob, Store
from comfywatch.testing import FakeComfyUI
from comfywatch.views import iso

from .conftest import Clock, jobs_toml, write_config
from .daemon_proc import PgConnection, connect
from .helpers import comfywatch

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")

FIXTURES = Path(__file__).parent / "fixtures"  # recorded ComfyUI answers
DAY_S = 86400.0
WAIT_S = 20.0
MakeDaemon = Callable[[Path], Awaitable[Daemon]]


def history(fixture: str) -> HistoryRecord:
    """The record of a recorded ``GET /history/{id}`` answer (one entry)."""
    [(prompt_id, entry)] = json.loads((FIXTURES / fixture).read_text()).items()
    return parse_history_entry(prompt_id, entry)


@dataclass(frozen=True)
class Row:
    """One job to build: where it ends up, when, and what it owes."""

    prompt_id: str
    days_ago: float
    state: JobState | None  # None: registered and never seen
    history: str | None = None  # fixture whose outputs it gets
    delivery: str | None = None  # the state its one delivery ends in
    pruned: bool = False  # what `prune --older-than 30d` should do to it


ROWS = [
    Row("old-success", 40, JobState.SUCCESS, "success_saveimage_history.json", "delivered", True),
    Row("old-error", 40, JobState.ERROR, "runtime_error_history.json", "dead", True),
    Row("old-lost", 31, JobState.LOST, pruned=True),
    Row("old-pending-hook", 40, JobState.SUCCESS, "success_saveimage_history.json", "pending"),
    Row("old-running", 40, JobState.RUNNING),
    Row("old-registered", 40, None),
    Row("young-success", 29, JobState.SUCCESS, "batch2_history.json", "delivered"),
    Row("young-error", 1, JobState.ERROR, "runtime_error_history.json", "dead"),
]


async def build(store: Store, now_s: float, rows: list[Row] = ROWS) -> None:
    """Register each row a day before its time, then record its state at its time."""
    await store.migrate()
    for row in rows:
        at_s = now_s - row.days_ago * DAY_S
        hooks = ("notify",) if row.delivery else ()
        await store.register([NewJob("local", row.prompt_id, {}, hooks, "test")], at_s - DAY_S)
        if row.state is None:
            continue
        [job] = [j for j in await store.active_jobs() if j.prompt_id == row.prompt_id]
        terminal = row.state.terminal
        reason = None
        if terminal:
            reason = Reason.FINISHED if row.history else Reason.SERVER_RESTARTED
        change = Change(
            job.id,
            row.state,
            reason=reason,
            history=history(row.history) if row.history else None,
            deliveries=list(hooks),
        )
        assert await store.record([change], at_s) == [job.id]
        if row.delivery and row.delivery != DeliveryState.PENDING:
            [(delivery, _)] = [
                (d, j) for d, j in await store.deliveries() if j.prompt_id == row.prompt_id
            ]
            await store.finish_attempt(
                delivery.id,
                state=row.delivery,
                now_s=at_s,
                next_attempt_s=None,
                status_code=200 if row.delivery == DeliveryState.DELIVERED else 500,
                error=None if row.delivery == DeliveryState.DELIVERED else "HTTP 500",
                response=None,
            )


Snapshot = dict[str, list[dict[str, object]]]


def snapshot(db: str) -> Snapshot:
    """Every row of the three tables (column -> value), read as an operator would."""
    tables = ("jobs", "job_outputs", "hook_deliveries")
    with connect(db) as conn:
        if isinstance(conn, PgConnection):
            return {t: conn.dicts(f"SELECT * FROM {t} ORDER BY id") for t in tables}
        conn.row_factory = sqlite3.Row
        return {
            t: [dict(row) for row in conn.execute(f"SELECT * FROM {t} ORDER BY id")] for t in tables
        }


def prompts(snap: Snapshot) -> dict[object, str]:
    """Job id -> prompt id."""
    return {row["id"]: str(row["prompt_id"]) for row in snap["jobs"]}


async def built_database(tmp_path: Path, now_s: float, **daemon: object) -> Path:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, daemon=daemon)
    store = Store.open(load_settings(config).daemon.database_url)
    try:
        await build(store, now_s)
    finally:
        await store.close()
    return config


async def test_prune_dry_run_counts_and_changes_nothing(
    tmp_path: Path, clock: Clock, backend: str
) -> None:
    config = await built_database(tmp_path, clock.now)
    db = backend
    before = snapshot(db)
    assert len(before["job_outputs"]) > 0 and len(before["hook_deliveries"]) == 5

    code, out, err = await comfywatch(
        "prune", "--older-than", "30d", "--dry-run", "--config", str(config)
    )
    assert code == 0, err
    assert out.startswith("would delete 3 jobs finished before ")
    assert snapshot(db) == before


async def test_prune_dry_run_lists_what_would_go_and_what_is_kept_and_why(
    tmp_path: Path, clock: Clock
) -> None:
    config = await built_database(tmp_path, clock.now)
    config.write_text(
        config.read_text() + "\n" + jobs_toml([{"server": "local", "prompt_id": "old-success"}])
    )
    code, out, err = await comfywatch(
        "prune", "--older-than", "30d", "--dry-run", "--config", str(config)
    )
    assert code == 0, err

    def ended(prompt_id: str) -> str:
        [row] = [r for r in ROWS if r.prompt_id == prompt_id]
        return iso(datetime.fromtimestamp(clock.now - row.days_ago * DAY_S, tz=UTC)) or ""

    sections = out.split("\nkept ")
    assert len(sections) == 3, out
    doomed, listed, owing = (section.splitlines() for section in sections)
    assert doomed[0].startswith("would delete 2 jobs finished before ")
    assert doomed[1].split() == ["SERVER", "PROMPT_ID", "STATE", "FINISHED"]
    # Oldest first: each with its server, state and end.
    assert [line.split() for line in doomed[2:]] == [
        ["local", "old-error", "error", ended("old-error")],
        ["local", "old-lost", "lost", ended("old-lost")],
    ]
    assert listed[0] == f"1 job listed in the [[jobs]] of {config}:"
    assert "registers these again" in listed[1] and "as a new job" in listed[1]
    assert [line.split() for line in listed[3:]] == [
        ["local", "old-success", "success", ended("old-success")]
    ]
    assert owing[0] == "1 job still owing a hook delivery:"
    assert [line.split()[1] for line in owing[3:]] == ["old-pending-hook"]


async def test_prune_removes_exactly_old_terminal_jobs_with_their_rows(
    tmp_path: Path, clock: Clock, backend: str
) -> None:
    """Old terminal jobs go with their outputs and finished deliveries; non-terminal jobs,
    young jobs and jobs still owing a delivery stay, their rows untouched."""
    config = await built_database(tmp_path, clock.now)
    db = backend
    before = snapshot(db)
    ids = {prompt: job_id for job_id, prompt in prompts(before).items()}
    gone = {ids[r.prompt_id] for r in ROWS if r.pruned}
    assert any(row["job_id"] in gone for row in before["job_outputs"])  # something to delete

    code, out, err = await comfywatch("prune", "--older-than", "30d", "--config", str(config))
    assert code == 0, err
    assert out.startswith("deleted 3 jobs finished before ")

    after = snapshot(db)
    assert set(prompts(after).values()) == {r.prompt_id for r in ROWS if not r.pruned}
    for table in ("jobs", "job_outputs", "hook_deliveries"):
        owner = "id" if table == "jobs" else "job_id"
        kept = [row for row in before[table] if row[owner] not in gone]
        assert after[table] == kept, table  # the rest is exactly what it was
    assert [row["job_id"] for row in after["hook_deliveries"]] == [
        ids["old-pending-hook"],
        ids["young-success"],
        ids["young-error"],
    ]

    code, out, _ = await comfywatch("prune", "--older-than", "30d", "--config", str(config))
    assert code == 0 and out.startswith("deleted 0 jobs ")


async def test_prune_age_units_and_bad_ages(tmp_path: Path, clock: Clock) -> None:
    config = await built_database(tmp_path, clock.now)
    # 35 days, in hours, days or weeks: only the 40-day-old ones.
    for age in (f"{35 * 24}h", "35d", "5w"):
        code, out, _ = await comfywatch(
            "prune", "--older-than", age, "--dry-run", "--config", str(config)
        )
        assert code == 0 and out.startswith("would delete 2 jobs "), age
    # A bare number could be any unit: refused, in one line.
    code, out, err = await comfywatch("prune", "--older-than", "35", "--config", str(config))
    assert (code, out) == (2, "") and err.count("\n") == 1 and "30d" in err
    code, out, _ = await comfywatch(
        "prune", "--older-than", "0", "--dry-run", "--config", str(config)
    )
    assert code == 0 and out.startswith("would delete 5 jobs ")
    code, _, err = await comfywatch("prune", "--older-than", "soon", "--config", str(config))
    assert code == 2 and "soon" in err
    code, _, err = await comfywatch("prune", "--config", str(config))
    assert code == 2 and "--older-than" in err


async def test_prune_keeps_main_file_jobs_and_prunes_spooled_ones(
    tmp_path: Path, clock: Clock, backend: str
) -> None:
    """A job the main file names is kept: every load registers it again, as a new job once
    pruned. A job a spool file named is pruned like any other, whatever waits in the spool
    (the command never reads it: not the same job again, not a broken file)."""
    config = await built_database(tmp_path, clock.now)
    config.write_text(
        config.read_text() + "\n" + jobs_toml([{"server": "local", "prompt_id": "old-success"}])
    )
    waiting = tmp_path / "jobs.d" / "again.toml"
    waiting.write_text(jobs_toml([{"server": "local", "prompt_id": "old-error"}]))
    (tmp_path / "jobs.d" / "broken.toml").write_text("[[jobs]\n")
    code, out, err = await comfywatch("prune", "--older-than", "30d", "--config", str(config))
    assert code == 0, err
    assert out.startswith("deleted 2 jobs ")
    left = set(prompts(snapshot(backend)).values())
    assert "old-success" in left and "old-error" not in left
    assert sorted(p.name for p in (tmp_path / "jobs.d").iterdir()) == ["again.toml", "broken.toml"]


async def wait_until(check: Callable[[], bool | Awaitable[bool]]) -> None:
    """Re-check a condition until it holds (bounded)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.02)


async def eventually_prompts(store: Store, want: set[str]) -> None:
    async def done() -> bool:
        return set(prompts_of(await store_jobs(store))) == want

    await wait_until(done)


async def store_jobs(store: Store) -> list[tuple[str, str]]:
    return [(r.job.prompt_id, r.job.state) for r in await store.jobs(JobFilter())]


def prompts_of(rows: list[tuple[str, str]]) -> list[str]:
    return [prompt for prompt, _ in rows]


def ticks(daemon: Daemon) -> float:
    return daemon.metrics.registry.get_sample_value("comfywatch_ticks_total") or 0.0


#: What the daemon test builds: terminal jobs only, owing nothing (the daemon would poll
#: the others, and mark a delivery to an unconfigured hook dead before pruning).
SETTLED = [r for r in ROWS if r.state is not None and r.state.terminal and r.delivery != "pending"]


async def wait_ticks(daemon: Daemon, count: int) -> None:
    """Wait until ``count`` more ticks have completed (each with its housekeeping)."""
    target = ticks(daemon) + count
    await wait_until(lambda: ticks(daemon) >= target)


async def test_daemon_prunes_by_retention_days_at_most_hourly(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """With ``retention_days = 30`` the running daemon prunes what the CLI would, once at
    start and then once an hour (by its clock), not on every tick."""
    config = write_config(tmp_path, {"local": fake.url}, daemon={"retention_days": 30})
    store = Store.open(load_settings(config).daemon.database_url)
    try:
        await build(store, clock.now, SETTLED)
        daemon = await make_daemon(config)
        runner = asyncio.create_task(daemon.run())
        try:
            kept = {r.prompt_id for r in SETTLED if not r.pruned}
            await eventually_prompts(store, kept)
            await wait_ticks(daemon, 1)  # that prune run is over (it works in batches)

            # Another old job: the next prune is an hour away on the daemon's clock.
            await build(store, clock.now, [Row("late-old", 40, JobState.LOST)])
            await wait_ticks(daemon, 3)
            assert "late-old" in prompts_of(await store_jobs(store))
            clock.advance(3601)
            await eventually_prompts(store, kept)
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(runner, WAIT_S) == 0
    finally:
        await store.close()


async def test_daemon_prunes_spooled_jobs_and_files_but_keeps_main_file_jobs(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """The daemon's retention: a job the main file names stays (the next load would register
    it again as new, to end as not_found and fire its hooks a second time); a job a spool
    file registered goes like any other. Files in done/ and rejected/ go retention_days
    after they arrived there."""
    fixture = "success_saveimage_history.json"
    # 20 days old: nothing is due before the clock moves, so the spool file naming
    # from-spool is read while its job is still there (a job pruned before its file is
    # read would be registered anew), however the machine schedules the first passes.
    kept = Row("from-main-file", 20, JobState.SUCCESS, fixture, "delivered")
    spooled = Row("from-spool", 20, JobState.SUCCESS, fixture, "delivered")
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": kept.prompt_id}],
        daemon={"retention_days": 30},
    )
    spool = tmp_path / "jobs.d"
    (spool / "again.toml").write_text(jobs_toml([{"server": "local", "prompt_id": "from-spool"}]))
    (spool / "bad.toml").write_text("[[jobs]\n")
    store = Store.open(load_settings(config).daemon.database_url)
    try:
        await build(store, clock.now, [kept, spooled])
        daemon = await make_daemon(config)
        runner = asyncio.create_task(daemon.run())
        try:
            await wait_until(lambda: (spool / "done" / "again.toml").exists())
            assert (spool / "rejected" / "bad.toml").exists()
            assert (spool / "rejected" / "bad.error").exists()
            await wait_ticks(daemon, 1)
            assert sorted(prompts_of(await store_jobs(store))) == ["from-main-file", "from-spool"]

            # The jobs ended, and the files arrived, over 30 days ago (by this clock).
            clock.advance(31 * DAY_S)
            await eventually_prompts(store, {kept.prompt_id})
            await wait_until(lambda: not any((spool / "done").iterdir()))
            await wait_until(lambda: not any((spool / "rejected").iterdir()))
            assert prompts_of(await store_jobs(store)) == [kept.prompt_id]
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(runner, WAIT_S) == 0
    finally:
        await store.close()
