"""The spool with the daemon as a real child process (``tests/daemon_proc.py``).

A bad file never stops start-up nor a query command; SIGKILL between the commit of a
file's jobs and its move out of the inbox loses nothing and registers nothing twice; a
flood of files is taken in bounded batches while ``/healthz`` keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from comfywatch.testing import FakeComfyUI

from .conftest import jobs_toml, toml_value, write_config
from .daemon_proc import DaemonProcess, connect, job_states, run_cli

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")


def drop(spool: Path, name: str, text: str) -> None:
    """Writes ``text`` as a dotfile and renames it in, as producers must."""
    tmp = spool / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(spool / name)


def job(prompt_id: str, **extra: object) -> dict[str, object]:
    return {"server": "local", "prompt_id": prompt_id, **extra}


def command_hook(log: Path) -> str:
    """A command hook that appends each delivery's JSON (one line) to ``log``."""
    script = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')"
    argv = [sys.executable, "-c", script, str(log)]
    return f'[hooks.mark]\ntype = "command"\nargv = {toml_value(argv)}\n'


async def queries_work(config: Path) -> None:
    """Every query command succeeds, whatever waits in the spool."""
    for args in (
        ["jobs", "--json"],
        ["hooks"],
        ["prune", "--older-than", "1d", "--dry-run"],
        ["check-config"],
    ):
        code, _, err = await run_cli(*args, "--config", str(config))
        assert code == 0, (args, err)


