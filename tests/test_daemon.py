"""The daemon against a fake ComfyUI on a real port and a real SQLite file, one tick at a time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from comfywatch.service import Daemon
from comfywatch.store import JobFilter, JobRecord
from comfywatch.testing import FakeComfyUI

from .conftest import Clock, jobs_toml, write_config

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")

MakeDaemon = Callable[[Path], Awaitable[Daemon]]


async def job(daemon: Daemon, prompt_id: str) -> JobRecord:
    [record] = await daemon.store.jobs(JobFilter(prompt_id=prompt_id), with_history=True)
    return record


async def states(daemon: Daemon) -> dict[str, str]:
    return {r.job.prompt_id: r.job.state for r in await daemon.store.jobs(JobFilter())}


def spec(prompt_id: str, server: str = "local", **extra: Any) -> dict[str, Any]:
    return {"server": server, "prompt_id": prompt_id, **extra}


async def test_success_walks_through_queued_running_success(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """registered -> queued -> running -> success, with outputs, labels and timestamps.

    A start leaves the queue's count unchanged: ``running`` is learnt at the next queue
    refresh (``queue_refresh_s``, tiny here), the finish from the history tail."""
    fake.pause()
    pid = fake.submit()
    server = {"url": fake.url, "queue_refresh_s": 0.001}
    config = write_config(tmp_path, {"local": server}, [spec(pid, labels={"batch": "b1"})])
    daemon = await make_daemon(config)
    assert (await job(daemon, pid)).job.state == "registered"

    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "queued"

    fake.hold_running()
    fake.resume()
    await fake.wait_running(pid)
    await asyncio.sleep(0.002)  # past queue_refresh_s
    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "running"

    fake.release()
    await fake.wait_finished(pid)
    await daemon.poller.tick()
    record = await job(daemon, pid)
    j = record.job
    assert (j.state, j.reason, j.status_str, j.completed) == (
        "success",
        "finished",
        "success",
        True,
    )
    assert j.labels == {"batch": "b1"}
    assert j.comfy_started_at_ms is not None and j.comfy_finished_at_ms is not None
    assert j.registered_at <= j.detected_at  # type: ignore[operator]
    assert j.queued_at is not None and j.started_at is not None and j.finished_at is not None
    assert j.history is not None and pid in str(j.history["prompt"])
    assert [(o.kind, o.type) for o in record.outputs] == [("images", "output")]
    assert record.outputs[0].filename


async def test_error_and_interrupt_are_recorded_with_their_fields(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    err = fake.submit(outcome="error")
    intr = fake.submit(outcome="interrupted")
    await fake.wait_finished(err)
    await fake.wait_finished(intr)
    config = write_config(tmp_path, {"local": fake.url}, [spec(err), spec(intr)])
    daemon = await make_daemon(config)
    await daemon.poller.tick()

    e = (await job(daemon, err)).job
    assert (e.state, e.status_str, e.completed) == ("error", "error", False)
    assert e.error_node_id and e.error_node_type and e.error_exception_type
    assert e.error_exception_message and e.error_traceback
    i = (await job(daemon, intr)).job
    assert (i.state, i.status_str, i.completed) == ("interrupted", "error", False)
    assert i.error_exception_type is None


async def test_interrupt_over_http_while_running(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    pid = fake.submit(run_time_s=600)
    await fake.wait_running(pid)
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(pid)]))
    await daemon.poller.tick()
    fake.interrupt(pid)
    await fake.wait_finished(pid)
    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "interrupted"


async def test_deleted_from_pending_queue_is_cancelled(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    fake.pause()
    pid = fake.submit()
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(pid)]))
    await daemon.poller.tick()
    fake.delete_from_queue([pid])
    await daemon.poller.tick()
    assert (await job(daemon, pid)).job.state == "queued"  # asked twice before calling it gone
    await daemon.poller.tick()
    j = (await job(daemon, pid)).job
    assert (j.state, j.reason) == ("cancelled", "deleted_from_queue")


async def test_server_restart_loses_pending_and_running_but_keeps_finished(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    done = fake.submit()
    await fake.wait_finished(done)
    fake.hold_running()
    running = fake.submit()
    pending = fake.submit()
    await fake.wait_running(running)
    jobs = [spec(done), spec(running), spec(pending)]
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, jobs))
    await daemon.poller.tick()
    assert await states(daemon) == {done: "success", running: "running", pending: "queued"}

    await fake.go_down()
    await daemon.poller.tick()  # unreachable: nobody is lost for that
    assert await states(daemon) == {done: "success", running: "running", pending: "queued"}
    await fake.restart()  # back, with an empty memory
    for _ in range(3):
        clock.advance(120)  # past any backoff
        await daemon.poller.tick()
    final = await daemon.store.jobs(JobFilter())
    by_id = {r.job.prompt_id: (r.job.state, r.job.reason) for r in final}
    assert by_id == {
        done: ("success", "finished"),
        running: ("lost", "server_restarted"),
        pending: ("lost", "server_restarted"),
    }


async def test_never_seen_prompt_is_not_found_after_the_grace_period(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    ghost = str(uuid.uuid4())
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(ghost)]))
    await daemon.poller.tick()
    await daemon.poller.tick()
    assert (await job(daemon, ghost)).job.state == "registered"
    clock.advance(61)
    await daemon.poller.tick()
    j = (await job(daemon, ghost)).job
    assert (j.state, j.reason) == ("not_found", "never_seen")


async def test_deadlines_time_out_stuck_and_waiting_jobs(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    fake.hold_running()
    stuck = fake.submit()
    waiting = fake.submit()
    await fake.wait_running(stuck)
    server = {"url": fake.url, "run_timeout_s": 30, "queue_timeout_s": 100}
    daemon = await make_daemon(
        write_config(tmp_path, {"local": server}, [spec(stuck), spec(waiting)])
    )
    await daemon.poller.tick()
    clock.advance(31)
    await daemon.poller.tick()
    assert (await job(daemon, stuck)).job.reason == "run_timeout"
    assert (await job(daemon, waiting)).job.state == "queued"
    clock.advance(70)
    await daemon.poller.tick()
    w = (await job(daemon, waiting)).job
    assert (w.state, w.reason) == ("timeout", "queue_timeout")
    fake.release()  # finishing later changes nothing: terminal states never change
    await fake.wait_finished(stuck)
    await daemon.poller.tick()
    assert (await job(daemon, stuck)).job.state == "timeout"


async def test_server_down_for_a_while_then_back_loses_nothing(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    fake.pause()
    pids = [fake.submit() for _ in range(3)]
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(p) for p in pids]))
    await daemon.poller.tick()
    await fake.go_down()
    for _ in range(5):
        clock.advance(600)  # far past not_found_after_s and every backoff
        report = await daemon.poller.tick()
        assert report.servers_failed in (0, 1)
    assert set((await states(daemon)).values()) == {"queued"}
    health = daemon.poller.health()["local"]
    assert health.up is False and health.failures >= 1
    await fake.come_up()
    fake.resume()
    for pid in pids:
        await fake.wait_finished(pid)
    clock.advance(600)
    await daemon.poller.tick()
    assert set((await states(daemon)).values()) == {"success"}


async def test_several_servers_at_once_one_queue_call_each(
    tmp_path: Path, fake: FakeComfyUI, fake2: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """One GET /queue per server at start; then a count probe per tick, and one history
    tail for the server whose count dropped (not one request per finished prompt)."""
    fake.pause()
    fake2.pause()
    a = [fake.submit() for _ in range(20)]
    b = [fake2.submit() for _ in range(20)]
    jobs = [spec(p, "one") for p in a] + [spec(p, "two") for p in b]
    daemon = await make_daemon(write_config(tmp_path, {"one": fake.url, "two": fake2.url}, jobs))
    await daemon.poller.tick()
    assert fake.requests["GET /queue"] == 1 and fake2.requests["GET /queue"] == 1
    assert fake.requests["GET /history/{id}"] == 0 and fake2.requests["GET /history/{id}"] == 0
    fake2.resume()
    for pid in b:
        await fake2.wait_finished(pid)
    tails = fake2.requests["GET /history"]
    await daemon.poller.tick()
    assert fake2.requests["GET /history"] == tails + 1
    assert fake2.requests["GET /history/{id}"] == 0 and fake.requests["GET /history/{id}"] == 0
    assert fake.requests["GET /queue"] == 1 and fake2.requests["GET /queue"] == 1
    assert fake.requests["GET /prompt"] == 1 and fake2.requests["GET /prompt"] == 1
    got = await states(daemon)
    assert {got[p] for p in a} == {"queued"} and {got[p] for p in b} == {"success"}


async def test_a_server_that_is_down_does_not_slow_the_others(
    tmp_path: Path, fake: FakeComfyUI, fake2: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    p1, p2 = fake.submit(), fake2.submit()
    await fake.wait_finished(p1)
    await fake2.wait_finished(p2)
    await fake.go_down()
    config = write_config(
        tmp_path, {"one": fake.url, "two": fake2.url}, [spec(p1, "one"), spec(p2, "two")]
    )
    daemon = await make_daemon(config)
    await daemon.poller.tick()
    assert await states(daemon) == {p1: "registered", p2: "success"}


async def test_job_dropped_in_while_running_is_tracked(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A file written (then renamed) into jobs_dir is picked up without a restart, and
    moved to done/ once its jobs are committed."""
    first = fake.submit()
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(first)]))
    later = fake.submit()
    runner = asyncio.create_task(daemon.run())
    try:
        tmp = tmp_path / "jobs.d" / ".batch.tmp"
        tmp.write_text(jobs_toml([spec(later, labels={"from": "spool"})]))
        tmp.rename(tmp_path / "jobs.d" / "batch.toml")
        await eventually(lambda: states(daemon), lambda s: s.get(later) == "success")
        record = await job(daemon, later)
        assert record.job.labels == {"from": "spool"}
        assert record.job.source == str(tmp_path / "jobs.d" / "batch.toml")
        assert not (tmp_path / "jobs.d" / "batch.toml").exists()
        assert (tmp_path / "jobs.d" / "done" / "batch.toml").exists()
    finally:
        daemon.request_stop()
        assert await runner == 0


