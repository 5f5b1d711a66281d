"""Completion hooks: the dispatcher that empties the outbox (``hook_deliveries``).

Deliveries are written by :meth:`Store.record` in the same transaction as the job's
terminal state. :class:`HookDispatcher` sends the due ones, concurrently and independently of
polling, and records each attempt's result only after the attempt: a crash in the middle of
one means it is made again (at least once; a webhook keeps its ``webhook-id`` so receivers
can de-duplicate).

- ``webhook``: POST ``{"type": "job.<state>", "timestamp": ..., "data": <job>}`` signed per
  Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``). A 2xx
  answer is a success; 410 Gone gives up at once; any other answer (redirects included: they
  are not followed), a timeout or a connection error is retried.
- ``command``: ``argv`` run without a shell in a session of its own, the same JSON on stdin,
  the daemon's environment plus ``COMFYWATCH_SERVER``, ``COMFYWATCH_PROMPT_ID``,
  ``COMFYWATCH_STATE`` and ``COMFYWATCH_EVENT_ID`` (minus the variables that hold webhook
  secrets), stdout and stderr captured together (capped). Exit status 0 is a success;
  anything else is retried. On timeout the whole process group is killed.

Failed attempt number *n* is retried after ``retry_schedule_s[n-1]`` (±10% jitter); when the
schedule is used up the delivery is ``dead`` (``comfywatch hooks retry`` revives it). A
delivery whose hook is no longer configured is marked dead at once with the error "hook not
configured" (leaving it pending would keep ``--until-done`` waiting forever); revive it after
adding the hook back.

The event's ``timestamp`` is when the job's end was recorded (the same on every retry); the
``webhook-timestamp`` is the real time of the attempt, whatever clock drives the schedule,
since receivers check it against their own clocks.

Secrets, header values and webhook URLs (which often embed tokens) are never logged or
stored. aiohttp and OS errors are turned into short error texts here and go no further.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from comfywatch.comfy import describe_error
from comfywatch.config import CommandHookSettings, HookSettings, WebhookHookSettings
from comfywatch.errors import StoreError
from comfywatch.metrics import Metrics
from comfywatch.models import HookDelivery, Job
from comfywatch.store import DeliveryState, JobRecord, Store
from comfywatch.views import iso, job_json

log = structlog.get_logger("comfywatch.hooks")

USER_AGENT = "comfywatch"
#: How much of a webhook receiver's answer is kept in ``last_response``.
RESPONSE_EXCERPT_BYTES = 2048
#: Retry delays are multiplied by a random factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1
#: The longest the dispatcher sleeps without looking at the outbox (clock jumps, missed wakes).
MAX_IDLE_S = 60.0
#: Delay before looking at the outbox again after a database error.
STORE_RETRY_S = 1.0
#: After SIGKILL, how long to wait for a command's pipes to close before closing them.
KILL_GRACE_S = 5.0
NOT_CONFIGURED = "hook not configured"
_SERVICE_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_ERROR_MAX_CHARS = 300
_CHUNK = 65_536


# -- pure parts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt gave: success, or a failure that may be retried (``final``: not)."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    response: str | None = None
    final: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to record after an attempt: the delivery's new state and next attempt time."""

    state: str
    next_attempt_s: float | None = None
    retry_in_s: float | None = None

    @property
    def result(self) -> str:
        """The metrics label: delivered, retry or dead."""
        return "retry" if self.state == DeliveryState.PENDING else self.state


def decide(
    result: AttemptResult,
    *,
    attempt: int,
    schedule_s: Sequence[float],
    now_s: float,
    jitter: float = 1.0,
) -> Verdict:
    """The verdict on failed or successful attempt number ``attempt`` (1-based).

    Failed attempt *n* is retried after ``schedule_s[n-1] * jitter``; a final failure, or one
    after the schedule is used up, is dead.
    """
    if result.ok:
        return Verdict(DeliveryState.DELIVERED)
    if result.final or attempt > len(schedule_s):
        return Verdict(DeliveryState.DEAD)
    delay_s = max(0.0, schedule_s[attempt - 1] * jitter)
    return Verdict(DeliveryState.PENDING, next_attempt_s=now_s + delay_s, retry_in_s=delay_s)


