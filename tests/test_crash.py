"""Faults outside the daemon's control: it is killed, stopped mid-tick, or its database is busy.

Each test runs ``comfywatch run`` as a real child process (``tests/daemon_proc.py``) against
the fake ComfyUI served by the test's own event loop on a real port, and reads the real
SQLite file with the standard library's ``sqlite3``, as an operator would. The kills and stops
run on PostgreSQL too (the ``backend`` fixture); the busy-database ones are SQLite's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from comfywatch.testing import FakeComfyUI, Outcome

from .conftest import jobs_toml, toml_value, write_config
from .daemon_proc import (
    DaemonProcess,
    PgConnection,
    connect,
    integrity_problems,
    job_states,
    output_count,
    run_cli,
)

ACTIVE = ("registered", "queued", "running")
FINISHED = ("success", "error", "interrupted")

#: Three output nodes: a success records three files; an error or an interrupt stops at the
#: last one, so it still records two (outputs of failed jobs must be whole too).
GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a/x"}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b/y"}},
}


def drop_in(folder: Path, name: str, prompt_ids: list[str]) -> None:
    """Register jobs the documented way: write a hidden file, then rename it into jobs.d."""
    tmp = folder / "jobs.d" / f".{name}.tmp"
    tmp.write_text(jobs_toml([{"server": "local", "prompt_id": p} for p in prompt_ids]))
    tmp.rename(folder / "jobs.d" / f"{name}.toml")


def entry_outputs(entry: dict[str, Any]) -> set[tuple[Any, ...]]:
    """The output records of a history entry, as comparable rows."""
    rows = set()
    for node_id, node in entry["outputs"].items():
        for kind, items in node.items():
            for position, item in enumerate(items):
                rows.add(
                    (node_id, kind, position, item["filename"], item["subfolder"], item["type"])
                )
    return rows


def fake_outcome(entry: dict[str, Any]) -> str:
    """How the fake ComfyUI ended a prompt, from its history entry's terminal message."""
    name = entry["status"]["messages"][-1][0]
    return {
        "execution_success": "success",
        "execution_error": "error",
        "execution_interrupted": "interrupted",
    }[name]


def has_schema(database: str) -> bool:
    """Whether the daemon's migration has created the tables (a SQLite file may not be
    there yet)."""
    if database.startswith("sqlite"):
        path = Path(database.split("///", 1)[1])
        if not path.exists():
            return False
    with connect(database) as conn:
        if isinstance(conn, PgConnection):
            return bool(conn.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()[0])  # type: ignore[index]
        return bool(conn.execute("SELECT name FROM sqlite_master").fetchall())


def stored_outputs(conn: sqlite3.Connection, prompt_id: str) -> set[tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT o.node_id, o.kind, o.position, o.filename, o.subfolder, o.type"
        " FROM job_outputs o JOIN jobs j ON j.id = o.job_id WHERE j.prompt_id = ?",
        (prompt_id,),
    ).fetchall()
    as_set = {tuple(r) for r in rows}
    assert len(as_set) == len(rows), f"duplicate output rows for {prompt_id}"
    return as_set


def duplicate_outputs(conn: sqlite3.Connection) -> list[Any]:
    return conn.execute(
        "SELECT job_id, node_id, kind, position, count(*) FROM job_outputs"
        " GROUP BY job_id, node_id, kind, position HAVING count(*) > 1"
    ).fetchall()


