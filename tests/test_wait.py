"""``comfywatch wait``: exit statuses from a real SQLite file written by the store, and jobs
still waiting in the spool, followed into the database (or to ``rejected/``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from comfywatch.cli.wait import JobWatch
from comfywatch.config import load_settings
from comfywatch.metrics import Metrics
from comfywatch.spool import Spool
from comfywatch.spool.inbox import reject, waiting_names
from comfywatch.spool.register import jobs_file_text
from comfywatch.spool.register import submit as write_jobs_file
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, NewJob, Store

from .conftest import write_config
from .daemon_proc import run_cli

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")

NOW_S = 1_800_000_000.0


async def finish(store: Store, endings: dict[str, JobState | None]) -> None:
    """Register a job per prompt id, and record the terminal ones (``None``: left active)."""
    await store.register([NewJob("local", p, {}, (), "test") for p in endings], NOW_S)
    ids = {job.prompt_id: job.id for job in await store.active_jobs()}
    changes = [
        Change(ids[p], state, Reason.FINISHED) for p, state in endings.items() if state is not None
    ]
    await store.record(changes, NOW_S + 1)


async def prepared(tmp_path: Path, endings: dict[str, JobState | None]) -> Path:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    store = Store.open(load_settings(config).daemon.database_url)
    try:
        await store.migrate()
        await finish(store, endings)
    finally:
        await store.close()
    return config


async def test_wait_exit_statuses(tmp_path: Path) -> None:
    """0: every job succeeded; 1: one ended otherwise; 2: an unknown id; 124: timeout."""
    config = await prepared(tmp_path, {"ok": JobState.SUCCESS, "bad": JobState.LOST, "busy": None})
    code, out, err = await run_cli("wait", "ok", "--config", str(config))
    assert (code, out) == (0, "local ok success finished\n"), err

    code, out, _ = await run_cli("wait", "ok", "bad", "--config", str(config))
    assert code == 1
    assert out.splitlines() == ["local ok success finished", "local bad lost finished"]

    code, out, err = await run_cli("wait", "ok", "nope", "--config", str(config))
    assert (code, out) == (2, "")
    assert "unknown prompt id 'nope': not in the database nor the spool" in err

    code, out, err = await run_cli(
        "wait", "ok", "busy", "--timeout", "0.5", "--config", str(config)
    )
    assert (code, out) == (124, "local ok success finished\n")
    assert "timed out; still waiting for busy" in err

    code, _, err = await run_cli("wait", "ok", "--server", "other", "--config", str(config))
    assert code == 2 and "unknown prompt id 'ok' on other" in err


async def test_wait_with_no_database_yet_waits_for_the_spool(tmp_path: Path) -> None:
    """A job registered through the spool before any daemon ran: waited for (124 when the
    time runs out, not 2), then followed into the database once a spool pass commits it."""
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    settings = load_settings(config)
    write_jobs_file(settings, jobs_file_text("local", ["later"], labels={}, hooks=None))
    code, _, err = await run_cli("wait", "later", "--timeout", "0.5", "--config", str(config))
    assert code == 124, err
    assert "still waiting for later" in err

    waiting = asyncio.create_task(run_cli("wait", "later", "--config", str(config)))
    store = Store.open(settings.daemon.database_url)
    try:
        await store.migrate()
        [job] = await Spool(settings, metrics=Metrics()).ingest(store, now_s=NOW_S, budget_s=10.0)
        await store.record([Change(job.id, JobState.SUCCESS, Reason.FINISHED)], NOW_S + 1)
    finally:
        await store.close()
    code, out, err = await waiting
    assert (code, out) == (0, "local later success finished\n"), err


async def test_a_spool_file_is_followed_into_the_database_or_to_rejected(
    tmp_path: Path,
) -> None:
    """Each look reads the spool, then the database: a job is in one or the other, and a
    file set aside says why."""
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    settings = load_settings(config)
    inbox = tmp_path / "jobs.d"
    write_jobs_file(settings, jobs_file_text("local", ["kept"], labels={}, hooks=None))
    write_jobs_file(settings, jobs_file_text("local", ["refused"], labels={}, hooks=None))
    watch = JobWatch(settings)
    look = watch.look(["kept", "refused", "stranger"])
    assert look.spooled == {"kept", "refused"} and look.unknown == {"stranger"}

    store = Store.open(settings.daemon.database_url)
    try:
        await store.migrate()
        names = waiting_names(inbox) or []
        refused = next(n for n in names if "refused" in (inbox / n).read_text())
        reject(inbox, refused, "jobs[0].server: unknown server 'gpu-2'")
        await Spool(settings, metrics=Metrics()).ingest(store, now_s=NOW_S, budget_s=10.0)
    finally:
        await store.close()
    look = watch.look(["kept", "refused"])
    assert look.spooled == frozenset() and look.unknown == frozenset()
    assert [row.state for row in look.jobs["kept"]] == [JobState.REGISTERED]
    assert not look.ended("kept")
    assert look.ended("refused") and not look.succeeded("refused")
    assert "its spool file was rejected" in look.rejected["refused"]
    assert "unknown server 'gpu-2'" in look.rejected["refused"]
