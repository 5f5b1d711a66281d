"""Hook delivery: real SQLite, real aiohttp receivers on 127.0.0.1, real child processes.

The dispatcher's due times come from a clock the tests move by hand, so retry schedules are
tested without sleeping; the loop tests (``run``) use the real clock and tiny schedules and
wait on events, never on time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from comfywatch.clock import SYSTEM_CLOCK
from comfywatch.config import CommandHookSettings, HookSettings, WebhookHookSettings
from comfywatch.hooks import (
    NOT_CONFIGURED,
    RESPONSE_EXCERPT_BYTES,
    AttemptResult,
    HookDispatcher,
    next_attempt,
    sign,
)
from comfywatch.metrics import Metrics
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, DeliveryRow, DeliveryState, NewJob, Store

from .conftest import Clock
from .receiver import WAIT_S

SECRET_KEY = b"comfywatch-test-key-0123456789ab"
WHSEC = "whsec_" + base64.b64encode(SECRET_KEY).decode()


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
async def dispatchers(store: Store, clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    made: list[HookDispatcher] = []

    def make(
        hooks: Mapping[str, HookSettings],
        *,
        concurrency: int = 4,
        metrics: Metrics | None = None,
        real_clock: bool = False,
    ) -> HookDispatcher:
        dispatcher = HookDispatcher(
            store=store,
            hooks=hooks,
            concurrency=concurrency,
            metrics=metrics,
            clock=SYSTEM_CLOCK if real_clock else clock,
        )
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.close()


def webhook(
    url: str,
    *,
    secret: bytes | None = SECRET_KEY,
    timeout_s: float = 5.0,
    schedule: tuple[float, ...] = (10.0, 20.0),
    headers: Mapping[str, str] | None = None,
) -> dict[str, HookSettings]:
    return {
        "notify": WebhookHookSettings(
            name="notify",
            type="webhook",
            url=url,
            secret=secret,
            on=frozenset({JobState.SUCCESS}),
            timeout_s=timeout_s,
            headers=dict(headers or {}),
            retry_schedule_s=schedule,
        )
    }


def command(
    argv: Sequence[str],
    *,
    timeout_s: float = 10.0,
    schedule: tuple[float, ...] = (10.0,),
    max_output_bytes: int = 4096,
) -> dict[str, HookSettings]:
    return {
        "notify": CommandHookSettings(
            name="notify",
            type="command",
            argv=tuple(argv),
            on=frozenset({JobState.SUCCESS}),
            timeout_s=timeout_s,
            retry_schedule_s=schedule,
            max_output_bytes=max_output_bytes,
        )
    }


def script(tmp_path: Path, name: str, source: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return [sys.executable, "-I", "-S", str(path)]


async def finished_job(
    store: Store,
    clock: Callable[[], float],
    *,
    prompt_id: str = "prompt-1",
    labels: Mapping[str, str] | None = None,
) -> int:
    """Register a job and record it as a success owing the ``notify`` hook."""
    await store.register(
        [NewJob("local", prompt_id, dict(labels or {"team": "a"}), ("notify",), "test")], clock()
    )
    job = next(j for j in await store.active_jobs() if j.prompt_id == prompt_id)
    change = Change(job.id, JobState.SUCCESS, reason=Reason.FINISHED, deliveries=["notify"])
    assert await store.record([change], clock()) == [job.id]
    return job.id


async def only_delivery(store: Store) -> DeliveryRow:
    rows = await store.deliveries()
    assert len(rows) == 1
    return rows[0][0]


def attempts_counted(metrics: Metrics, result: str) -> float:
    """What ``Metrics.delivery("notify", result)`` has counted."""
    for family in metrics.deliveries.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "hook": "notify",
                "result": result,
            }:
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_process_gone(pid: int) -> None:
    """Wait for ``pid`` to exit (a zombie counts as gone), via a pidfd: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(WAIT_S):
            await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# -- the pure decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "attempt", "state", "next_at"),
    [
        (AttemptResult(ok=True, status_code=200), 1, DeliveryState.DELIVERED, None),
        (AttemptResult(ok=True), 3, DeliveryState.DELIVERED, None),  # even past the schedule
        (AttemptResult(ok=False, status_code=500), 1, DeliveryState.PENDING, 1010.0),
        (AttemptResult(ok=False, error="timed out"), 2, DeliveryState.PENDING, 1020.0),
        (AttemptResult(ok=False, status_code=500), 3, DeliveryState.DEAD, None),
        (AttemptResult(ok=False, status_code=410, final=True), 1, DeliveryState.DEAD, None),
    ],
)
def test_next_attempt(
    result: AttemptResult, attempt: int, state: DeliveryState, next_at: float | None
) -> None:
    """Attempt n failing waits schedule[n-1]; past the schedule, or on a final error, dead."""
    verdict = next_attempt(result, attempt=attempt, schedule_s=(10.0, 20.0), now_s=1000.0)
    assert verdict.state is state
    assert verdict.next_attempt_s == next_at