async def test_bad_spool_file_does_not_fail_a_reload(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A reload reads the main file only: a bad spool file waiting in jobs_dir is no reason
    to keep the old configuration (it is set aside when the loop reads it)."""
    first = fake.submit()
    config = write_config(tmp_path, {"local": fake.url}, [spec(first)])
    daemon = await make_daemon(config)
    (tmp_path / "jobs.d" / "bad.toml").write_text("[[jobs]]\nserver = 'nowhere'\nprompt_id = 'x'\n")
    config.write_text(config.read_text() + '\n[servers.second]\nurl = "http://127.0.0.1:9"\n')
    assert await daemon.reload(why="test") is True
    assert daemon.settings.servers.keys() == {"local", "second"}
    assert (tmp_path / "jobs.d" / "bad.toml").exists()  # the loop's to read, not the reload's


async def test_a_job_keeps_its_history_once_its_spool_file_is_gone(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    pid = fake.submit()
    await fake.wait_finished(pid)
    config = write_config(tmp_path, {"local": fake.url}, daemon={"keep_registered_files": False})
    (tmp_path / "jobs.d" / "one.toml").write_text(jobs_toml([spec(pid)]))
    daemon = await make_daemon(config)
    await daemon.ingest_spool(budget_s=1)
    assert list((tmp_path / "jobs.d").iterdir()) == []  # deleted, not moved to done/
    await daemon.poller.tick()
    assert await daemon.reload(why="test") is True
    assert (await job(daemon, pid)).job.state == "success"


async def test_until_done_returns_once_everything_is_terminal(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    pids = [fake.submit() for _ in range(5)]
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(p) for p in pids]))
    assert await asyncio.wait_for(daemon.run(until_done=True), 30) == 0
    assert set((await states(daemon)).values()) == {"success"}


async def eventually(
    get: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], timeout_s: float = 20
) -> Any:
    """Re-read a value until it satisfies ``ok`` (a bounded wait on a condition)."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = await get()
            if ok(value):
                return value
            await asyncio.sleep(0.02)


async def test_cached_rerun_is_success_with_the_earlier_files(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """ComfyUI answers an identical graph from its cache: success, the first run's files."""
    first = fake.submit()
    again = fake.submit()
    await fake.wait_finished(again)
    daemon = await make_daemon(
        write_config(tmp_path, {"local": fake.url}, [spec(first), spec(again)])
    )
    await daemon.poller.tick()
    one, two = await job(daemon, first), await job(daemon, again)
    assert (one.job.state, two.job.state) == ("success", "success")
    assert [o.filename for o in two.outputs] == [o.filename for o in one.outputs]
    assert two.job.history is not None
    cached = [m for m in two.job.history["status"]["messages"] if m[0] == "execution_cached"]
    assert cached and cached[0][1]["nodes"]  # every node came from the cache


async def test_websocket_hint_polls_before_the_next_full_tick(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """With an hour between full ticks, a finished prompt is still noticed: ComfyUI's
    status broadcast (queue shrank) makes the daemon poll that server at once."""
    fake.hold_running()
    pid = fake.submit()
    await fake.wait_running(pid)
    config = write_config(
        tmp_path, {"local": fake.url}, [spec(pid)], daemon={"poll_interval_s": 3600}
    )
    daemon = await make_daemon(config)
    runner = asyncio.create_task(daemon.run())
    try:
        await eventually(lambda: states(daemon), lambda s: s[pid] == "running")
        await fake.wait_requests("GET /ws")
        fake.release()
        await eventually(lambda: states(daemon), lambda s: s[pid] == "success")
    finally:
        daemon.request_stop()
        assert await runner == 0


async def test_websocket_can_be_turned_off(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    pid = fake.submit()
    server = {"url": fake.url, "websocket": False}
    daemon = await make_daemon(write_config(tmp_path, {"local": server}, [spec(pid)]))
    assert await asyncio.wait_for(daemon.run(until_done=True), 30) == 0
    assert fake.requests["GET /ws"] == 0


async def test_deleting_the_newest_pending_prompt_is_no_restart(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """The queue's highest number drops when its newest prompt is deleted: that is a
    cancellation, not evidence of a restart."""
    fake.pause()
    older, newest = fake.submit(), fake.submit()
    daemon = await make_daemon(
        write_config(tmp_path, {"local": fake.url}, [spec(older), spec(newest)])
    )
    await daemon.poller.tick()
    fake.delete_from_queue([newest])
    await daemon.poller.tick()
    await daemon.poller.tick()
    j = (await job(daemon, newest)).job
    assert (j.state, j.reason) == ("cancelled", "deleted_from_queue")
    assert (await job(daemon, older)).job.state == "queued"


async def test_a_hung_server_does_not_hold_the_others_back(
    tmp_path: Path, fake: FakeComfyUI, fake2: FakeComfyUI, make_daemon: MakeDaemon
) -> None:
    """A server that never answers (and a long request timeout) keeps its poll running in
    the background; the loop goes on recording the healthy server's jobs meanwhile."""
    fake.pause()
    stuck = fake.submit()
    fake.inject("hang", route="GET /queue")
    sick = {"url": fake.url, "request_timeout_s": 300}
    config = write_config(
        tmp_path,
        {"sick": sick, "well": fake2.url},
        [spec(stuck, "sick")],
        daemon={"poll_interval_s": 0.05},
    )
    daemon = await make_daemon(config)
    runner = asyncio.create_task(daemon.run())
    try:
        await fake.wait_requests("GET /queue")
        later = fake2.submit()
        (tmp_path / "jobs.d" / "late.toml").write_text(jobs_toml([spec(later, "well")]))
        await eventually(lambda: states(daemon), lambda s: s.get(later) == "success")
        assert fake.requests["GET /queue"] == 1  # one poll in flight, not one per tick
        fake.clear_faults()
        fake.resume()
        await eventually(lambda: states(daemon), lambda s: s[stuck] == "success")
    finally:
        daemon.request_stop()
        assert await runner == 0


async def test_a_restart_between_two_polls_is_seen_in_the_queue_numbers(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """No poll failed, but a new prompt numbered below the ones seen before shows that the
    server restarted: the prompts it forgot are lost to the restart, not cancelled."""
    fake.pause()
    pids = [fake.submit() for _ in range(3)]  # numbers 0, 1, 2
    daemon = await make_daemon(write_config(tmp_path, {"local": fake.url}, [spec(p) for p in pids]))
    await daemon.poller.tick()
    assert set((await states(daemon)).values()) == {"queued"}
    await fake.restart()
    fake.submit()  # number 0 again, from someone else
    with capture_logs() as logs:
        for _ in range(2):
            clock.advance(1)
            await daemon.poller.tick()
    [event] = [e for e in logs if e["event"] == "server_restart_detected"]
    assert event["evidence"] == "queue_number_reset" and event["server"] == "local"
    for pid in pids:
        j = (await job(daemon, pid)).job
        assert (j.state, j.reason) == ("lost", "server_restarted")


async def test_reload_hands_new_deadlines_and_hooks_to_the_poller(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """A shorter not_found_after_s ends a never-seen job at the next poll; a hook removed
    by the reload is still owed by a tracked job that names it (and logged as not
    configured)."""
    hook = '[hooks.done]\ntype = "command"\nargv = ["/bin/true"]\n'
    fake.pause()
    never, named = uuid.uuid4().hex, fake.submit()
    jobs = [spec(never), spec(named, hooks=["done"])]
    config = write_config(
        tmp_path, {"local": fake.url}, jobs, daemon={"not_found_after_s": 3600}, extra=hook
    )
    daemon = await make_daemon(config)
    for _ in range(2):
        clock.advance(120)
        await daemon.poller.tick()
    assert (await job(daemon, never)).job.state == "registered"  # within 3600 s

    # The job that names the hook leaves the configuration with it; it is still tracked.
    write_config(tmp_path, {"local": fake.url}, [spec(never)], daemon={"not_found_after_s": 60})
    assert await daemon.reload(why="test") is True
    fake.resume()
    await fake.wait_finished(named)
    with capture_logs() as logs:
        await daemon.poller.tick()
    assert (await job(daemon, never)).job.state == "not_found"
    [record] = await daemon.store.jobs(JobFilter(prompt_id=named), with_deliveries=True)
    assert record.job.state == "success"
    assert [d.hook for d in record.deliveries] == ["done"]
    [event] = [e for e in logs if e["event"] == "hook_not_configured"]
    assert (event["hook"], event["prompt_id"]) == ("done", named)