def terminal_rows(conn: sqlite3.Connection) -> dict[str, tuple[Any, ...]]:
    """Everything recorded about each terminal job, outputs included (for comparisons)."""
    rows = conn.execute(
        "SELECT j.prompt_id, j.state, j.reason, j.status_str, j.completed, j.detected_at,"
        " j.finished_at, j.started_at, j.updated_at, j.error_node_id, j.error_exception_type,"
        " j.comfy_finished_at_ms, (SELECT count(*) FROM job_outputs o WHERE o.job_id = j.id)"
        " FROM jobs j WHERE j.state NOT IN (?, ?, ?)",
        ACTIVE,
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def check_whole(conn: sqlite3.Connection, fake: FakeComfyUI) -> None:
    """No terminal job is half-written: state, reason, detected_at and outputs go together."""
    assert integrity_problems(conn) == []
    assert duplicate_outputs(conn) == []
    for prompt_id, row in terminal_rows(conn).items():
        state, reason, status_str, _completed, detected_at = row[:5]
        outputs = row[-1]
        assert detected_at is not None and reason is not None, (prompt_id, row)
        if state in FINISHED:
            entry = fake.history_entry(prompt_id)
            assert entry is not None, f"{prompt_id} recorded {state} without a history entry"
            assert state == fake_outcome(entry), (prompt_id, row)
            assert status_str == entry["status"]["status_str"], (prompt_id, row)
            assert outputs == output_count(entry), (prompt_id, row)
            assert stored_outputs(conn, prompt_id) == entry_outputs(entry)
        else:
            assert outputs == 0, (prompt_id, row)


@dataclass
class Plan:
    """What the test did to each prompt, hence what must be recorded for it."""

    outcome: dict[str, Outcome] = field(default_factory=dict)  # ran to this outcome
    gone_unwatched: set[str] = field(default_factory=set)  # deleted while no daemon ran
    gone_watched: set[str] = field(default_factory=set)  # deleted while the daemon watched

    def expected(self, prompt_id: str) -> tuple[str, str]:
        if prompt_id in self.gone_unwatched:
            return "lost", "left_unobserved"
        if prompt_id in self.gone_watched:
            return "cancelled", "deleted_from_queue"
        return self.outcome[prompt_id], "finished"

    @property
    def all(self) -> set[str]:
        return set(self.outcome) | self.gone_unwatched | self.gone_watched


# -- 1. the daemon dies ----------------------------------------------------------------------


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nothing_and_half_writes_nothing(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    """SIGKILL again and again, at moments drawn from a seeded RNG: start-up, migration,
    registration, polls, commits. After every kill the database is sound, every terminal job
    is whole (state, reason, detected_at and every output row together) and no terminal job
    ever changes again. A last run with --until-done resumes every unfinished job and ends
    with each one recorded exactly as the fake ComfyUI ran it, and recorded once."""
    rng = random.Random(20261127)
    config = write_config(tmp_path, {"local": fake.url})
    plan = Plan()
    lives: list[DaemonProcess] = []
    seen_terminal: dict[str, tuple[Any, ...]] = {}  # terminal rows found after earlier kills
    kills_with_work_left = 0

    def submit_batch(size: int) -> list[str]:
        batch = []
        for _ in range(size):
            roll = rng.random()
            outcome: Outcome = (
                "success" if roll < 0.75 else "error" if roll < 0.9 else "interrupted"
            )
            pid = fake.submit(GRAPH, outcome=outcome, run_time_s=rng.uniform(0.005, 0.04))
            plan.outcome[pid] = outcome
            batch.append(pid)
        return batch

    try:
        for life in range(16):
            # The fake ComfyUI holds the batch until the daemon starts, so that kills land
            # while jobs finish. Every fourth life it holds it for the whole life: the batch
            # stays pending, and some of it is deleted while no daemon runs.
            hold = life % 4 == 1
            fake.pause()
            batch = submit_batch(25)
            late_drop_in = not hold and life % 2 == 0  # picked up by the running daemon
            if not late_drop_in:
                drop_in(tmp_path, f"life-{life:02}", batch)
            proc = await DaemonProcess.start(config)
            lives.append(proc)
            if life % 3 == 0:
                # Any moment from the very start: imports, migration, registration, ticks.
                if late_drop_in:
                    drop_in(tmp_path, f"life-{life:02}", batch)
                if not hold:
                    fake.resume()
                await asyncio.sleep(rng.uniform(0.05, 2.0))
            else:
                await proc.wait_event("daemon_started")
                if late_drop_in:
                    drop_in(tmp_path, f"life-{life:02}", batch)
                if hold:
                    # A tick of this daemon has recorded the batch as queued (one commit).
                    await proc.wait_event(
                        "job_state_changed",
                        lambda e, batch=frozenset(batch): e.get("prompt_id") in batch,
                        timeout_s=60,
                    )
                else:
                    fake.resume()
                await asyncio.sleep(rng.uniform(0.05, 0.6))  # the random kill moment
            code = await proc.kill()
            assert code == -signal.SIGKILL, f"the daemon exited on its own\n{proc.describe()}"

            states: dict[str, str] = {}
            # Migrations are one transaction: either the whole schema is there or none.
            with connect(backend) if has_schema(backend) else contextlib.nullcontext() as conn:
                if conn:
                    check_whole(conn, fake)
                    now = terminal_rows(conn)
                    for prompt_id, row in seen_terminal.items():
                        assert now.get(prompt_id) == row, f"terminal job {prompt_id} changed"
                    seen_terminal.update(now)
                    states = job_states(conn)
            if any(s in ACTIVE for s in states.values()):
                kills_with_work_left += 1
            if hold:
                queued = [p for p in batch if states.get(p) == "queued"]
                gone = queued[: rng.randint(3, 8)]
                assert fake.delete_from_queue(gone) == len(gone)
                for pid in gone:
                    del plan.outcome[pid]
                    plan.gone_unwatched.add(pid)
            fake.resume()

        # The last life, left to finish. Some prompts are deleted from the queue while it
        # watches them: it has seen them queued (a whole tick ran), so they are cancelled.
        fake.pause()
        watched = submit_batch(20)
        drop_in(tmp_path, "last", watched)
        proc = await DaemonProcess.start(config, "--until-done")
        lives.append(proc)
        # A tick of this daemon has recorded the batch as queued (one commit).
        await proc.wait_event(
            "job_state_changed",
            lambda e: e.get("prompt_id") in watched and e.get("state") == "queued",
            timeout_s=60,
        )
        gone = watched[::3]
        assert fake.delete_from_queue(gone) == len(gone)
        for pid in gone:
            del plan.outcome[pid]
            plan.gone_watched.add(pid)
        fake.resume()
        assert await proc.wait() == 0, proc.describe()
        assert proc.named("all_done")
    finally:
        for proc in lives:
            await proc.close()

    # The test exercised what it claims to (the held lives alone guarantee three kills with
    # jobs left to track; most others have some too, but that depends on the machine's pace).
    assert kills_with_work_left >= 3, kills_with_work_left
    assert len(plan.gone_unwatched) >= 9 and len(plan.gone_watched) >= 5
    assert {plan.outcome[p] for p in plan.outcome} == set(FINISHED)

    with connect(backend) as conn:
        check_whole(conn, fake)
        now = terminal_rows(conn)
        for prompt_id, row in seen_terminal.items():
            assert now.get(prompt_id) == row, f"terminal job {prompt_id} changed"
        rows = conn.execute("SELECT prompt_id, state, reason FROM jobs").fetchall()
        assert len(rows) == len({r[0] for r in rows}) == len(plan.all)
        got = {r[0]: (r[1], r[2]) for r in rows}
        assert got == {pid: plan.expected(pid) for pid in plan.all}
        for pid in plan.all:
            entry = fake.history_entry(pid)
            if pid in plan.outcome:
                assert entry is not None
                assert stored_outputs(conn, pid) == entry_outputs(entry)
            else:
                assert entry is None and stored_outputs(conn, pid) == set()
        undetected = conn.execute(
            "SELECT count(*) FROM jobs WHERE detected_at IS NULL OR reason IS NULL"
        ).fetchone()[0]
        assert undetected == 0

    # Recorded once: across all lives no job was logged finished twice, and what was logged
    # is what is stored (a log line follows its commit, so a kill can only lose the line).
    finished = [e for proc in lives for e in proc.named("job_finished")]
    per_prompt = Counter(e["prompt_id"] for e in finished)
    assert [p for p, n in per_prompt.items() if n > 1] == []
    assert all(got[e["prompt_id"]] == (e["state"], e["reason"]) for e in finished)


# -- 2. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["GET /queue", "GET /history/{id}"])
async def test_sigterm_during_a_hung_tick_exits_0_with_nothing_half_written(
    tmp_path: Path, fake: FakeComfyUI, backend: str, route: str
) -> None:
    """A poll stuck on a request that never answers: SIGTERM still ends the daemon with
    status 0 (the poll, left running in the background past its tick's budget, is
    cancelled) and nothing of it is in the database."""
    pids = [fake.submit(GRAPH) for _ in range(5)]
    for pid in pids:
        await fake.wait_finished(pid)
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": p} for p in pids]
    )
    fake.inject("hang", route=route)
    proc = await DaemonProcess.start(config)
    try:
        await proc.wait_event("daemon_started")
        await fake.wait_requests(route, 1, timeout_s=60)  # a tick is waiting on it
        proc.send(signal.SIGTERM)
        assert await proc.wait(timeout_s=30) == 0, proc.describe()
    finally:
        await proc.close()
    assert proc.named("polls_cancelled_on_stop") and proc.named("daemon_stopped")
    with connect(backend) as conn:
        assert integrity_problems(conn) == []
        assert job_states(conn) == dict.fromkeys(pids, "registered")
        assert conn.execute("SELECT count(*) FROM job_outputs").fetchone()[0] == 0


async def test_sigterm_while_idle_exits_0(tmp_path: Path, fake: FakeComfyUI, backend: str) -> None:
    """SIGTERM between ticks, with nothing in flight: a plain, clean exit 0."""
    pid = fake.submit(GRAPH)
    await fake.wait_finished(pid)
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    proc = await DaemonProcess.start(config)
    try:
        await proc.wait_event("job_finished")  # nothing left to track: it only sleeps now
        proc.send(signal.SIGTERM)
        assert await proc.wait(timeout_s=30) == 0, proc.describe()
    finally:
        await proc.close()
    assert proc.named("daemon_stopped") and not proc.named("tick_cancelled_on_stop")
    with connect(backend) as conn:
        assert integrity_problems(conn) == []
        assert job_states(conn) == {pid: "success"}


@pytest.mark.slow
async def test_sigterm_at_random_moments_exits_0_and_commits_whole_ticks(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    """SIGTERM at random moments of a busy daemon: every time it exits 0, and what it
    recorded is whole; the next start carries on where it stopped."""
    rng = random.Random(7)
    config = write_config(tmp_path, {"local": fake.url})
    outcomes: dict[str, Outcome] = {}
    lives: list[DaemonProcess] = []
    try:
        for life in range(4):
            fake.pause()  # the batch runs once the daemon is up, so stops land amid work
            batch = []
            for _ in range(30):
                outcome: Outcome = rng.choice(["success", "success", "error", "interrupted"])
                pid = fake.submit(GRAPH, outcome=outcome, run_time_s=rng.uniform(0.005, 0.03))
                outcomes[pid] = outcome
                batch.append(pid)
            drop_in(tmp_path, f"life-{life}", batch)
            proc = await DaemonProcess.start(config)
            lives.append(proc)
            await proc.wait_event("daemon_started")
            fake.resume()
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # the random stop moment
            proc.send(signal.SIGTERM)
            assert await proc.wait(timeout_s=30) == 0, proc.describe()
            with connect(backend) as conn:
                check_whole(conn, fake)
        proc = await DaemonProcess.start(config, "--until-done")
        lives.append(proc)
        assert await proc.wait() == 0, proc.describe()
    finally:
        for proc in lives:
            await proc.close()
    with connect(backend) as conn:
        check_whole(conn, fake)
        assert job_states(conn) == outcomes


# -- 3. the database is busy -----------------------------------------------------------------


async def test_a_long_read_transaction_does_not_stop_the_daemon(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """An operator's ``sqlite3`` session holding a read transaction open the whole time:
    the daemon registers, tracks and records every job meanwhile (WAL)."""
    fake.pause()
    pids = [fake.submit(GRAPH, outcome=o) for o in ("success", "error", "interrupted") * 4]
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": p} for p in pids]
    )
    code, _, err = await run_cli("migrate", "--config", str(config))
    assert code == 0, err
    db = tmp_path / "comfywatch.db"
    with connect(db) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # snapshot taken
        proc = await DaemonProcess.start(config, "--until-done")
        try:
            fake.resume()
            assert await proc.wait() == 0, proc.describe()
        finally:
            await proc.close()
        # Still the same read transaction: it saw nothing of what was written meanwhile.
        assert reader.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        with connect(db) as fresh:
            check_whole(fresh, fake)
            states = job_states(fresh)
        reader.execute("ROLLBACK")
    expected = dict(zip(pids, ("success", "error", "interrupted") * 4, strict=True))
    assert states == expected


async def test_a_held_write_lock_delays_recording_and_loses_nothing(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """Another process holds the write lock while a tick wants to commit: after the busy
    timeout the tick is logged as not recorded, and nothing of it is in the database, or
    logged as finished, while the lock is held. Once the lock goes, everything is recorded,
    and --until-done does not call it done before then."""
    outcomes: list[Outcome] = ["success", "error", "interrupted", "success"]
    pids = [fake.submit(GRAPH, outcome=o) for o in outcomes]
    for pid in pids:
        await fake.wait_finished(pid)
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": p} for p in pids]
    )
    # The first tick waits on the history tail: the lock is taken then, so it is the
    # tick's commit that meets it.
    fake.inject("hang", route="GET /history")
    db = tmp_path / "comfywatch.db"
    proc = await DaemonProcess.start(config, "--until-done")
    try:
        await proc.wait_event("daemon_started")
        await fake.wait_requests("GET /history", 1, timeout_s=60)
        with connect(db) as writer:
            writer.execute("BEGIN IMMEDIATE")
            fake.clear_faults()
            await proc.wait_event("tick_not_recorded")
            assert job_states(writer) == dict.fromkeys(pids, "registered")
            assert writer.execute("SELECT count(*) FROM job_outputs").fetchone()[0] == 0
            assert not proc.named("job_finished")
            released_at = len(proc.events)
            writer.execute("ROLLBACK")
        assert await proc.wait() == 0, proc.describe()
    finally:
        await proc.close()
    finished = [
        (index, event["prompt_id"])
        for index, event in enumerate(proc.events)
        if event.get("event") == "job_finished"
    ]
    assert sorted(pid for _, pid in finished) == sorted(pids), proc.describe()
    assert all(index >= released_at for index, _ in finished)
    with connect(db) as conn:
        check_whole(conn, fake)
        assert job_states(conn) == dict(zip(pids, outcomes, strict=True))


#: A command hook that holds its delivery open until the test answers on a local socket.
GATE_HOOK = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1]))).recv(1)"


