"""``comfywatch hooks test``: a sample event, signed as a real one, sent through the real
attempt code to a real receiver and a real command; the CLI runs as a subprocess."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

from comfywatch.hooks.command import command_env
from comfywatch.hooks.payload import TEST_EVENT_TYPE, sample_delivery
from comfywatch.states import JobState

from .conftest import write_config
from .daemon_proc import run_cli
from .receiver import Receiver

WHSEC = "whsec_" + base64.b64encode(b"comfywatch-test-key-0123456789ab").decode()

#: A command hook that keeps its stdin and its COMFYWATCH_* environment, and answers.
COMMAND = """
import json, os, sys
event = json.loads(sys.stdin.read())
seen = {k: v for k, v in os.environ.items() if k.startswith("COMFYWATCH_")}
with open(sys.argv[1], "w") as out:
    json.dump({"event": event, "env": seen}, out)
print("archived", event["data"]["prompt_id"])
sys.exit(int(sys.argv[2]))
"""


def config_with_hooks(folder: Path, url: str, *, exit_status: int = 0) -> Path:
    secret = folder / "notify.secret"
    secret.write_text(WHSEC + "\n")
    secret.chmod(0o600)
    script = folder / "hook.py"
    script.write_text(COMMAND)
    argv = [sys.executable, str(script), str(folder / "seen.json"), str(exit_status)]
    return write_config(
        folder,
        {"local": "http://127.0.0.1:9"},
        extra=f"""
        [hooks.notify]
        type = "webhook"
        url = {json.dumps(url)}
        secret_file = {json.dumps(str(secret))}

        [hooks.archive]
        type = "command"
        argv = {json.dumps(argv)}
        """,
    )


async def test_hooks_test_sends_a_signed_job_test_event_to_a_webhook(
    tmp_path: Path, receivers: Callable[..., Any]
) -> None:
    receiver: Receiver = await receivers([200, 503], body=b"thanks")
    config = config_with_hooks(tmp_path, receiver.url)
    code, out, err = await run_cli("hooks", "test", "notify", "--config", str(config))
    assert code == 0, err
    [(headers, body)] = receiver.requests
    event = Webhook(WHSEC).verify(body, headers)  # raises unless signed as real events are
    assert event["type"] == TEST_EVENT_TYPE == "job.test"
    assert event["data"]["state"] == "success" and event["data"]["server"] == "local"
    assert event["data"]["outputs"][0]["filename"] == "comfywatch_test_00001_.png"
    lines = out.splitlines()
    assert lines[0].startswith("notify (webhook): delivered: HTTP 200 (event msg_")
    assert lines[1:] == ["thanks"]

    code, out, _ = await run_cli(
        "hooks", "test", "notify", "--state", "error", "--config", str(config)
    )
    assert code == 1  # the receiver answered 503
    assert out.startswith("notify (webhook): failed: HTTP 503")
    second_headers, second_body = receiver.requests[1]
    data = json.loads(second_body)["data"]
    assert data["state"] == "error" and data["error"]["node_type"] == "SaveImage"
    assert second_headers["webhook-id"] != headers["webhook-id"]  # a fresh event each time

    code, _, err = await run_cli("hooks", "test", "nope", "--config", str(config))
    assert code == 2 and "unknown hook 'nope' (known: archive, notify)" in err


async def test_hooks_test_runs_a_command_hook_with_comfywatch_test_set(tmp_path: Path) -> None:
    config = config_with_hooks(tmp_path, "http://127.0.0.1:9/hook")
    code, out, err = await run_cli(
        "hooks", "test", "archive", "--state", "timeout", "--config", str(config)
    )
    assert code == 0, err
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["env"]["COMFYWATCH_TEST"] == "1"
    assert seen["env"]["COMFYWATCH_STATE"] == "timeout"
    assert seen["event"]["type"] == "job.test"
    assert seen["event"]["data"]["reason"] == "run_timeout"
    prompt_id = seen["event"]["data"]["prompt_id"]
    assert out.splitlines() == [
        f"archive (command): delivered: exit status 0 (event {seen['env']['COMFYWATCH_EVENT_ID']},"
        " type job.test)",
        f"archived {prompt_id}",
    ]

    failing = config_with_hooks(tmp_path, "http://127.0.0.1:9/hook", exit_status=3)
    code, out, _ = await run_cli("hooks", "test", "archive", "--config", str(failing))
    assert code == 1 and out.startswith("archive (command): failed: exit status 3")


def test_only_test_events_carry_comfywatch_test() -> None:
    """A daemon started with COMFYWATCH_TEST set does not mark real events as tests."""
    due = sample_delivery("archive", JobState.SUCCESS, server="local", now_s=1.8e9)
    env = command_env(
        {"COMFYWATCH_TEST": "1", "PATH": "/bin"}, due.delivery, due.job.job, hidden=[]
    )
    assert env["COMFYWATCH_TEST"] == "1"
    real = dataclasses.replace(due.delivery, event_type="job.success")
    env = command_env({"COMFYWATCH_TEST": "1", "PATH": "/bin"}, real, due.job.job, hidden=[])
    assert "COMFYWATCH_TEST" not in env and env["PATH"] == "/bin"
