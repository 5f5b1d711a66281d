"""What a person reads at the terminal: ``show`` by a prefix of a prompt id, the ``jobs``
table's times and its ``--watch``, the live ``watch`` view (on a pseudo-terminal), and
shell completion scripts. Real subprocesses on a real SQLite file."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from comfywatch.cli.live import fetch_metrics, metrics_url
from comfywatch.config import load_settings
from comfywatch.service import Daemon
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, NewJob, Store
from comfywatch.store.readonly import read
from comfywatch.store.reads import match_prompt_ids, select_jobs_by_prefix
from comfywatch.testing import FakeComfyUI
from comfywatch.web import start_http

from .conftest import Clock, write_config
from .helpers import comfywatch
from .terminal import Terminal

NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z
SOURCE = "/srv/batches/catalog-42.toml"
MakeDaemon = Callable[[Path], Awaitable[Daemon]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def config_for(tmp_path: Path, db_path: Path, **daemon: object) -> Path:
    return write_config(
        tmp_path,
        {"local": "http://127.0.0.1:9", "other": "http://127.0.0.1:9"},
        daemon={"database": f"sqlite:///{db_path}", **daemon},
    )


async def register(store: Store, server: str, *prompt_ids: str, at_s: float = NOW_S) -> list[int]:
    jobs = [NewJob(server, p, {"batch": "b1"}, (), SOURCE) for p in prompt_ids]
    return [job.id for job in await store.register(jobs, at_s)]


# -- show: a prompt id or a unique prefix of one -------------------------------------------


async def test_show_takes_a_unique_prefix_and_prints_the_source(
    tmp_path: Path, store: Store, db_path: Path
) -> None:
    config = str(config_for(tmp_path, db_path))
    await register(store, "local", "2ef07158-aaaa", "2ef0c4d1-bbbb", "9a1b", "9a1b2c", "Ab%_x")
    await register(store, "other", "5566-on-both")
    await register(store, "local", "5566-on-both")

    code, out, err = await comfywatch("show", "2ef07", "--config", config)
    assert code == 0, err
    assert "2ef07158-aaaa" in out
    assert f"source:        {SOURCE}" in out.splitlines()
    code, out, err = await comfywatch("show", "2ef07", "--json", "--config", config)
    assert code == 0, err
    assert json.loads(out)["prompt_id"] == "2ef07158-aaaa"
    assert json.loads(out)["source"] == SOURCE

    # Ambiguous: git's way, exit 2 and the candidates, one a line.
    code, out, err = await comfywatch("show", "2ef0", "--config", config)
    assert (code, out) == (2, "")
    assert "ambiguous" in err
    assert [line.strip() for line in err.splitlines()[1:] if line.strip()] == [
        "2ef07158-aaaa",
        "2ef0c4d1-bbbb",
    ]
    # A whole id wins over the longer ids it is a prefix of.
    code, out, err = await comfywatch("show", "9a1b", "--json", "--config", config)
    assert code == 0, err
    assert json.loads(out)["prompt_id"] == "9a1b"
    # Nothing starts with it: exit 1. A prefix is matched as typed: case and LIKE's
    # wildcards count as themselves.
    for missing in ("zz", "2EF07", "2ef_7", "2ef%", "ab%"):
        code, out, err = await comfywatch("show", missing, "--config", config)
        assert (code, out) == (1, ""), missing
        assert repr(missing) in err
    code, out, err = await comfywatch("show", "Ab%_", "--json", "--config", config)
    assert code == 0 and json.loads(out)["prompt_id"] == "Ab%_x", err
    # One prompt id on two servers: --server chooses.
    code, _, err = await comfywatch("show", "5566", "--config", config)
    assert code == 2 and "several servers" in err and "5566-on-both" in err
    code, out, err = await comfywatch("show", "5566", "--server", "other", "--config", config)
    assert code == 0 and "server:        other" in out.splitlines(), err
    code, _, err = await comfywatch("show", "2ef0", "--server", "other", "--config", config)
    assert code == 1 and "'other'" in err


async def test_prefix_match_is_by_code_point_beyond_ascii(store: Store, db_path: Path) -> None:
    ids = ["zé-1", "zé-2", "zf", "z\ud7ff-x", "z\ue000", "z\U0010ffff-y", "z"]
    await register(store, "local", *ids)

    def matches(prefix: str) -> list[str]:
        return read(f"sqlite:///{db_path}", lambda conn: match_prompt_ids(conn, prefix))

    assert matches("zé") == ["zé-1", "zé-2"]
    assert matches("zé-2") == ["zé-2"]
    assert matches("z\ud7ff") == ["z\ud7ff-x"]  # the next code point is a surrogate
    assert matches("z\U0010ffff") == ["z\U0010ffff-y"]  # the last code point
    assert matches("z") == sorted(ids)
    found = read(f"sqlite:///{db_path}", lambda conn: select_jobs_by_prefix(conn, "zé-"))
    assert (found.jobs, found.candidates) == ([], ["zé-1", "zé-2"])


# -- jobs: times and run time, --watch --------------------------------------------------------


def stored(at_s: float) -> str:
    """A time as SQLite keeps a ``jobs`` timestamp (naive UTC text)."""
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def test_jobs_table_shows_times_and_a_run_time_on_one_clock(
    tmp_path: Path, store: Store, db_path: Path
) -> None:
    """``DURATION`` is ``finished_at - started_at`` when both come from one clock: both
    seen by comfywatch, or both ComfyUI's stamps (``comfy_*_ms`` set). One of each would
    subtract two hosts' clocks: no duration. A job still running shows the time so far."""
    ours, comfy, mixed, running, waiting = await register(
        store, "local", "p-ours", "p-comfy", "p-mixed", "p-running", "p-waiting"
    )
    await store.record(
        [
            Change(ours, JobState.RUNNING, queued_at_s=NOW_S + 5, started_at_s=NOW_S + 10),
            Change(mixed, JobState.RUNNING, started_at_s=NOW_S + 10),
            Change(running, JobState.RUNNING, started_at_s=NOW_S + 20),
            Change(waiting, JobState.QUEUED, queued_at_s=NOW_S + 30),
        ],
        NOW_S + 30,
    )
    finished = [Change(i, JobState.SUCCESS, Reason.FINISHED) for i in (ours, comfy, mixed)]
    await store.record(finished, NOW_S + 85)
    with sqlite3.connect(db_path) as conn:  # what history entries' stamps leave
        conn.execute(
            "UPDATE jobs SET comfy_started_at_ms = ?, started_at = ?,"
            " comfy_finished_at_ms = ?, finished_at = ? WHERE prompt_id = 'p-comfy'",
            ((NOW_S + 40) * 1000, stored(NOW_S + 40), (NOW_S + 43.5) * 1000, stored(NOW_S + 43.5)),
        )
        conn.execute(
            "UPDATE jobs SET comfy_finished_at_ms = ?, finished_at = ? WHERE prompt_id = 'p-mixed'",
            ((NOW_S + 50) * 1000, stored(NOW_S + 50)),
        )
        conn.execute(
            "UPDATE jobs SET progress_value = 12, progress_max = 20 WHERE prompt_id = 'p-running'"
        )

    code, out, err = await comfywatch("jobs", "--config", str(config_for(tmp_path, db_path)))
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == [
        "SERVER",
        "PROMPT_ID",
        "STATE",
        "PROGRESS",
        "REASON",
        "REGISTERED",
        "QUEUED",
        "STARTED",
        "FINISHED",
        "DURATION",
        "OUTPUTS",
        "LABELS",
    ]
    rows = {line.split()[1]: line.split()[2:] for line in lines}
    assert rows["p-ours"] == [
        "success",
        "finished",
        "2023-11-14T22:13:20Z",
        "2023-11-14T22:13:25Z",
        "2023-11-14T22:13:30Z",
        "2023-11-14T22:14:45Z",
        "1m15s",
        "0",
        "batch=b1",
    ]
    assert rows["p-comfy"][3:6] == ["2023-11-14T22:14:00Z", "2023-11-14T22:14:03Z", "3.5s"]
    # The start seen here, the finish stamped there: no duration column, OUTPUTS follows.
    assert rows["p-mixed"][3:7] == ["2023-11-14T22:13:30Z", "2023-11-14T22:14:10Z", "0", "batch=b1"]
    assert rows["p-running"][:2] == ["running", "12/20"]
    assert re.fullmatch(r"\d+d\d\dh\+", rows["p-running"][4])  # started in 2023: days ago
    # Nothing started: no run time.
    assert rows["p-waiting"] == [
        "queued",
        "2023-11-14T22:13:20Z",
        "2023-11-14T22:13:50Z",
        "0",
        "batch=b1",
    ]