def test_next_attempt_applies_jitter() -> None:
    """The jitter factor scales the scheduled delay."""
    verdict = next_attempt(
        AttemptResult(ok=False), attempt=1, schedule_s=(100.0,), now_s=0.0, jitter=1.1
    )
    assert verdict.next_attempt_s == pytest.approx(110.0)


def test_sign_matches_standard_webhooks() -> None:
    """Our signature is the one the reference library computes."""
    from datetime import UTC, datetime

    body = b'{"a":1}'
    expected = Webhook(WHSEC).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), '{"a":1}')
    assert sign(SECRET_KEY, "msg_1", 1_700_000_000, body) == expected


# -- webhooks ------------------------------------------------------------------------------


async def test_webhook_is_signed_per_standard_webhooks(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """The POST verifies with the standardwebhooks library, and fails with another secret."""
    receiver = await receivers([200])
    await finished_job(store, clock)
    metrics = Metrics()
    dispatcher = dispatchers(
        webhook(receiver.url, headers={"Authorization": "Bearer header-secret"}), metrics=metrics
    )
    with structlog.testing.capture_logs() as logs:
        assert await dispatcher.run_once() == 1

    delivery = await only_delivery(store)
    assert delivery.state == DeliveryState.DELIVERED
    assert delivery.attempts == 1
    assert delivery.last_status_code == 200
    assert delivery.delivered_at is not None
    assert delivery.next_attempt_at is None

    [(headers, body)] = receiver.requests
    assert headers["webhook-id"] == delivery.event_id
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "comfywatch"
    assert headers["Authorization"] == "Bearer header-secret"
    payload = Webhook(WHSEC).verify(body, headers)
    assert payload["type"] == "job.success"
    assert payload["timestamp"].endswith("Z")
    assert payload["data"]["prompt_id"] == "prompt-1"
    assert payload["data"]["state"] == "success"
    assert payload["data"]["labels"] == {"team": "a"}
    other = "whsec_" + base64.b64encode(b"another-key-0123456789abcdefghij").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)

    assert [e["event"] for e in logs] == ["hook_delivered"]
    assert logs[0]["prompt_id"] == "prompt-1"
    logged = json.dumps(logs, default=str)
    for secret in ("header-secret", "url-secret", WHSEC, base64.b64encode(SECRET_KEY).decode()):
        assert secret not in logged
    assert attempts_counted(metrics, "delivered") == 1


