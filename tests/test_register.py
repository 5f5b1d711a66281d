"""``comfywatch register``: a spool file written the maildir way, and the daemon's verdict.

The command runs as a real subprocess; with ``--wait`` the daemon does too.
"""

from __future__ import annotations

import json
import signal
import stat
import tomllib
from pathlib import Path

import pytest

from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .daemon_proc import DaemonProcess, connect, run_cli

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")


def jobs_in(path: Path) -> list[dict[str, object]]:
    jobs: list[dict[str, object]] = tomllib.loads(path.read_text(encoding="utf-8"))["jobs"]
    return jobs


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def inbox_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if p.is_file())


async def test_register_writes_one_fresh_file_readable_by_the_group(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    spool = tmp_path / "jobs.d"
    labels = {"batch": "b 1", "quote": 'say "hi"', "path": "C:\\x", "line": "a\nb", "ü": "✓"}
    args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    code, out, err = await run_cli(
        "register", "--server", "local", "p1", "p2", "p1", *args, "--config", str(config)
    )
    assert code == 0, err
    path = Path(out.strip())
    assert path.parent == spool and path.suffix == ".toml"
    assert inbox_files(spool) == [path.name]  # no temporary file left behind
    assert mode_of(path) == 0o640
    assert jobs_in(path) == [
        {"server": "local", "prompt_id": "p1", "labels": labels},
        {"server": "local", "prompt_id": "p2", "labels": labels},
    ]  # no hooks key: the daemon's default_hooks

    code, out, _ = await run_cli(
        "register", "--server", "local", "p3", "--hooks", "", "--config", str(config)
    )
    assert code == 0
    second = Path(out.strip())
    assert second != path
    assert jobs_in(second) == [{"server": "local", "prompt_id": "p3", "hooks": []}]


async def test_register_refuses_what_the_daemon_would_reject_and_writes_nothing(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9", "gpu-2": "http://h:1"})
    spool = tmp_path / "jobs.d"
    for args, message in [
        (["--server", "lcoal", "p"], "server: unknown server 'lcoal' (did you mean 'local'?)"),
        (["--server", "local", "p", "--hooks", "notify"], "hooks[0]: unknown hook 'notify'"),
        (["--server", "local", "bad\x07id"], "prompt_id: must not contain control characters"),
        (["--server", "local", "x" * 300], "prompt_id: String should have at most 255"),
    ]:
        code, _, err = await run_cli("register", *args, "--config", str(config))
        assert code == 2, (args, err)
        assert message in err, err
    assert inbox_files(spool) == []

    code, _, err = await run_cli("register", "--server", "local", "--config", str(config))
    assert code == 2 and "PROMPT_ID" in err  # at least one
    no_spool = tmp_path / "no-spool.toml"
    no_spool.write_text('[servers.local]\nurl = "http://h:1"\n')
    code, _, err = await run_cli("register", "--server", "local", "p", "--config", str(no_spool))
    assert code == 78 and "daemon.jobs_dir: not set" in err


async def test_register_wait_times_out_while_no_daemon_reads_the_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    code, _, err = await run_cli(
        "register", "--server", "local", "p", "--wait", "--timeout", "0.2", "--config", str(config)
    )
    assert code == 75, err
    assert "still waiting" in err
    assert len(inbox_files(tmp_path / "jobs.d")) == 1  # it stays queued for the daemon


async def test_register_wait_reports_acceptance_and_rejection(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    """Accepted: the jobs are committed when the command returns. Rejected: the daemon runs
    an older configuration than the command read (a server added, no reload yet): the
    command prints the daemon's reason and exits 1."""
    pid = fake.submit()
    config = write_config(tmp_path, {"local": fake.url})
    newer = tmp_path / "newer.toml"
    newer.write_text(config.read_text() + '\n[servers.gpu-2]\nurl = "http://127.0.0.1:9"\n')
    daemon = await DaemonProcess.start(config)
    try:
        await daemon.wait_event("daemon_started")
        code, out, err = await run_cli(
            "register",
            "--server",
            "local",
            pid,
            "--label",
            "batch=b1",
            "--wait",
            "--config",
            str(config),
        )
        assert code == 0, err
        assert out.startswith(f"registered: {tmp_path / 'jobs.d' / 'done'}/")
        with connect(backend) as conn:
            rows = conn.execute("SELECT prompt_id, labels FROM jobs").fetchall()
        assert [(p, json.loads(labels)) for p, labels in rows] == [(pid, {"batch": "b1"})]

        code, out, err = await run_cli(
            "register", "--server", "gpu-2", "q", "--wait", "--config", str(newer)
        )
        assert code == 1, (out, err)
        assert "rejected, set aside as" in err
        assert "jobs[0].server: unknown server 'gpu-2'" in err
        [error] = (tmp_path / "jobs.d" / "rejected").glob("*.error")
        assert error.read_text().strip() in err
        daemon.send(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.describe()
    finally:
        await daemon.close()


async def test_register_wait_when_registered_files_are_deleted(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    config = write_config(tmp_path, {"local": fake.url}, daemon={"keep_registered_files": False})
    daemon = await DaemonProcess.start(config)
    try:
        await daemon.wait_event("daemon_started")
        code, out, err = await run_cli(
            "register", "--server", "local", "p", "--wait", "--config", str(config)
        )
        assert code == 0, err
        assert out.strip() == "registered: the file was deleted"
        assert inbox_files(tmp_path / "jobs.d") == []
        daemon.send(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.close()