async def test_jobs_watch_redraws_until_ctrl_c_then_exits_0(
    tmp_path: Path, store: Store, db_path: Path
) -> None:
    await register(store, "local", "p-first")
    config = str(config_for(tmp_path, db_path))
    async with await Terminal.start(
        "jobs", "--watch", "--interval", "0.1", "--config", config, cwd=tmp_path
    ) as term:
        await term.wait_text("p-first", "Ctrl-C to quit")
        await register(store, "local", "p-second")  # the next redraw shows it
        await term.wait_for("two frames", lambda: term.raw.count(b"\x1b[H\x1b[2J") >= 2)
        await term.wait_text("p-second")
        term.interrupt()
        code, err = await term.wait()
    assert code == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


async def test_jobs_watch_does_not_go_with_json(tmp_path: Path, db_path: Path) -> None:
    config = str(config_for(tmp_path, db_path))
    code, out, err = await comfywatch("jobs", "--watch", "--json", "--config", config)
    assert (code, out) == (2, "") and "--json" in err
    code, _, err = await comfywatch("jobs", "--watch", "--interval", "0", "--config", config)
    assert code == 2 and "--interval" in err


# -- watch: the live view ---------------------------------------------------------------------


async def test_watch_shows_a_registered_job_and_quits_on_q(
    tmp_path: Path, store: Store, db_path: Path
) -> None:
    """Started on a terminal, with the daemon's metrics endpoint down: it says so, shows
    the database's jobs, reads keys unechoed while it runs, quits on ``q`` with status 0 and
    gives the terminal back as it found it."""
    [job] = await register(store, "local", "7d5c0c5e-registered")
    [done] = await register(store, "other", "c0ffee-finished")
    await store.record([Change(done, JobState.RUNNING, started_at_s=NOW_S + 1)], NOW_S + 1)
    await store.record([Change(done, JobState.ERROR, Reason.FINISHED)], NOW_S + 4)
    port = free_port()  # nothing listens there
    config = str(config_for(tmp_path, db_path, http=f"127.0.0.1:{port}"))
    async with await Terminal.start("watch", "--config", config, cwd=tmp_path) as term:
        assert term.canonical()
        await term.wait_text("7d5c0c5e-registered", "c0ffee-finished", "unreachable")
        assert f"127.0.0.1:{port}/metrics" in term.text
        assert re.search(r"c0ffee-finished\s+error\s+finished\s+.*ago\s+3\.0s", term.text)
        assert re.search(r"local\s+\?\s+0\s+1", term.text)  # up unknown; 1 waiting
        assert not term.canonical()  # cbreak: q arrives alone, unechoed
        term.type(b"q")
        code, err = await term.wait()
        assert code == 0, err
        assert term.canonical()
    assert "Traceback" not in err
    assert job  # the job was registered before the view started