async def test_unsigned_webhook_has_no_signature(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """Without a secret the id and timestamp are sent, the signature is not."""
    receiver = await receivers()
    await finished_job(store, clock)
    assert await dispatchers(webhook(receiver.url, secret=None)).run_once() == 1
    [(headers, _)] = receiver.requests
    assert "webhook-id" in headers and "webhook-timestamp" in headers
    assert "webhook-signature" not in headers


async def test_retries_on_schedule_with_one_webhook_id(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """Fails twice, then succeeds: three requests, one webhook-id, one body, attempts 3."""
    receiver = await receivers([500, 503, 200])
    await finished_job(store, clock)
    metrics = Metrics()
    dispatcher = dispatchers(webhook(receiver.url, schedule=(10.0, 20.0)), metrics=metrics)

    assert await dispatcher.run_once() == 1
    first = await only_delivery(store)
    assert (first.state, first.attempts, first.last_status_code) == ("pending", 1, 500)
    assert first.last_error == "HTTP 500"
    assert first.next_attempt_at is not None
    assert clock() + 9 <= first.next_attempt_at.timestamp() <= clock() + 11

    clock.advance(8.9)  # before the earliest jittered time: nothing is due
    assert await dispatcher.run_once() == 0
    clock.advance(2.2)
    assert await dispatcher.run_once() == 1
    second = await only_delivery(store)
    assert (second.state, second.attempts, second.last_status_code) == ("pending", 2, 503)
    assert second.next_attempt_at is not None
    assert clock() + 18 <= second.next_attempt_at.timestamp() <= clock() + 22

    clock.advance(22.1)
    assert await dispatcher.run_once() == 1
    done = await only_delivery(store)
    assert (done.state, done.attempts, done.last_status_code) == ("delivered", 3, 200)
    assert len(receiver.requests) == 3
    assert {h["webhook-id"] for h, _ in receiver.requests} == {done.event_id}
    assert len({b for _, b in receiver.requests}) == 1
    assert attempts_counted(metrics, "retry") == 2
    assert attempts_counted(metrics, "delivered") == 1


async def test_wall_clock_set_back_does_not_delay_a_retry(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """The wall clock is set back an hour after a failed attempt: the retry is still sent
    once its delay has passed on the monotonic clock. Another dispatcher (a restart) only
    has the stored wall time, an hour ahead now."""
    receiver = await receivers([500, 200])
    await finished_job(store, clock)
    dispatcher = dispatchers(webhook(receiver.url, schedule=(10.0,)))
    assert await dispatcher.run_once() == 1
    first = await only_delivery(store)
    assert (first.state, first.attempts) == ("pending", 1)

    clock.step_wall(-3600)
    clock.advance(11.1)  # past the latest jittered delay, on both clocks
    assert await dispatchers(webhook(receiver.url, schedule=(10.0,))).run_once() == 0
    assert await dispatcher.run_once() == 1
    done = await only_delivery(store)
    assert (done.state, done.attempts, done.last_status_code) == ("delivered", 2, 200)
    assert len(receiver.requests) == 2


async def test_receiver_down_goes_dead_then_revived(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """Connection refused is retried on schedule, then dead; revived, it is delivered."""
    await finished_job(store, clock)
    dispatcher = dispatchers(webhook(f"http://127.0.0.1:{free_port()}/hook", schedule=(1.0, 2.0)))
    with structlog.testing.capture_logs() as logs:
        assert await dispatcher.run_once() == 1
        clock.advance(1.2)
        assert await dispatcher.run_once() == 1
        clock.advance(2.3)
        assert await dispatcher.run_once() == 1
    dead = await only_delivery(store)
    assert (dead.state, dead.attempts, dead.last_status_code) == ("dead", 3, None)
    assert dead.last_error is not None and dead.last_error.startswith("cannot connect")
    assert dead.next_attempt_at is None
    assert [e["event"] for e in logs] == [
        "hook_retry_scheduled",
        "hook_retry_scheduled",
        "hook_dead",
    ]
    clock.advance(100)
    assert await dispatcher.run_once() == 0  # dead stays dead

    receiver = await receivers([200])
    dispatcher.configure(hooks=webhook(receiver.url))
    assert await store.revive_deliveries([dead.id], all_dead=False, now_s=clock()) == 1
    assert await dispatcher.run_once() == 1
    revived = await only_delivery(store)
    assert (revived.state, revived.attempts) == ("delivered", 1)
    [(headers, _)] = receiver.requests
    assert headers["webhook-id"] == dead.event_id


async def test_hanging_receiver_times_out(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """A receiver that never answers costs timeout_s, then a retry is scheduled."""
    receiver = await receivers(hang=True)
    await finished_job(store, clock)
    assert await dispatchers(webhook(receiver.url, timeout_s=0.2)).run_once() == 1
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("pending", 1, None)
    assert delivery.last_error == "timed out after 0.2s"
    assert delivery.next_attempt_at is not None


async def test_gone_is_dead_at_once_and_body_is_capped(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """410 Gone is not retried; the stored response is a capped excerpt."""
    receiver = await receivers([410], body=b"g" * 10_000)
    await finished_job(store, clock)
    assert await dispatchers(webhook(receiver.url, schedule=(1.0, 2.0, 3.0))).run_once() == 1
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("dead", 1, 410)
    assert delivery.last_response == "g" * RESPONSE_EXCERPT_BYTES


async def test_unconfigured_hook_is_dead(store: Store, clock: Clock, dispatchers: Any) -> None:
    """A delivery whose hook left the config is marked dead, not left pending forever."""
    await finished_job(store, clock)
    assert await dispatchers({}).run_once() == 1
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.last_error) == ("dead", NOT_CONFIGURED)


class Gate:
    """A TCP server that holds each connection until the test lets one through."""

    def __init__(self) -> None:
        self.permits = asyncio.Semaphore(0)
        self.active = 0
        self.max_active = 0
        self.finished = 0
        self.port = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for _ in range(100):
            self.permits.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._changed:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self._changed.notify_all()
        await self.permits.acquire()
        writer.write(b"x")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with self._changed:
            self.active -= 1
            self.finished += 1
            self._changed.notify_all()

    async def wait_active(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: self.active >= count)

    async def wait_finished(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: self.finished >= count)


async def test_concurrency_is_bounded(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """Never more than ``concurrency`` attempts at once; all are made."""
    gate = Gate()
    await gate.start()
    try:
        for n in range(5):
            await finished_job(store, clock, prompt_id=f"p{n}")
        argv = script(
            tmp_path,
            "gate.py",
            """
            import socket, sys
            with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as conn:
                conn.recv(1)
            """,
        )
        dispatcher = dispatchers(command([*argv, str(gate.port)]), concurrency=2)
        task = asyncio.create_task(dispatcher.run_once())
        for step in range(5):  # hold the running ones, let one through at a time
            await gate.wait_active(min(2, 5 - step))
            running = [t for t in asyncio.all_tasks() if t.get_name().startswith("hook-delivery")]
            assert len(running) <= 2
            gate.permits.release()
            await gate.wait_finished(step + 1)
        assert await task == 5
    finally:
        await gate.stop()
    assert gate.max_active == 2
    rows = await store.deliveries()
    assert {d.state for d, _ in rows} == {"delivered"}


# -- the loop ----------------------------------------------------------------------------


async def test_run_wakes_retries_and_stops(store: Store, receivers: Any, dispatchers: Any) -> None:
    """run() sleeps until woken, retries when due (real clock, tiny schedule), then stops."""
    receiver = await receivers([500, 200])
    dispatcher = dispatchers(webhook(receiver.url, schedule=(0.05,)), real_clock=True)
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await finished_job(store, time.time)  # created while run() idles
    dispatcher.wake()
    await receiver.wait_until(lambda: len(receiver.requests) == 2)
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await runner
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts) == ("delivered", 2)


async def test_run_retries_on_the_monotonic_clock(
    store: Store, clock: Clock, receivers: Any, dispatchers: Any
) -> None:
    """run() with the wall clock set back an hour after a failure (and standing still
    since): the retry goes out once its delay has passed on the monotonic clock."""
    receiver = await receivers([500, 200])
    await finished_job(store, clock)
    dispatcher = dispatchers(webhook(receiver.url, schedule=(0.2,)))
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await receiver.wait_until(lambda: len(receiver.requests) == 1)
    clock.step_wall(-3600)  # as the failure is answered or just after: the same
    await receiver.wait_until(lambda: len(receiver.requests) == 2)
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await runner
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts) == ("delivered", 2)


async def test_stop_lets_the_attempt_in_flight_finish(
    store: Store, receivers: Any, dispatchers: Any
) -> None:
    """On stop, run() waits for the running attempt (bounded by its timeout): no orphans."""
    receiver = await receivers(hang=True)
    await finished_job(store, time.time)
    dispatcher = dispatchers(webhook(receiver.url, timeout_s=0.2), real_clock=True)
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stop))
    await receiver.wait_until(lambda: len(receiver.requests) == 1)
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await runner
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts) == ("pending", 1)
    assert delivery.last_error == "timed out after 0.2s"
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("hook-delivery")]


