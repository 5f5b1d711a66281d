"""Transport faults from a server: caught at the client, logged once per episode, counted,
backed off; never a state change for its jobs, and other servers keep full speed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from comfywatch.server_health import backoff_s
from comfywatch.service import Daemon
from comfywatch.store import JobFilter
from comfywatch.testing import FakeComfyUI

from .conftest import Clock, write_config

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")

MakeDaemon = Callable[[Path], Awaitable[Daemon]]

FAULT_KINDS = [
    ("http_500", "bad_response"),
    ("html", "bad_response"),
    ("wrong_shape", "bad_response"),
    ("truncated_json", "bad_response"),
    ("redirect_loop", "bad_response"),
    ("oversize", "bad_response"),
    ("auth_401", "auth"),
    ("auth_403", "auth"),
    ("hang", "unavailable"),
    ("slow_drip", "unavailable"),
    ("reset", "unavailable"),
]


async def _states(daemon: Daemon) -> dict[str, str]:
    return {r.job.prompt_id: r.job.state for r in await daemon.store.jobs(JobFilter())}


@pytest.mark.parametrize(("fault", "kind"), FAULT_KINDS)
async def test_fault_backs_off_without_touching_jobs(
    tmp_path: Path,
    fake: FakeComfyUI,
    fake2: FakeComfyUI,
    make_daemon: MakeDaemon,
    clock: Clock,
    fault: str,
    kind: str,
) -> None:
    fake.pause()
    waiting = fake.submit()
    other = fake2.submit()
    fake.oversize_bytes = 2 * 1024 * 1024
    fake.drip_interval_s = 0.05
    sick = {"url": fake.url, "request_timeout_s": 0.5, "max_response_bytes": 1024 * 1024}
    jobs = [{"server": "sick", "prompt_id": waiting}, {"server": "well", "prompt_id": other}]
    daemon = await make_daemon(write_config(tmp_path, {"sick": sick, "well": fake2.url}, jobs))
    await daemon.poller.tick()
    assert (await _states(daemon))[waiting] == "queued"

    fake.inject(fault)  # type: ignore[arg-type]
    await fake2.wait_finished(other)
    with capture_logs() as logs:
        for _ in range(3):
            report = await daemon.poller.tick()
            assert report.servers_failed == 1
            clock.advance(3600)  # past any backoff
    # The healthy server was tracked at full speed meanwhile.
    assert await _states(daemon) == {waiting: "queued", other: "success"}
    episodes = [e for e in logs if e["event"] == "server_unavailable"]
    assert len(episodes) == 1, logs  # once per episode, not once per tick
    assert episodes[0]["error"] == kind and episodes[0]["server"] == "sick"
    health = daemon.poller.health()["sick"]
    assert (health.up, health.error_kind, health.failures) == (False, kind, 3)
    polls = daemon.metrics.polls.labels("sick", kind)._value.get()
    assert polls == 3

    fake.clear_faults()
    fake.resume()
    await fake.wait_finished(waiting)
    with capture_logs() as logs:
        await daemon.poller.tick()
    assert (await _states(daemon))[waiting] == "success"
    assert [e["event"] for e in logs if e["event"].startswith("server_")] == ["server_recovered"]


async def test_connection_refused_backs_off_exponentially(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    fake.pause()
    pid = fake.submit()
    daemon = await make_daemon(
        write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    )
    await daemon.poller.tick()
    await fake.go_down()
    waits = []
    for _ in range(6):
        report = await daemon.poller.tick()
        assert report.servers_failed == 1
        health = daemon.poller.health()["local"]
        waits.append(health.next_poll_mono_s - clock.mono())
        # Not due yet: the next tick does not poll the server at all.
        assert (await daemon.poller.tick()).servers_polled == 0
        clock.advance(waits[-1])
    assert waits[-1] > waits[0]  # it backs off
    assert max(waits) <= 60  # capped
    assert (await _states(daemon))[pid] == "queued"


@pytest.mark.parametrize(
    ("failures", "auth", "wait_s"),
    [
        (1, False, 4.0),  # poll_interval_s * 2**failures
        (2, False, 8.0),
        (3, False, 16.0),
        (4, False, 30.0),  # capped
        (10**6, False, 30.0),  # a long outage: still capped, no overflow
        (1, True, 30.0),  # refused credentials: the cap at once
    ],
)
def test_backoff_doubles_up_to_the_cap(failures: int, auth: bool, wait_s: float) -> None:
    assert backoff_s(failures, 2.0, 30.0, auth=auth) == wait_s


async def test_auth_failure_does_not_retry_faster(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """401/403 is a configuration problem: it waits the longest backoff at once."""
    pid = fake.submit()
    daemon = await make_daemon(
        write_config(tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": pid}])
    )
    fake.inject("auth_401")
    with capture_logs() as logs:
        await daemon.poller.tick()
    health = daemon.poller.health()["local"]
    assert health.next_poll_mono_s - clock.mono() >= 44  # 45 s, less the time since
    [event] = [e for e in logs if e["event"] == "server_unavailable"]
    assert event["error"] == "auth" and "authentication" in event["detail"]


async def test_headers_are_sent_and_never_logged(tmp_path: Path, make_daemon: MakeDaemon) -> None:
    secret = "Bearer do-not-log-me-7f3a"
    fake = FakeComfyUI(required_headers={"Authorization": secret}, run_time_s=0.01)
    await fake.start()
    try:
        pid = fake.submit()
        await fake.wait_finished(pid)
        server = {"url": fake.url, "headers": {"Authorization": secret}}
        config = write_config(tmp_path, {"local": server}, [{"server": "local", "prompt_id": pid}])
        with capture_logs() as logs:
            daemon = await make_daemon(config)
            await daemon.poller.tick()
        assert (await _states(daemon))[pid] == "success"
        assert secret not in repr(logs)
        assert "do-not-log-me" not in repr(daemon.settings)
    finally:
        await fake.stop()


async def test_one_unreadable_history_entry_does_not_stall_the_rest(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    pids = [fake.submit() for _ in range(3)]
    others = [fake.submit() for _ in range(8)]  # newer: the first tail does not reach ours
    for pid in pids + others:
        await fake.wait_finished(pid)
    jobs = [{"server": "local", "prompt_id": p} for p in pids]
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    fake.inject("html", route="GET /history/{id}", times=1)
    report = await daemon.poller.tick()
    assert report.servers_failed == 0
    assert sorted((await _states(daemon)).values()) == ["registered", "success", "success"]
    await daemon.poller.tick()
    assert set((await _states(daemon)).values()) == {"success"}
