"""Progress: ComfyUI's ``progress`` messages, kept per prompt and written to the jobs table
at most once a second per job (and the last one with the terminal change).

The book is pure and tested with the times passed in. The daemon runs its real loop in
this process against the fake ComfyUI, which broadcasts ``progress`` to every socket for
prompts submitted without a client id, as ComfyUI does; an SQLite trigger counts the
writes of the progress columns.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from comfywatch.config import load_settings
from comfywatch.errors import ParseError
from comfywatch.history import Progress, parse_progress
from comfywatch.progress import ProgressBook
from comfywatch.service import Daemon
from comfywatch.spool.register import jobs_file_text
from comfywatch.spool.register import submit as write_jobs_file
from comfywatch.states import JobState
from comfywatch.store import JobFilter, JobRow, Store
from comfywatch.testing import FakeComfyUI
from comfywatch.views import progress_json

from .conftest import write_config


def step(value: int, top: int = 10, prompt_id: str = "p", node: str | None = "3") -> Progress:
    return Progress(prompt_id=prompt_id, node=node, value=value, max=top)


def always(_server: str, _prompt_id: str) -> bool:
    return True


# -- parsing --------------------------------------------------------------------------------


def test_parse_progress_reads_comfyui_data_and_refuses_garbage() -> None:
    data = {"value": 3, "max": 20, "prompt_id": "abc", "node": "7"}
    assert parse_progress(data) == Progress("abc", "7", 3, 20)
    assert parse_progress({**data, "node": None}).node is None
    assert parse_progress({**data, "node": 12, "value": 3.0}) == Progress("abc", "12", 3, 20)
    for bad in (
        None,
        [],
        {**data, "prompt_id": None},
        {**data, "prompt_id": ""},
        {**data, "value": "3"},
        {**data, "value": -1},
        {**data, "max": True},
        {**data, "max": 2**40},
        {**data, "value": 2.5},
    ):
        with pytest.raises(ParseError):
            parse_progress(bad)


# -- the book -------------------------------------------------------------------------------


def test_a_prompt_is_written_at_most_once_per_gap_and_its_last_progress_always() -> None:
    book = ProgressBook(min_gap_s=1.0)
    book.note("s", step(1), at_s=100.0)
    assert [n.progress.value for n in book.due(0.0, always)] == [1]  # the first at once
    for value, now_m in ((2, 0.1), (3, 0.5), (4, 0.9)):
        book.note("s", step(value), at_s=100.0 + now_m)
        assert book.due(now_m, always) == []  # within the gap: kept, not written
    assert book.next_due_m(always) == 1.0
    [due] = book.due(1.0, always)
    assert (due.progress.value, due.at_s) == (4, 100.9)  # the latest, when it arrived
    assert book.due(5.0, always) == []  # nothing new
    assert book.next_due_m(always) is None


def test_the_latest_progress_stays_for_the_terminal_change_until_forgotten() -> None:
    book = ProgressBook()
    book.note("s", step(10, 10), at_s=1.0)
    assert len(book.due(0.0, always)) == 1
    latest = book.latest("s", "p")
    assert latest is not None and latest.progress.value == 10  # written or not
    book.forget("s", "p")
    assert book.latest("s", "p") is None and len(book) == 0


def test_untracked_prompts_wait_until_a_job_tracks_them() -> None:
    book = ProgressBook()
    tracked: set[tuple[str, str]] = set()

    def tracks(server: str, prompt_id: str) -> bool:
        return (server, prompt_id) in tracked

    book.note("s", step(2, prompt_id="later"), at_s=1.0)
    book.note("t", step(2, prompt_id="later"), at_s=1.0)  # another server's prompt
    assert book.due(0.0, tracks) == [] and book.next_due_m(tracks) is None
    tracked.add(("s", "later"))
    [due] = book.due(0.0, tracks)
    assert (due.server, due.progress.prompt_id) == ("s", "later")


def test_a_failed_write_is_due_again_and_the_oldest_prompts_go_first() -> None:
    book = ProgressBook(min_gap_s=1.0, max_entries=2)
    book.note("s", step(1), at_s=1.0)
    failed = book.due(0.0, always)
    book.unwritten(failed)
    assert book.due(0.5, always) == []  # tried again one gap later, not at once
    assert len(book.due(1.0, always)) == 1
    book.note("s", step(1, prompt_id="q"), at_s=2.0)
    book.note("s", step(1, prompt_id="r"), at_s=3.0)
    assert len(book) == 2 and book.latest("s", "p") is None


# -- the daemon ---------------------------------------------------------------------------


async def until(condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> None:
    """Wait for ``condition`` (the database has no change event to wait on)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await condition():  # noqa: ASYNC110 - the database has no event
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