# -- commands ----------------------------------------------------------------------------

RECORDER = """
    import json, os, sys
    data = sys.stdin.read()
    env = {k: v for k, v in os.environ.items() if k.startswith("COMFYWATCH_")}
    with open(sys.argv[1], "w") as out:
        json.dump({"stdin": data, "env": env}, out)
    print("recorded")
"""


async def test_command_gets_json_on_stdin_and_env(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """The job JSON arrives on stdin, the COMFYWATCH_* variables in the environment."""
    await finished_job(store, clock)
    seen = tmp_path / "seen.json"
    argv = [*script(tmp_path, "record.py", RECORDER), str(seen)]
    assert await dispatchers(command(argv)).run_once() == 1
    delivery = await only_delivery(store)
    assert (delivery.state, delivery.attempts) == ("delivered", 1)
    assert delivery.last_response == "recorded\n"
    got = json.loads(seen.read_text())
    payload = json.loads(got["stdin"])
    assert payload["type"] == "job.success"
    assert payload["data"]["prompt_id"] == "prompt-1"
    # What the hook was given (not what it inherits, e.g. COMFYWATCH_TEST_PG under CI).
    given = {k: v for k, v in got["env"].items() if os.environ.get(k) != v}
    assert given == {
        "COMFYWATCH_SERVER": "local",
        "COMFYWATCH_PROMPT_ID": "prompt-1",
        "COMFYWATCH_STATE": "success",
        "COMFYWATCH_EVENT_ID": delivery.event_id,
    }


async def test_shell_metacharacters_reach_the_command_unchanged(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """No shell anywhere: hostile text is data in env and stdin, and nothing runs."""
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); echo ~ `touch {marker}`;|& > {marker}"
    await finished_job(store, clock, prompt_id=hostile, labels={"note": hostile})
    seen = tmp_path / "seen.json"
    argv = [*script(tmp_path, "record.py", RECORDER), str(seen)]
    assert await dispatchers(command(argv)).run_once() == 1
    got = json.loads(seen.read_text())
    assert got["env"]["COMFYWATCH_PROMPT_ID"] == hostile
    data = json.loads(got["stdin"])["data"]
    assert data["prompt_id"] == hostile
    assert data["labels"] == {"note": hostile}
    assert not marker.exists()


async def test_command_failure_is_retried(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """A non-zero exit is retried on schedule; stderr is kept with stdout."""
    await finished_job(store, clock)
    argv = script(tmp_path, "fail.py", "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)\n")
    dispatcher = dispatchers(command(argv, schedule=(5.0,)))
    assert await dispatcher.run_once() == 1
    first = await only_delivery(store)
    assert (first.state, first.attempts, first.last_error) == ("pending", 1, "exit status 3")
    assert first.last_response == "boom\n"
    clock.advance(5.6)
    assert await dispatcher.run_once() == 1
    last = await only_delivery(store)
    assert (last.state, last.attempts) == ("dead", 2)


async def test_missing_executable_is_a_failed_attempt(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """A command that cannot start is an attempt that failed, not a crash."""
    await finished_job(store, clock)
    assert await dispatchers(command([str(tmp_path / "missing")])).run_once() == 1
    delivery = await only_delivery(store)
    assert delivery.state == "pending"
    assert delivery.last_error == "cannot start: No such file or directory"


async def test_command_timeout_kills_the_process_group(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """On timeout the whole group dies, the grandchild included."""
    await finished_job(store, clock)
    pid_file = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        "hang.py",
        f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        with open({str(pid_file) + ".tmp"!r}, "w") as out:
            out.write(str(child.pid))
        os.replace({str(pid_file) + ".tmp"!r}, {str(pid_file)!r})
        print("started", flush=True)
        time.sleep(60)
        """,
    )
    assert await dispatchers(command(argv, timeout_s=1.0)).run_once() == 1
    delivery = await only_delivery(store)
    assert delivery.state == "pending"
    assert delivery.last_error == "timed out after 1s (process group killed)"
    assert delivery.last_response == "started\n"
    await wait_process_gone(int(pid_file.read_text()))


async def test_command_output_is_capped(
    store: Store, clock: Clock, dispatchers: Any, tmp_path: Path
) -> None:
    """Output beyond max_output_bytes is read (the command never blocks) but not kept."""
    await finished_job(store, clock)
    argv = script(tmp_path, "loud.py", "import sys\nsys.stdout.write('y' * 200_000)\n")
    assert await dispatchers(command(argv, max_output_bytes=1000)).run_once() == 1
    delivery = await only_delivery(store)
    assert delivery.state == "delivered"
    assert delivery.last_response is not None
    kept, _, note = delivery.last_response.partition("\n")
    assert kept == "y" * 1000
    assert note == "[output truncated: 199000 more bytes not kept]"
