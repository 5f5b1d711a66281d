"""The command line as a process: exit statuses, closed pipes, one-line errors and never a
traceback. Each case runs ``python -m comfywatch`` as a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from comfywatch.config import DEFAULT_CONFIG_PATH
from comfywatch.store import Store

from .conftest import write_config

EX_PIPE = 141


def run(
    *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comfywatch", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else os.environ.copy(),
        timeout=60,
        check=False,
    )


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Error" not in stderr.replace("error:", ""), stderr  # no exception name either
    assert "Exception ignored" not in stderr, stderr


@pytest.fixture
async def migrated(tmp_path: Path) -> Path:
    """A config with a migrated, empty database; returns the config's path."""
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    store = Store.open(f"sqlite:///{tmp_path / 'comfywatch.db'}")
    try:
        await store.migrate()
    finally:
        await store.close()
    return config


# ------------------------------------------------------------------ --config anywhere


def test_config_before_the_command(migrated: Path) -> None:
    for args in (["jobs", "--json"], ["check-config"], ["hooks"]):
        done = run("--config", str(migrated), *args)
        assert done.returncode == 0, (args, done.stderr)
    done = run("--config", str(migrated), "--log-level", "error", "jobs", "--json")
    assert (done.returncode, done.stdout) == (0, "[]\n")


def test_a_missing_config_names_the_ways_to_give_one(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    env = {k: v for k, v in os.environ.items() if k != "COMFYWATCH_CONFIG"}
    cases = [
        (["--config", str(missing), "jobs"], env),
        (["jobs"], {**env, "COMFYWATCH_CONFIG": str(missing)}),
    ]
    if not DEFAULT_CONFIG_PATH.exists():
        cases.append((["jobs"], env))
    for args, environ in cases:
        done = run(*args, env=environ)
        assert done.returncode == 78, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "--config" in done.stderr and "COMFYWATCH_CONFIG" in done.stderr, done.stderr
        assert_no_traceback(done.stderr)


# ------------------------------------------------------------------ closed pipes


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run(*args, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args", [["jobs", "--json"], ["jobs"], ["check-config"], ["hooks", "--json"]]
)
def test_a_reader_that_went_away_ends_the_command_quietly(migrated: Path, args: list[str]) -> None:
    done = closed_pipe_run(*args, "--config", str(migrated))
    assert (done.returncode, done.stderr) == (EX_PIPE, "")


def test_a_closed_stdout_changes_nothing_else(migrated: Path) -> None:
    done = closed_pipe_run("hooks", "new-secret")
    assert (done.returncode, done.stderr) == (EX_PIPE, "")
    # No such job: said on stderr, nothing written to stdout, the usual status.
    done = closed_pipe_run("show", "x", "--config", str(migrated))
    assert (done.returncode, done.stderr) == (
        1,
        "comfywatch: no job with prompt id 'x' or an id starting with it\n",
    )


@pytest.mark.parametrize("args", [["--help"], ["show", "--help"], ["--version"]])
def test_help_to_a_reader_that_went_away_exits_0_quietly(args: list[str]) -> None:
    """argparse drops what it cannot write of its help and exits 0."""
    done = closed_pipe_run(*args)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_reader_that_stops_midway_ends_the_command_quietly(tmp_path: Path) -> None:
    """``check-config | head -1`` on more than a pipe holds: the reader goes after one line
    while the command still writes."""
    jobs = [{"server": "local", "prompt_id": f"prompt-{n:05}"} for n in range(3000)]
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"}, jobs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfywatch", "check-config", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc, proc.stderr:
        with proc.stdout:
            first = proc.stdout.readline()
        err = proc.stderr.read().decode()
        assert proc.wait(60) == EX_PIPE, err
    assert first.startswith(b"config: ")
    assert err == ""


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--older-than", "30"],
        ["jobs", "--limit", "-1"],
        ["fake-server", "--port", "99999"],
        ["fake-server", "--run-time", "-1"],
    ],
)
def test_bad_values_exit_2_in_one_line(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert_no_traceback(done.stderr)


def test_fake_server_on_a_port_in_use_exits_2_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("fake-server", "--port", str(port))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert_no_traceback(done.stderr)


# ------------------------------------------------------------------ hooks new-secret


def test_new_secret_is_a_fresh_standard_webhooks_secret() -> None:
    from standardwebhooks import Webhook

    from comfywatch.config.secrets import decode_secret

    first, second = (run("hooks", "new-secret") for _ in range(2))
    assert (first.returncode, first.stderr) == (0, "")
    secret = first.stdout.strip()
    assert first.stdout == secret + "\n" and secret.startswith("whsec_")
    assert 24 <= len(decode_secret(secret)) <= 32  # what the config loader reads
    assert second.stdout != first.stdout
    # The reference library takes it, and verifies what it signs with it.
    webhook = Webhook(secret)
    timestamp = datetime.now(tz=UTC)
    signature = webhook.sign("msg_1", timestamp, '{"a": 1}')
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }
    assert webhook.verify('{"a": 1}', headers) == {"a": 1}


# ------------------------------------------------------------------ check-config


def test_check_config_reports_every_mistake(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"local": {"url": "http://127.0.0.1:9", "reqest_timeout_s": 5}},
        [{"server": "elsewhere", "prompt_id": "a"}],
        daemon={"pol_interval_s": 1},
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode == 78
    lines = done.stderr.splitlines()
    assert [line.split(": ")[3] for line in lines] == [
        "daemon.pol_interval_s",
        "servers.local.reqest_timeout_s",
        "jobs[0].server",
    ], done.stderr
    assert all(line.startswith(f"comfywatch: configuration error: {config}:") for line in lines)
    assert done.stdout == ""
