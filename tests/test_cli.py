"""The command line end to end: real subprocesses, a fake ComfyUI, a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .helpers import comfywatch

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")


async def test_run_until_done_then_query_jobs_and_show(tmp_path: Path, fake: FakeComfyUI) -> None:
    ok = fake.submit()
    bad = fake.submit(outcome="error")
    jobs: list[dict[str, Any]] = [
        {"server": "local", "prompt_id": ok, "labels": {"batch": "b1"}},
        {"server": "local", "prompt_id": bad, "labels": {"batch": "b2"}},
    ]
    config = write_config(tmp_path, {"local": fake.url}, jobs)
    code, out, err = await comfywatch("run", "--config", str(config), "--until-done")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # JSON logs: stdout is a pipe
    assert {e["event"] for e in lines} >= {"daemon_started", "job_finished", "all_done"}

    code, out, _ = await comfywatch("jobs", "--config", str(config), "--json")
    assert code == 0
    listed = {j["prompt_id"]: j for j in json.loads(out)}
    assert listed[ok]["state"] == "success" and listed[bad]["state"] == "error"
    for job in listed.values():
        for key in (
            "server",
            "status_str",
            "completed",
            "registered_at",
            "queued_at",
            "started_at",
            "finished_at",
            "detected_at",
            "labels",
            "error",
            "outputs",
            "reason",
        ):
            assert key in job

    code, out, _ = await comfywatch(
        "jobs", "--config", str(config), "--json", "--label", "batch=b2"
    )
    assert [j["prompt_id"] for j in json.loads(out)] == [bad]
    code, out, _ = await comfywatch("jobs", "--config", str(config), "--state", "success")
    assert code == 0 and ok in out and bad not in out and "STATE" in out

    code, out, _ = await comfywatch("show", bad, "--config", str(config), "--json")
    shown = json.loads(out)
    assert shown["error"]["node_type"] and shown["error"]["exception_message"]
    assert shown["finished_at"].endswith("Z")
    code, out, _ = await comfywatch("show", ok, "--config", str(config))
    assert code == 0 and "success" in out and "images[0]" in out
    code, _, err = await comfywatch("show", "no-such-id", "--config", str(config))
    assert code == 1 and "no-such-id" in err


async def test_config_from_environment_variable(tmp_path: Path, fake: FakeComfyUI) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    code, out, err = await comfywatch("check-config", env={"COMFYWATCH_CONFIG": str(config)})
    assert code == 0, err
    assert "local" in out and fake.url in out


async def test_broken_config_at_start_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:1"})
    config.write_text(config.read_text() + "\n[servers.other]\nurll = 'http://x'\n")
    code, _, err = await comfywatch("run", "--config", str(config))
    assert code == 78
    assert str(config) in err and "servers.other" in err and "urll" in err


async def test_job_for_unknown_server_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"local": "http://127.0.0.1:1"}, [{"server": "elsewhere", "prompt_id": "p"}]
    )
    code, _, err = await comfywatch("check-config", "--config", str(config))
    assert code == 78 and "elsewhere" in err and "jobs" in err


async def test_migrate_then_query_empty_database(tmp_path: Path, backend: str) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:1"})
    code, _, err = await comfywatch("jobs", "--config", str(config))
    # A SQLite file is not created by a query; an empty PostgreSQL database has no schema.
    missing = "does not exist" if backend.startswith("sqlite") else "schema is at nothing"
    assert code == 69 and missing in err, err
    code, out, err = await comfywatch("migrate", "--config", str(config))
    assert code == 0, err
    code, out, _ = await comfywatch("jobs", "--config", str(config), "--json")
    assert code == 0 and json.loads(out) == []


async def test_metrics_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path, {"local": "http://127.0.0.1:1"}, daemon={"http": f"127.0.0.1:{port}"}
        )
        code, _, err = await comfywatch("run", "--config", str(config))
    assert code == 78 and "daemon.http" in err and "Traceback" not in err


def test_options_before_and_after_a_nested_action_both_count() -> None:
    """``hooks --config X retry`` must not lose ``--config`` to the action's defaults."""
    from comfywatch.cli import build_parser

    parser = build_parser()
    for argv in (
        ["hooks", "--config", "X", "retry", "7"],
        ["hooks", "retry", "7", "--config", "X"],
    ):
        args = parser.parse_args(argv)
        assert (str(args.config), args.ids) == ("X", [7])


async def test_a_second_daemon_on_the_same_database_is_refused(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """Two daemons would send every hook twice: the second one exits 69 and says why."""
    from .daemon_proc import DaemonProcess

    config = write_config(tmp_path, {"local": fake.url})
    first = await DaemonProcess.start(config)
    try:
        await first.wait_event("daemon_started")
        code, _, err = await comfywatch("run", "--config", str(config))
        assert code == 69 and "another comfywatch daemon" in err
        assert first.proc.returncode is None  # still running
    finally:
        await first.close()
    code, _, err = await comfywatch("run", "--config", str(config), "--until-done")
    assert code == 0, err  # the lock went with the first process


async def test_check_config_before_any_daemon_ran(tmp_path: Path, backend: str) -> None:
    """No database yet (a SQLite file not there, a PostgreSQL database not migrated): the
    jobs have nothing to be compared with, and that is no warning."""
    config = write_config(
        tmp_path, {"local": "http://127.0.0.1:1"}, [{"server": "local", "prompt_id": "p1"}]
    )
    code, _, err = await comfywatch("check-config", "--config", str(config))
    assert code == 0, err
    assert "not compared" not in err and "schema" not in err, err
