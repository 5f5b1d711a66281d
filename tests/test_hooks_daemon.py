"""Hooks through the whole daemon: which jobs owe which hooks (``on``, per-job hooks,
default hooks), ``--until-done`` waiting for deliveries, and the ``hooks`` CLI."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from comfywatch.config import load_settings
from comfywatch.service import Daemon
from comfywatch.store import Store
from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .daemon_proc import DaemonProcess, connect
from .helpers import comfywatch
from .receiver import Receiver
from .test_hooks import WHSEC

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")

HOOKS = """
[hooks.notify]
type = "webhook"
url = "{url}"
secret_env = "TEST_NOTIFY_SECRET"
retry_schedule_s = [0.01]

[hooks.errors]
type = "webhook"
url = "{url}"
on = ["error"]
secret_env = "TEST_NOTIFY_SECRET"
retry_schedule_s = [0.01]
"""


async def run_until_done(config: Path) -> None:
    """The daemon in-process on the real clock, until every job and delivery is done."""
    settings = load_settings(config, env={"TEST_NOTIFY_SECRET": WHSEC})
    store = Store.open(settings.daemon.database_url)
    try:
        assert await asyncio.wait_for(Daemon(settings, store=store).run(until_done=True), 60) == 0
    finally:
        await store.close()


def received(receiver: Receiver) -> list[tuple[str, str, str, str]]:
    """(hook id header, event type, prompt id, state) per request, signature checked."""
    out = []
    for headers, body in receiver.requests:
        event = Webhook(WHSEC).verify(body, headers)
        out.append(
            (
                headers["webhook-id"],
                event["type"],
                event["data"]["prompt_id"],
                event["data"]["state"],
            )
        )
    return out


async def test_on_filters_and_per_job_and_default_hooks(tmp_path: Path, fake: FakeComfyUI) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        default_ok = fake.submit()  # no hooks key: daemon.default_hooks = ["notify"]
        both_err = fake.submit(outcome="error")  # hooks = ["notify", "errors"]
        none_ok = fake.submit()  # hooks = []: nothing
        errors_ok = fake.submit()  # hooks = ["errors"], but it succeeded: not owed
        jobs: list[dict[str, Any]] = [
            {"server": "local", "prompt_id": default_ok},
            {"server": "local", "prompt_id": both_err, "hooks": ["notify", "errors"]},
            {"server": "local", "prompt_id": none_ok, "hooks": []},
            {"server": "local", "prompt_id": errors_ok, "hooks": ["errors"]},
        ]
        config = write_config(
            tmp_path,
            {"local": fake.url},
            jobs,
            daemon={"default_hooks": ["notify"]},
            extra=HOOKS.format(url=receiver.url),
        )
        await run_until_done(config)
        got = received(receiver)
        assert sorted((kind, pid) for _, kind, pid, _ in got) == sorted(
            [("job.success", default_ok), ("job.error", both_err), ("job.error", both_err)]
        )
        assert len({hook_id for hook_id, *_ in got}) == 3  # one webhook-id per delivery

        env = {"TEST_NOTIFY_SECRET": WHSEC}
        code, out, err = await comfywatch("hooks", "--config", str(config), "--json", env=env)
        assert code == 0, err
        listed = json.loads(out)
        assert sorted((d["hook"], d["prompt_id"], d["state"]) for d in listed) == sorted(
            [
                ("notify", default_ok, "delivered"),
                ("notify", both_err, "delivered"),
                ("errors", both_err, "delivered"),
            ]
        )
        for delivery in listed:
            assert {"id", "server", "attempts", "last_error", "delivered_at"} <= delivery.keys()
        code, out, _ = await comfywatch(
            "show", both_err, "--config", str(config), "--json", env=env
        )
        assert sorted(d["hook"] for d in json.loads(out)["deliveries"]) == ["errors", "notify"]
    finally:
        await receiver.stop()


async def test_dead_delivery_is_revived_by_hooks_retry(tmp_path: Path, fake: FakeComfyUI) -> None:
    """A receiver that keeps failing: dead after the schedule; ``hooks retry`` sends it again
    with the same webhook-id once the receiver is fixed."""
    receiver = Receiver(statuses=[500, 500])
    await receiver.start()
    try:
        pid = fake.submit()
        config = write_config(
            tmp_path,
            {"local": fake.url},
            [{"server": "local", "prompt_id": pid, "hooks": ["notify"]}],
            extra=HOOKS.format(url=receiver.url),
        )
        await run_until_done(config)  # --until-done also ends on dead deliveries
        env = {"TEST_NOTIFY_SECRET": WHSEC}
        code, out, _ = await comfywatch(
            "hooks", "--state", "dead", "--config", str(config), "--json", env=env
        )
        [dead] = json.loads(out)
        assert (dead["prompt_id"], dead["attempts"]) == (pid, 2)
        assert "500" in (dead["last_error"] or "") or dead["last_status_code"] == 500

        code, out, err = await comfywatch(
            "hooks", "retry", str(dead["id"]), "--config", str(config), env=env
        )
        assert code == 0 and "1 delivery queued again" in out, err
        await run_until_done(config)
        code, out, _ = await comfywatch("hooks", "--config", str(config), "--json", env=env)
        [delivered] = json.loads(out)
        assert delivered["state"] == "delivered" and delivered["delivered_at"]
        ids = {hook_id for hook_id, *_ in received(receiver)}
        assert len(receiver.requests) == 3 and ids == {dead["event_id"]}
        code, _, err = await comfywatch("hooks", "retry", "--config", str(config), env=env)
        assert code == 2 and "--all-dead" in err
    finally:
        await receiver.stop()


async def test_hooks_retry_reaches_a_running_daemon_within_a_poll_interval(
    tmp_path: Path, fake: FakeComfyUI, backend: str
) -> None:
    """A running daemon, a delivery gone dead: ``comfywatch hooks retry`` (another
    process) queues it, and the daemon sends it within a couple of poll intervals: it
    looks at the outbox every poll interval, not only when its own ticks change jobs or
    after its idle timer (60 s, never reached here: the receiver waits 10 s at most).
    Asked again while it is in flight, ``hooks retry`` says it is already queued (exit 0);
    once delivered, or for an id that does not exist, it says so and exits 1."""
    receiver = Receiver(statuses=[500, 500])
    await receiver.start()
    pid = fake.submit()
    config = write_config(
        tmp_path,
        {"local": fake.url},
        [{"server": "local", "prompt_id": pid, "hooks": ["notify"]}],
        daemon={"poll_interval_s": 0.2},
        extra=HOOKS.format(url=receiver.url),
    )
    env = {"TEST_NOTIFY_SECRET": WHSEC}
    proc = await DaemonProcess.start(config, env=env)
    try:
        await proc.wait_event("hook_dead")
        [dead] = [d for d, _ in await deliveries_of(backend)]
        receiver.hang = True  # the retried attempt stays in flight until released

        code, out, err = await comfywatch(
            "hooks", "retry", str(dead), "--config", str(config), env=env
        )
        assert code == 0 and "1 delivery queued again" in out, err
        await proc.until(receiver.wait_until(lambda: receiver.active == 1), "the retry arrives")

        code, out, err = await comfywatch(
            "hooks", "retry", str(dead), "--config", str(config), env=env
        )
        assert code == 0, err
        assert "0 deliveries queued again" in out and f"delivery {dead} is already queued" in out

        receiver.release.set()
        await proc.wait_event("hook_delivered")
        code, out, err = await comfywatch(
            "hooks", "retry", str(dead), str(dead + 1), "--config", str(config), env=env
        )
        assert code == 1, (out, err)
        assert f"delivery {dead} is delivered" in err and f"no delivery {dead + 1}" in err
        proc.send(signal.SIGTERM)
        assert await proc.wait() == 0, proc.describe()
    finally:
        await proc.close()
        await receiver.stop()
    assert len(receiver.requests) == 3


async def deliveries_of(database: str) -> list[tuple[int, str]]:
    """(id, state) of every delivery in the daemon's database, read as an operator would."""
    with connect(database) as conn:
        return list(conn.execute("SELECT id, state FROM hook_deliveries"))