def sign(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def event_payload(delivery: HookDelivery, record: JobRecord) -> dict[str, Any]:
    """The event sent for a delivery; ``timestamp`` is when the job's end was recorded, so
    every retry sends the same body."""
    return {
        "type": delivery.event_type,
        "timestamp": iso(delivery.created_at),
        "data": job_json(record),
    }


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact, ASCII-only JSON (any string, even a lone surrogate, encodes)."""
    return json.dumps(payload, separators=(",", ":")).encode("ascii")


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:_ERROR_MAX_CHARS]


def _exit_error(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


class _Capture:
    """The first ``cap`` bytes of a stream; the rest is read and counted, not kept."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_CHUNK):
            self.total += len(chunk)
            room = self.cap - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def text(self) -> str | None:
        if self.total == 0:
            return None
        text = self.kept.decode("utf-8", errors="replace")
        dropped = self.total - len(self.kept)
        if dropped:
            text += f"\n[output truncated: {dropped} more bytes not kept]"
        return text


# -- the dispatcher -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Done:
    """One finished task: whether an attempt was made, and when its row is due again."""

    attempted: bool
    due_again_s: float | None  # None: no longer pending


class HookDispatcher:
    """Sends due deliveries from the outbox, with retries, until stopped."""

    def __init__(
        self,
        *,
        store: Store,
        hooks: Mapping[str, HookSettings],
        concurrency: int,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._hooks: dict[str, HookSettings] = dict(hooks)
        self._concurrency = concurrency
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # -- control ------------------------------------------------------------------------

    def configure(self, *, hooks: Mapping[str, HookSettings]) -> None:
        """Adopt reloaded hook settings (attempts already running keep the old ones)."""
        self._hooks = dict(hooks)
        self._wake.set()

    def wake(self) -> None:
        """New deliveries may be due now: look at the outbox without waiting."""
        self._wake.set()

    async def close(self) -> None:
        """Close the HTTP session (a later attempt opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- loops --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Send due deliveries until ``stop`` is set, then let running attempts finish.

        At most ``concurrency`` attempts run at once; between them the loop sleeps until the
        next delivery is due, :meth:`wake` is called or ``stop`` is set. If run() is
        cancelled, running attempts are cancelled too (their deliveries stay pending).
        A task that fails unexpectedly (a bug) makes run() raise: loudly, not half-broken.
        """
        tasks: dict[int, asyncio.Task[_Done]] = {}
        try:
            while not stop.is_set():
                self._wake.clear()
                delay_s: float
                try:
                    await self._start_due(self._clock(), tasks, skip=())
                    delay_s = await self._idle_delay(tasks)
                except StoreError as exc:
                    log.error("hook_outbox_unreadable", error=str(exc), retry_in_s=STORE_RETRY_S)
                    delay_s = STORE_RETRY_S
                await self._wait(stop, tasks, delay_s)
                self._reap(tasks)
        finally:
            await self._drain(tasks)

    async def run_once(self) -> int:
        """Send every delivery due now (each at most once), wait for them; returns how many
        attempts were made. Raises :class:`StoreError` if the outbox cannot be read."""
        now_s = self._clock()
        tasks: dict[int, asyncio.Task[_Done]] = {}
        handled: set[int] = set()
        attempts = 0
        try:
            while True:
                await self._start_due(now_s, tasks, skip=handled)
                handled.update(tasks)
                if not tasks:
                    return attempts
                await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                for delivery_id, done in self._reap(tasks):
                    attempts += done.attempted
                    if done.due_again_s is None or done.due_again_s > now_s:
                        handled.discard(delivery_id)  # not due again: the query skips it
        finally:
            await self._drain(tasks)

    async def _start_due(
        self, now_s: float, tasks: dict[int, asyncio.Task[_Done]], *, skip: Iterable[int]
    ) -> None:
        """Start attempts for due deliveries, up to the free slots, skipping those running
        (and ``skip``: rows already handled in this pass that are due again)."""
        free = self._concurrency - len(tasks)
        if free <= 0:
            return
        skipped = set(skip) | set(tasks)
        rows = await self._store.due_deliveries(now_s, free + len(skipped))
        for delivery, job in [r for r in rows if r[0].id not in skipped][:free]:
            tasks[delivery.id] = asyncio.create_task(
                self._deliver(delivery, job), name=f"hook-delivery-{delivery.id}"
            )

    async def _idle_delay(self, tasks: Mapping[int, asyncio.Task[_Done]]) -> float:
        """How long to sleep when nothing wakes us: until the next delivery not running is
        due (every slot busy: until one frees, which wakes us anyway)."""
        if len(tasks) >= self._concurrency:
            return MAX_IDLE_S
        next_at = await self._store.next_delivery_at_excluding(list(tasks))
        if next_at is None:
            return MAX_IDLE_S
        return min(MAX_IDLE_S, max(0.0, next_at.timestamp() - self._clock()))

    async def _wait(
        self, stop: asyncio.Event, tasks: Mapping[int, asyncio.Task[_Done]], delay_s: float
    ) -> None:
        """Sleep up to ``delay_s``; a wake, a stop or a finished attempt ends it early."""
        if stop.is_set() or self._wake.is_set():
            return
        waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(
                [*waiters, *tasks.values()], timeout=delay_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    @staticmethod
    def _reap(tasks: dict[int, asyncio.Task[_Done]]) -> list[tuple[int, _Done]]:
        """Remove finished tasks; an unexpected exception in one is raised here."""
        finished = [(i, t) for i, t in tasks.items() if t.done()]
        for delivery_id, _ in finished:
            del tasks[delivery_id]
        return [(i, t.result()) for i, t in finished]

    @staticmethod
    async def _drain(tasks: dict[int, asyncio.Task[_Done]]) -> None:
        """Let running attempts finish (each is bounded by its timeout); if we are cancelled
        meanwhile, cancel them and wait for their clean-up. No task outlives this."""
        pending = list(tasks.values())
        if not pending:
            return
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            raise
        HookDispatcher._reap(tasks)

    # -- one attempt --------------------------------------------------------------------

    async def _deliver(self, delivery: HookDelivery, job: Job) -> _Done:
        """Make one attempt for ``delivery`` and record its result."""
        attempt = delivery.attempts + 1
        hook = self._hooks.get(delivery.hook)
        started = time.monotonic()
        schedule_s: Sequence[float] = ()
        try:
            record = await self._store.job_record(job.id) if hook is not None else None
        except StoreError as exc:
            log.error(
                "hook_job_unreadable", hook=delivery.hook, delivery_id=delivery.id, error=str(exc)
            )
            await asyncio.sleep(STORE_RETRY_S)  # the row is still due: do not spin on it
            return _Done(attempted=False, due_again_s=float("-inf"))
        if hook is None:
            result = AttemptResult(ok=False, error=NOT_CONFIGURED, final=True)
        elif record is None:  # pragma: no cover - pruning keeps jobs with pending deliveries
            result = AttemptResult(ok=False, error="job not found", final=True)
        else:
            schedule_s = hook.retry_schedule_s
            body = encode_payload(event_payload(delivery, record))
            if isinstance(hook, WebhookHookSettings):
                result = await self._post(hook, delivery, body)
            else:
                result = await self._command(hook, delivery, job, body)
        now_s = self._clock()
        verdict = decide(
            result,
            attempt=attempt,
            schedule_s=schedule_s,
            now_s=now_s,
            jitter=random.uniform(1 - JITTER, 1 + JITTER),  # noqa: S311 - jitter, not crypto
        )
        fields: dict[str, Any] = {
            "hook": delivery.hook,
            "server": job.server,
            "prompt_id": job.prompt_id,
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "attempt": attempt,
            "status": result.status_code,
            "error": result.error,
        }
        try:
            await self._store.finish_attempt(
                delivery.id,
                state=verdict.state,
                now_s=now_s,
                next_attempt_s=verdict.next_attempt_s,
                status_code=result.status_code,
                error=result.error,
                response=result.response,
            )
        except StoreError as exc:
            # The attempt was made but not recorded: it will be made again (at least once),
            # after a pause so that a database refusing writes does not make us hammer hooks.
            log.error("hook_result_not_recorded", **fields, outcome=verdict.result, detail=str(exc))
            await asyncio.sleep(STORE_RETRY_S)
            return _Done(attempted=True, due_again_s=float("-inf"))
        if self._metrics is not None:
            self._metrics.delivery(delivery.hook, verdict.result)
        if verdict.state == DeliveryState.DELIVERED:
            log.info("hook_delivered", **fields, duration_s=round(time.monotonic() - started, 3))
            return _Done(attempted=True, due_again_s=None)
        if verdict.state == DeliveryState.DEAD:
            log.error("hook_dead", **fields)
            return _Done(attempted=True, due_again_s=None)
        log.warning("hook_retry_scheduled", **fields, retry_in_s=round(verdict.retry_in_s or 0, 3))
        return _Done(attempted=True, due_again_s=verdict.next_attempt_s)

    # -- webhooks -----------------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def _post(
        self, hook: WebhookHookSettings, delivery: HookDelivery, body: bytes
    ) -> AttemptResult:
        # The signing time is the real wall clock whatever the injected clock says: receivers
        # compare it with their own clocks (Standard Webhooks allows 5 minutes of skew).
        timestamp_s = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        for name, value in hook.headers.items():
            _set_header(headers, name, value)
        _set_header(headers, "webhook-id", delivery.event_id)
        _set_header(headers, "webhook-timestamp", str(timestamp_s))
        signature = sign(hook.secret, delivery.event_id, timestamp_s, body) if hook.secret else None
        _set_header(headers, "webhook-signature", signature)
        session = self._ensure_session()
        try:
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
                allow_redirects=False,
            ) as response:
                status = response.status
                excerpt = await _read_excerpt(response)
        except TimeoutError:
            return AttemptResult(ok=False, error=f"timed out after {hook.timeout_s:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return AttemptResult(ok=False, error=describe_error(exc))
        if 200 <= status < 300:
            return AttemptResult(ok=True, status_code=status, response=excerpt)
        return AttemptResult(
            ok=False,
            status_code=status,
            error=f"HTTP {status}" + (" (gone: not retried)" if status == 410 else ""),
            response=excerpt,
            final=status == 410,
        )

    # -- commands -----------------------------------------------------------------------

    def _command_env(
        self, hook: CommandHookSettings, delivery: HookDelivery, job: Job
    ) -> dict[str, str]:
        env = dict(os.environ)
        # Webhook secrets read from the environment are not the command's business.
        for other in self._hooks.values():
            if isinstance(other, WebhookHookSettings) and other.secret_env:
                env.pop(other.secret_env, None)
        # systemd's channel is the daemon's own: a command must not speak for it.
        for name in _SERVICE_MANAGER_VARIABLES:
            env.pop(name, None)
        env.update(
            COMFYWATCH_SERVER=job.server,
            COMFYWATCH_PROMPT_ID=job.prompt_id,
            COMFYWATCH_STATE=job.state,
            COMFYWATCH_EVENT_ID=delivery.event_id,
        )
        return env

    async def _command(
        self, hook: CommandHookSettings, delivery: HookDelivery, job: Job, body: bytes
    ) -> AttemptResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *hook.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._command_env(hook, delivery, job),
                start_new_session=True,
            )
        except OSError as exc:
            return AttemptResult(ok=False, error=f"cannot start: {describe_error(exc)}")
        except ValueError:  # e.g. a NUL byte in an argument or a variable
            return AttemptResult(ok=False, error="cannot start: invalid argument or environment")
        return await _supervise(proc, hook, body + b"\n")


def _set_header(headers: dict[str, str], name: str, value: str | None) -> None:
    """Set (or, with ``None``, remove) a header, whatever the case of its name."""
    for existing in [n for n in headers if n.lower() == name.lower()]:
        del headers[existing]
    if value is not None:
        headers[name] = value


async def _read_excerpt(response: aiohttp.ClientResponse) -> str | None:
    """The first bytes of a response body; a body that breaks off keeps what arrived."""
    kept = bytearray()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        while len(kept) < RESPONSE_EXCERPT_BYTES:
            chunk = await response.content.read(RESPONSE_EXCERPT_BYTES - len(kept))
            if not chunk:
                break
            kept += chunk
    return kept.decode("utf-8", errors="replace") if kept else None


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write ``data`` to a command's stdin and close it; a command need not read it."""
    if stdin is None:  # pragma: no cover - always a pipe here
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()


async def _supervise(
    proc: asyncio.subprocess.Process, hook: CommandHookSettings, stdin_data: bytes
) -> AttemptResult:
    """Feed, read and wait for a command within its timeout.

    The exit status decides. A command still running at the deadline has timed out; its
    process group is killed. So is a group whose leader exited in time while a process it
    left behind keeps the output pipe open (the exit status still decides then).
    """
    capture = _Capture(hook.max_output_bytes)
    assert proc.stdout is not None
    helpers = [
        asyncio.create_task(capture.drain(proc.stdout)),
        asyncio.create_task(_feed(proc.stdin, stdin_data)),
    ]
    finished = False
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(hook.timeout_s):
                # wait() returns once the process has exited and its pipes are closed.
                await proc.wait()
                await asyncio.gather(*helpers)
                finished = True
        returncode = proc.returncode  # None: still running at the deadline
    finally:
        if not finished:
            if proc.returncode is None or not all(h.done() for h in helpers):
                _kill_group(proc)
            await _reap(proc)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    output = capture.text()
    if returncode is None:
        return AttemptResult(
            ok=False,
            error=f"timed out after {hook.timeout_s:g}s (process group killed)",
            response=output,
        )
    error = _exit_error(returncode)
    return AttemptResult(ok=error is None, error=error, response=output)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a command's process group.

    pgid == pid (start_new_session), and that id cannot have been reused: either the leader
    is not reaped yet, or its group still has a member holding our pipe open.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a killed command to exit and its pipes to close; a pipe still held open
    after ``KILL_GRACE_S`` (by a process that left the group) is closed on our side."""
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except TimeoutError:
        transport = getattr(proc, "_transport", None)  # Process has no public close()
        if transport is not None:
            transport.close()