async def test_until_done_outlasts_a_locked_database(tmp_path: Path, fake: FakeComfyUI) -> None:
    """--until-done with every job finished but a hook delivery still in flight, while a
    writer holds the lock: the hook finishes, and its result cannot be recorded. The
    daemon keeps going (it neither dies on the busy database nor calls it done: the
    delivery is still pending), its reads never meet the lock (no housekeeping fails),
    and it finishes once the lock is gone, the hook sent once."""
    gate_open = asyncio.Event()
    hook_connected = asyncio.Event()
    runs = 0

    async def gate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal runs
        runs += 1
        hook_connected.set()
        await gate_open.wait()
        writer.write(b"x")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(gate, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pid = fake.submit(GRAPH)
    await fake.wait_finished(pid)
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid, "hooks": ["gate"]}],
        extra=(
            "[hooks.gate]\n"
            'type = "command"\n'
            f"argv = {toml_value([sys.executable, '-c', GATE_HOOK, str(port)])}\n"
            "timeout_s = 120\n"
        ),
    )
    db = tmp_path / "comfywatch.db"
    proc = await DaemonProcess.start(config, "--until-done")
    try:
        async with server:
            await proc.until(hook_connected.wait(), "the hook ran")  # so the job is recorded
            with connect(db) as writer:
                writer.execute("BEGIN IMMEDIATE")
                gate_open.set()
                first = await proc.wait_event("hook_result_not_recorded")
                await proc.wait_event("hook_result_not_recorded", start=first + 1)
                assert not proc.named("all_done")
                assert not proc.named("housekeeping_failed")
                writer.execute("ROLLBACK")
            assert await proc.wait() == 0, proc.describe()
    finally:
        gate_open.set()
        await proc.close()
    assert proc.named("all_done")
    assert runs == 1
    with connect(db) as conn:
        assert job_states(conn) == {pid: "success"}
        assert conn.execute("SELECT state FROM hook_deliveries").fetchall() == [("delivered",)]


# -- 4. file permissions ---------------------------------------------------------------------


async def test_database_files_are_private_even_with_umask_000(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """``comfywatch run`` under umask 000 still creates the database (and its WAL and
    shared-memory files) readable by owner and group only, writable by the owner only."""
    pid = fake.submit(GRAPH)
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid}],
        daemon={"database": "sqlite:///state/deep/comfywatch.db"},
    )
    db = tmp_path / "state" / "deep" / "comfywatch.db"
    proc = await DaemonProcess.start(config, umask=0)
    try:
        await proc.wait_event("job_finished")
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in files}
        proc.send(signal.SIGTERM)
        assert await proc.wait() == 0, proc.describe()
    finally:
        await proc.close()
    for name, mode in modes.items():
        assert mode & 0o137 == 0, f"{name} is {oct(mode)}"  # at most rw-r-----
    for folder in (db.parent, db.parent.parent):  # folders it created: no one else may write
        mode = stat.S_IMODE(folder.stat().st_mode)
        assert mode & 0o027 == 0, f"{folder} is {oct(mode)}"