async def test_watch_shows_servers_from_the_daemon_metrics_and_job_progress(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """With the daemon's /metrics: each server up or down with its queue length and last
    poll; a running job's progress once recorded. Ctrl-C quits with status 0."""
    fake.hold_running()
    running, waiting = fake.submit(), fake.submit()
    await fake.wait_running(running)
    jobs = [
        {"server": "local", "prompt_id": running},
        {"server": "local", "prompt_id": waiting},
        {"server": "gone", "prompt_id": "never-answered"},
    ]
    config = write_config(tmp_path, {"local": fake.url, "gone": "http://127.0.0.1:9"}, jobs)
    daemon = await make_daemon(config)
    runner: web.AppRunner = await start_http(daemon, "127.0.0.1", 0)
    try:
        await daemon.poller.tick()
        host, port = runner.addresses[0][:2]
        db_path = Path(load_settings(config).daemon.database_url.removeprefix("sqlite:///"))
        with sqlite3.connect(db_path) as conn:  # a progress event, as the daemon records it
            conn.execute(
                "UPDATE jobs SET progress_node = 'KSampler', progress_value = 12,"
                " progress_max = 20, progress_at = updated_at WHERE prompt_id = ?",
                (running,),
            )
        url = f"http://{host}:{port}/metrics"
        args = ("watch", "--interval", "0.2", "--metrics-url", url, "--config", str(config))
        async with await Terminal.start(*args, cwd=tmp_path) as term:
            await term.wait_text(running, waiting, "never-answered", "12/20", "KSampler")
            await term.wait_for(
                "the servers' rows",
                lambda: bool(
                    re.search(r"local\s+up\s+2\s+\d+\.\ds ago\s+1\s+1", term.text)
                    and re.search(r"gone\s+down\s+\d+\.\ds ago\s+0\s+1", term.text)
                ),
            )
            assert "unreachable" not in term.text
            term.interrupt()
            code, err = await term.wait()
    finally:
        await runner.cleanup()
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


async def test_watch_without_a_database_exits_69(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    code, out, err = await comfywatch("watch", "--config", str(config))
    assert (code, out) == (69, "") and "does not exist" in err


def test_metrics_url_follows_the_http_listener(tmp_path: Path) -> None:
    def url(http: str | None, given: str | None = None) -> str | None:
        daemon = {} if http is None else {"http": http}
        settings = load_settings(write_config(tmp_path, {"local": "http://x:1"}, daemon=daemon))
        return metrics_url(given, settings)

    assert url("127.0.0.1:9464") == "http://127.0.0.1:9464/metrics"
    assert url("0.0.0.0:9464") == "http://127.0.0.1:9464/metrics"
    assert url("[::]:9464") == "http://[::1]:9464/metrics"
    assert url("[fd00::5]:80") == "http://[fd00::5]:80/metrics"
    assert url("127.0.0.1:9464", "http://elsewhere:1/metrics") == "http://elsewhere:1/metrics"
    assert url("127.0.0.1:9464", "") is None
    assert url(None) is None
    problem = fetch_metrics(None).problem
    assert problem is not None and "[daemon] http" in problem
    problem = fetch_metrics("file:///etc/passwd").problem
    assert problem is not None and "not http" in problem


# -- completion ----------------------------------------------------------------------------


SUBCOMMANDS = ("run", "jobs", "show", "hooks", "register", "prune", "watch", "completion")


def completion(shell: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "comfywatch", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_bash_completion_is_valid_and_completes_commands_options_and_files(
    tmp_path: Path,
) -> None:
    script = tmp_path / "comfywatch.bash"
    script.write_text(completion("bash"))
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    (tmp_path / "site.toml").write_text("")

    def complete(*words: str) -> list[str]:
        """What bash offers for the last word of ``comfywatch WORDS``."""
        line = " ".join(["comfywatch", *words])
        program = f"""
            source {script}
            COMP_WORDS=(comfywatch {" ".join(repr(w) for w in words)})
            COMP_CWORD={len(words)}
            COMP_LINE={line!r}
            COMP_POINT=${{#COMP_LINE}}
            _shtab_comfywatch
            printf '%s\\n' "${{COMPREPLY[@]}}"
        """
        done = subprocess.run(
            ["bash", "-c", program],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=tmp_path,
        )
        return [w.strip() for w in done.stdout.splitlines() if w.strip()]

    assert set(complete("")) >= set(SUBCOMMANDS)
    assert complete("wat") == ["watch"]
    assert complete("wa") == ["wait", "watch"]
    assert complete("jobs", "--wa") == ["--watch"]
    assert complete("jobs", "--state", "ru") == ["running"]
    assert complete("completion", "") == ["bash", "zsh", "fish"]
    assert complete("show", "--config", "sit") == ["site.toml"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_name_every_command(shell: str, tmp_path: Path) -> None:
    script = completion(shell)
    for command in SUBCOMMANDS:
        assert re.search(rf"\b{command}\b", script), command
    assert "--metrics-url" in script and "--watch" in script
    if shutil.which(shell) is not None:  # the syntax, where the shell is installed
        path = tmp_path / f"comfywatch.{shell}"
        path.write_text(script)
        subprocess.run([shell, "-n", str(path)], check=True, timeout=30)
