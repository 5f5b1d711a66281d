"""What a whole run writes to its logs: JSON lines (or console lines), at the chosen level,
and never a secret.

Each test runs ``python -m comfywatch run --until-done`` as a real subprocess against the
fake ComfyUI, with webhook receivers on 127.0.0.1 in this test's event loop.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .helpers import comfywatch

HEADER_VALUE = "Bearer SECRET-HEADER-VALUE"
ENV_KEY = b"comfywatch-logs-env-key-0123456"
FILE_KEY = b"comfywatch-logs-file-key-012345"
ENV_WHSEC = "whsec_" + base64.b64encode(ENV_KEY).decode()
FILE_WHSEC = "whsec_" + base64.b64encode(FILE_KEY).decode()
URL_TOKEN = "URL-TOKEN-VALUE"
HOOK_HEADER_VALUE = "HOOK-HEADER-VALUE"
SECRET_ENV = "COMFYWATCH_TEST_LOGS_WHSEC"

#: Text that must never show up in a log line (or in the database).
SECRETS = [
    "SECRET-HEADER-VALUE",
    ENV_WHSEC,
    ENV_WHSEC.removeprefix("whsec_"),
    ENV_KEY.decode(),
    FILE_WHSEC,
    FILE_WHSEC.removeprefix("whsec_"),
    FILE_KEY.decode(),
    URL_TOKEN,
    HOOK_HEADER_VALUE,
]

CONSOLE_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z \[(debug|info|warning|error)\s*\] [a-z_]+( .*)?"
)


class Receiver:
    """Webhook receivers on a real port: the first attempt of each delivery gets a 500."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        seen = {(p, h["webhook-id"]) for p, h, _ in self.requests}
        first = (request.path, request.headers["webhook-id"]) not in seen
        self.requests.append((request.path, dict(request.headers), await request.read()))
        return web.Response(status=500 if first else 200, text="receiver says hi")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def guarded() -> AsyncIterator[FakeComfyUI]:
    """A fake ComfyUI that answers 401 to any request without the Authorization header."""
    server = FakeComfyUI(run_time_s=0.01, required_headers={"Authorization": HEADER_VALUE})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line as a JSON object with event, level and timestamp (or the test fails)."""
    events = []
    for line in text.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert {"event", "level", "timestamp"} <= event.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", event["timestamp"]), line
        events.append(event)
    return events


def database_dump(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_a_whole_run_logs_json_lines_without_secrets(
    tmp_path: Path, guarded: FakeComfyUI, receiver: Receiver, level: str
) -> None:
    """Authenticated polls, a server hiccup, a failed job, webhooks signed with secrets
    from the environment and from a file (each refused once, then delivered), and one whose
    receiver is down (dead at once): every line of the run is a JSON object, and no header
    value, secret, key or URL token appears in the output or in the database."""
    ok = guarded.submit()
    bad = guarded.submit(outcome="error")
    await guarded.wait_finished(ok)
    await guarded.wait_finished(bad)
    guarded.inject("http_500", route="GET /queue", times=1)
    (tmp_path / "hook.secret").write_text(FILE_WHSEC + "\n")
    hooks = f"""
        [hooks.notify]
        type = "webhook"
        url = "{receiver.base}/env?token={URL_TOKEN}"
        secret_env = "{SECRET_ENV}"
        headers = {{ "X-Api-Key" = "{HOOK_HEADER_VALUE}" }}
        retry_schedule_s = [0.05, 0.05]

        [hooks.filed]
        type = "webhook"
        url = "{receiver.base}/file"
        secret_file = "hook.secret"
        retry_schedule_s = [0.05, 0.05]

        [hooks.down]
        type = "webhook"
        url = "http://127.0.0.1:{free_port()}/down?token={URL_TOKEN}"
        secret_env = "{SECRET_ENV}"
        retry_schedule_s = []
        """
    jobs: list[dict[str, Any]] = [
        {"server": "local", "prompt_id": p, "hooks": ["notify", "filed", "down"]} for p in (ok, bad)
    ]
    server = {"url": guarded.url, "headers": {"Authorization": HEADER_VALUE}}
    config = write_config(tmp_path, {"local": server}, jobs, extra=hooks)

    code, out, err = await comfywatch(
        "run",
        "--config",
        str(config),
        "--until-done",
        "--log-level",
        level,
        env={SECRET_ENV: ENV_WHSEC},
    )
    assert code == 0, err

    events = json_lines(out) + json_lines(err)
    names = [e["event"] for e in events]
    for expected in (
        "daemon_started",
        "server_unavailable",
        "server_recovered",
        "job_finished",
        "hook_retry_scheduled",
        "hook_delivered",
        "hook_dead",
        "all_done",
        "daemon_stopped",
    ):
        assert expected in names, expected
    assert names.count("job_finished") == 2
    assert names.count("hook_retry_scheduled") == 4 and names.count("hook_delivered") == 4
    assert names.count("hook_dead") == 2
    levels = (
        {"debug", "info", "warning", "error"} if level == "debug" else {"info", "warning", "error"}
    )
    assert {e["level"] for e in events} <= levels

    # The secrets were really in use: the receivers got signed requests with the header.
    assert guarded.requests["GET /queue"] >= 2
    delivered = [r for r in receiver.requests if r[0] == "/env"]
    assert len(delivered) == 4  # two jobs, each refused once
    assert len(receiver.requests) == 8
    for path, headers, body in receiver.requests:
        key = ENV_WHSEC if path == "/env" else FILE_WHSEC
        Webhook(key).verify(body, headers)
    assert all(headers["X-Api-Key"] == HOOK_HEADER_VALUE for _, headers, _ in delivered)

    stored = database_dump(tmp_path / "comfywatch.db")
    for secret in SECRETS:
        assert secret not in out and secret not in err, secret
        assert secret not in stored, secret


async def test_console_format_gives_readable_lines(tmp_path: Path, fake: FakeComfyUI) -> None:
    pid = fake.submit()
    config = write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    code, out, err = await comfywatch(
        "run", "--config", str(config), "--until-done", "--log-format", "console"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines
    for line in lines:
        assert CONSOLE_LINE.fullmatch(line), line
        with pytest.raises(ValueError):
            json.loads(line)
    assert "\x1b[" not in out  # no colours into a pipe
    finished = [line for line in lines if " job_finished " in line]
    assert len(finished) == 1 and f"prompt_id={pid}" in finished[0]
    assert any(" all_done" in line for line in lines)


@pytest.mark.parametrize("where", ["command line", "config file"])
async def test_warning_level_keeps_only_warnings_and_errors(
    tmp_path: Path, fake: FakeComfyUI, where: str
) -> None:
    pid = fake.submit()
    fake.inject("http_500", route="GET /queue", times=1)  # one warning to see
    daemon = {"log_level": "warning"} if where == "config file" else {}
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}], daemon=daemon
    )
    flags = ["--log-level", "warning"] if where == "command line" else []
    code, out, err = await comfywatch("run", "--config", str(config), "--until-done", *flags)
    assert code == 0, err
    events = json_lines(out) + json_lines(err)
    assert {e["level"] for e in events} <= {"warning", "error"}
    names = {e["event"] for e in events}
    assert "server_unavailable" in names
    assert not names & {"daemon_started", "job_finished", "server_recovered", "all_done"}
