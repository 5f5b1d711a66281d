"""Warnings about likely mistakes in a valid config: ``check-config`` prints them on stderr
(and still exits 0), the daemon logs them at start. Real files, a real SQLite database,
the command and the daemon as subprocesses."""

from __future__ import annotations

from pathlib import Path

from comfywatch.config import load_settings
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, NewJob, Store

from .conftest import write_config
from .daemon_proc import DaemonProcess
from .helpers import comfywatch


def warnings_of(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("comfywatch: warning: ") for line in lines), err
    return [line.removeprefix("comfywatch: warning: ") for line in lines]


async def check_config(config: Path) -> tuple[str, list[str]]:
    """Run ``check-config``: (stdout, its warnings); it must succeed."""
    code, out, err = await comfywatch("check-config", "--config", str(config))
    assert code == 0, err
    assert out.startswith("config: ")
    return out, warnings_of(err)


async def test_a_sound_config_gives_no_warning(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    (tmp_path / "jobs.d" / "done").mkdir()
    (tmp_path / "jobs.d" / "rejected").mkdir()
    (tmp_path / "jobs.d" / "waiting.toml").write_text("")
    (tmp_path / "jobs.d" / ".being-written.tmp").write_text("")
    _, warnings = await check_config(config)
    assert warnings == []


async def test_no_servers(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    _, warnings = await check_config(config)
    assert warnings == [f"{config}: no [servers.NAME] table: there is nothing to watch"]


async def test_a_jobs_dir_that_does_not_exist(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, daemon={"jobs_dir": "nope"})
    _, warnings = await check_config(config)
    [warning] = warnings
    assert warning.startswith(f"{config}:4: daemon.jobs_dir: {tmp_path / 'nope'} does not exist")


async def test_files_in_jobs_dir_the_daemon_never_reads(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    for name in ("batch.json", "batch.TOML", "batch.toml.bak", "ok.toml", ".x.tmp"):
        (tmp_path / "jobs.d" / name).write_text("")
    (tmp_path / "jobs.d" / "done").mkdir()
    [warning] = (await check_config(config))[1]
    assert warning.startswith(f"{config}:4: daemon.jobs_dir: the daemon never reads ")
    assert "batch.TOML, batch.json, batch.toml.bak in " in warning
    assert "ok.toml" not in warning and ".x.tmp" not in warning and "done" not in warning


async def test_jobs_whose_labels_or_hooks_differ_from_the_database(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    hooks = f'[hooks.notify]\ntype = "command"\nargv = ["{hook}"]\n'
    jobs = [
        {"server": "local", "prompt_id": "same"},
        {"server": "local", "prompt_id": "done", "labels": {"batch": "2"}, "hooks": ["notify"]},
        {"server": "local", "prompt_id": "waiting", "hooks": ["notify"]},
        {"server": "local", "prompt_id": "new", "labels": {"batch": "9"}},
    ]
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, jobs, extra=hooks)
    # Without a database: nothing to compare, and nothing said about it.
    assert (await check_config(config))[1] == []
    # A database that cannot be read as this version's: said in one warning.
    (tmp_path / "comfywatch.db").write_bytes(b"")
    [warning] = (await check_config(config))[1]
    assert warning.startswith("the jobs were not compared with the database: ")
    assert "comfywatch migrate" in warning

    store = Store.open(load_settings(config).daemon.database_url)
    try:
        await store.migrate()
        registered = await store.register(
            [
                NewJob("local", "same", {}, (), "x"),
                NewJob("local", "done", {"batch": "1"}, (), "x"),
                NewJob("local", "waiting", {}, (), "x"),
            ],
            1.0,
        )
        [done] = [job for job in registered if job.prompt_id == "done"]
        change = Change(done.id, JobState.SUCCESS, reason=Reason.FINISHED, history=None)
        await store.record([change], 2.0)
    finally:
        await store.close()

    warnings = (await check_config(config))[1]
    assert len(warnings) == 3, warnings
    labels, done_hooks, waiting_hooks = warnings
    assert labels.startswith(f"{config}:21: jobs[1].labels: the database holds labels ")
    assert "{batch=1}" in labels and "{batch=2}" in labels and "next load" in labels
    assert done_hooks.startswith(f"{config}:22: jobs[1].hooks: the database holds hooks [] ")
    assert "already success" in done_hooks and "[notify]" in done_hooks
    assert waiting_hooks.startswith(f"{config}:27: jobs[2].hooks: ")
    assert "next load" in waiting_hooks


async def test_the_daemon_logs_warnings_at_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    (tmp_path / "jobs.d" / "batch.json").write_text("")
    daemon = await DaemonProcess.start(config)
    try:
        await daemon.wait_event("config_warning", lambda event: event["code"] == "no_servers")
        at = await daemon.wait_event(
            "config_warning", lambda event: event["code"] == "jobs_dir_ignored_files"
        )
        ignored = daemon.events[at]
        assert ignored["key"] == "daemon.jobs_dir" and ignored["line"] == 4
        assert "batch.json" in ignored["message"] and ignored["level"] == "warning"
    finally:
        await daemon.close()