@pytest.fixture
async def daemon_of(tmp_path: Path) -> AsyncIterator[Callable[[Path], Any]]:
    """Run a daemon's real loop in a task (migrated first, so a test can add a trigger)."""
    started: list[tuple[Daemon, asyncio.Task[int]]] = []

    async def start(config: Path) -> Daemon:
        settings = load_settings(config)
        store = Store.open(settings.daemon.database_url)
        daemon = Daemon(settings, store=store)
        task = asyncio.create_task(daemon.run())
        started.append((daemon, task))
        async with asyncio.timeout(30):
            while not daemon.status.ready:  # noqa: ASYNC110 - a flag, no event to wait on
                await asyncio.sleep(0.01)
        return daemon

    yield start
    for daemon, task in started:
        daemon.request_stop()
        assert await task == 0
        await daemon.store.close()


async def job_of(daemon: Daemon, prompt_id: str) -> JobRow | None:
    records = await daemon.store.jobs(JobFilter(prompt_id=prompt_id))
    return records[0].job if records else None


def count_progress_writes(db: Path) -> None:
    """An SQLite trigger that logs every write of ``jobs.progress_value``."""
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE progress_writes (job_id INTEGER, value INTEGER);
            CREATE TRIGGER log_progress AFTER UPDATE OF progress_value ON jobs
            BEGIN INSERT INTO progress_writes VALUES (new.id, new.progress_value); END;
            """
        )


def progress_writes(db: Path) -> list[int | None]:
    with sqlite3.connect(db) as conn:
        return [value for (value,) in conn.execute("SELECT value FROM progress_writes")]


async def test_broadcast_progress_is_recorded_without_a_write_per_message(
    tmp_path: Path, daemon_of: Callable[[Path], Any]
) -> None:
    """300 progress messages in 1.5 s: the running job shows its progress, a handful of
    writes record it, and the finished job keeps the last one (300/300)."""
    prompt_id = "a1b2c3"
    async with FakeComfyUI(run_time_s=1.5, progress_steps=300) as fake:
        config = write_config(
            tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": prompt_id}]
        )
        db = tmp_path / "comfywatch.db"
        migrated = Store.open(f"sqlite:///{db}")
        await migrated.migrate()
        await migrated.close()
        count_progress_writes(db)
        daemon = await daemon_of(config)
        await fake.wait_requests("GET /ws")
        fake.submit(prompt_id=prompt_id)  # no client id: broadcast to every socket

        async def running_with_progress() -> bool:
            job = await job_of(daemon, prompt_id)
            return job is not None and job.progress_value is not None

        async def finished() -> bool:
            job = await job_of(daemon, prompt_id)
            return job is not None and job.state.terminal

        await until(running_with_progress, "progress recorded while the prompt runs")
        await until(finished, "the job finished")
        job = await job_of(daemon, prompt_id)
        assert job is not None and job.state is JobState.SUCCESS
        progress = progress_json(job)
        assert progress is not None and progress["at"] is not None
        assert (progress["node"], progress["value"], progress["max"]) == ("1", 300, 300)
        writes = progress_writes(db)
        assert writes[-1] == 300
        assert 1 <= len(writes) <= 12, writes  # about one a second, not 300


async def test_a_job_registered_after_its_prompt_ran_gets_its_last_progress(
    tmp_path: Path, daemon_of: Callable[[Path], Any]
) -> None:
    """``submit`` registers through the spool: the prompt may have run before the daemon
    tracks it. The progress seen meanwhile is kept and recorded with the job."""
    async with FakeComfyUI(run_time_s=0.2, progress_steps=4) as fake:
        config = write_config(tmp_path, {"local": fake.url})
        daemon = await daemon_of(config)
        await fake.wait_requests("GET /ws")
        prompt_id = fake.submit()
        await fake.wait_finished(prompt_id)

        async def all_steps_seen() -> bool:
            noted = daemon.progress.latest("local", prompt_id)
            return noted is not None and noted.progress.value == 4

        await until(all_steps_seen, "the daemon saw every progress message")
        text = jobs_file_text("local", [prompt_id], labels={}, hooks=None)
        write_jobs_file(load_settings(config), text)

        async def recorded() -> bool:
            job = await job_of(daemon, prompt_id)
            return job is not None and job.state is JobState.SUCCESS

        await until(recorded, "the job registered and finished")
        job = await job_of(daemon, prompt_id)
        assert job is not None
        assert (job.progress_node, job.progress_value, job.progress_max) == ("1", 4, 4)
        assert daemon.progress.latest("local", prompt_id) is None  # final: forgotten