async def test_bad_spool_files_never_stop_start_up_or_queries(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    main_id, spooled_id = fake.submit(), fake.submit()
    config = write_config(tmp_path, {"local": fake.url}, [job(main_id)])
    spool = tmp_path / "jobs.d"
    drop(spool, "a-syntax.toml", "[[jobs]\n")
    drop(spool, "b-server.toml", jobs_toml([{"server": "elsewhere", "prompt_id": "x"}]))
    drop(spool, "c-good.toml", jobs_toml([job(spooled_id)]))
    code, _, err = await run_cli("migrate", "--config", str(config))
    assert code == 0, err
    await queries_work(config)
    assert len(list(spool.iterdir())) == 3  # the commands read nothing there

    daemon = await DaemonProcess.start(config)
    try:
        await daemon.wait_event("daemon_started")
        await daemon.wait_event("spool_file_registered", lambda e: e["file"] == "c-good.toml")
        rejected = {e["file"]: e["error"] for e in daemon.named("spool_file_rejected")}
        assert set(rejected) == {"a-syntax.toml", "b-server.toml"}
        assert (
            f"{spool / 'b-server.toml'}:2: jobs[0].server: unknown server"
            in (rejected["b-server.toml"])
        )

        async def both_done() -> None:
            while True:
                with connect(backend) as conn:
                    if job_states(conn) == {main_id: "success", spooled_id: "success"}:
                        return
                await asyncio.sleep(0.05)

        await daemon.until(both_done(), "both jobs recorded as success")
        await queries_work(config)
        code, out, err = await run_cli("show", spooled_id, "--json", "--config", str(config))
        assert code == 0, err
        assert json.loads(out)["state"] == "success"
        daemon.send(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.describe()
    finally:
        await daemon.close()
    assert sorted(p.name for p in (spool / "rejected").iterdir()) == [
        "a-syntax.error",
        "a-syntax.toml",
        "b-server.error",
        "b-server.toml",
    ]


JOB_COLUMNS = (
    "SELECT id, server, prompt_id, state, labels, hooks, source, registered_at, updated_at, "
    "finished_at FROM jobs"
)


async def test_sigkill_between_commit_and_move_loses_nothing_and_fires_nothing_twice(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    """``done`` is a plain file, so the move after the commit fails and the file stays in
    the inbox: the daemon is then killed with its jobs committed, its hook delivered and
    the file unmoved, exactly the state a SIGKILL between commit and move leaves. The next
    life reads the file again: no new row, no second delivery, the job stays terminal."""
    pid = fake.submit()
    await fake.wait_finished(pid)
    hook_log = tmp_path / "hook.log"
    config = write_config(tmp_path, {"local": fake.url}, extra=command_hook(hook_log))
    spool = tmp_path / "jobs.d"
    (spool / "done").write_text("not a folder")
    drop(spool, "batch.toml", jobs_toml([job(pid, hooks=["mark"], labels={"b": "1"})]))

    first = await DaemonProcess.start(config)
    try:
        await first.wait_event("spool_file_stuck", lambda e: e["file"] == "batch.toml")
        await first.wait_event("hook_delivered")
        assert await first.kill() < 0
    finally:
        await first.close()
    assert (spool / "batch.toml").exists()
    with connect(backend) as conn:
        before = conn.execute(JOB_COLUMNS).fetchall()
        deliveries = conn.execute("SELECT id, state, attempts FROM hook_deliveries").fetchall()
    assert [row[3] for row in before] == ["success"]
    assert [(state, attempts) for _, state, attempts in deliveries] == [("delivered", 1)]

    (spool / "done").unlink()
    second = await DaemonProcess.start(config, "--until-done")
    try:
        assert await second.wait() == 0, second.describe()
    finally:
        await second.close()
    [event] = second.named("spool_file_registered")
    assert (event["file"], event["jobs"], event["new"]) == ("batch.toml", 1, 0)
    assert sorted(p.name for p in spool.iterdir()) == ["done"]
    assert [p.name for p in (spool / "done").iterdir()] == ["batch.toml"]
    with connect(backend) as conn:
        assert conn.execute(JOB_COLUMNS).fetchall() == before
        assert conn.execute("SELECT id, state, attempts FROM hook_deliveries").fetchall() == (
            deliveries
        )
    assert len([line for line in hook_log.read_text().splitlines() if line]) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


FLOOD = 20_000


@pytest.mark.slow
@pytest.mark.timeout(900)
# Files and batches, the same on both backends: SQLite alone keeps the suite short.
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_flood_of_files_is_taken_in_batches_while_healthz_answers(
    tmp_path: Path, backend: str
) -> None:
    """20,000 files renamed in at once: each is registered exactly once, and /healthz
    answers 200 all along (no pass of the loop waits for the whole flood)."""
    port = free_port()
    config = write_config(
        tmp_path,
        {"local": {"url": "http://127.0.0.1:9", "websocket": False}},  # nobody listens
        daemon={"http": f"127.0.0.1:{port}", "poll_interval_s": 0.2},
    )
    spool = tmp_path / "jobs.d"
    staging = tmp_path / "staging"
    staging.mkdir()
    for index in range(FLOOD):
        (staging / f"{index:05}.toml").write_text(jobs_toml([job(f"p-{index:05}")]))

    daemon = await DaemonProcess.start(config)
    answers: list[int] = []
    try:
        await daemon.wait_event("daemon_started")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def health() -> int:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    return response.status

            async def first_tick() -> None:
                while True:
                    if await health() == 200:
                        return
                    await asyncio.sleep(0.05)

            await daemon.until(first_tick(), "/healthz says ok")
            for path in sorted(staging.iterdir()):
                path.rename(spool / path.name)

            async def drained() -> None:
                while len(daemon.named("spool_file_registered")) < FLOOD:
                    answers.append(await health())
                    await asyncio.sleep(0.1)

            await daemon.until(drained(), f"{FLOOD} files registered", timeout_s=800)
            answers.append(await health())
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
        daemon.send(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.describe()
    finally:
        await daemon.close()

    assert answers and set(answers) == {200}
    assert f'comfywatch_spool_files_total{{result="registered"}} {float(FLOOD)}' in metrics
    files = [e["file"] for e in daemon.named("spool_file_registered")]
    assert len(files) == len(set(files)) == FLOOD
    assert sorted(p.name for p in spool.iterdir()) == ["done"]
    assert len(list((spool / "done").iterdir())) == FLOOD
    with connect(backend) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT prompt_id) FROM jobs").fetchone() == (
            FLOOD,
            FLOOD,
        )
