"""The dispatcher that empties the outbox (``hook_deliveries``), concurrently and
independently of polling: it starts due attempts, carries out the retry policy's verdict on
each, and sleeps until the next delivery is due, a wake-up or a stop.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from comfywatch.config import HookSettings, WebhookHookSettings
from comfywatch.errors import StoreError
from comfywatch.hooks.command import command_env, run_command
from comfywatch.hooks.payload import encode_payload, event_payload
from comfywatch.hooks.policy import JITTER, AttemptResult, Verdict, next_attempt
from comfywatch.hooks.webhook import WebhookSender
from comfywatch.metrics import Metrics
from comfywatch.states import DeliveryState
from comfywatch.store import DeliveryRow, JobRow, Store

log = structlog.get_logger("comfywatch.hooks")

#: The longest the dispatcher sleeps without looking at the outbox (clock jumps, missed wakes).
MAX_IDLE_S = 60.0
#: Delay before looking at the outbox again after a database error.
STORE_RETRY_S = 1.0
NOT_CONFIGURED = "hook not configured"


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
        self._webhooks = WebhookSender(limit=concurrency)

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
        await self._webhooks.close()

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
        for delivery, job in [r for r in rows if r.delivery.id not in skipped][:free]:
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

    async def _deliver(self, delivery: DeliveryRow, job: JobRow) -> _Done:
        """Make one attempt for ``delivery`` and record its result."""
        started = time.monotonic()
        try:
            result, schedule_s = await self._attempt(delivery, job)
        except StoreError as exc:
            log.error(
                "hook_job_unreadable", hook=delivery.hook, delivery_id=delivery.id, error=str(exc)
            )
            await asyncio.sleep(STORE_RETRY_S)  # the row is still due: do not spin on it
            return _Done(attempted=False, due_again_s=float("-inf"))
        now_s = self._clock()
        verdict = next_attempt(
            result,
            attempt=delivery.attempts + 1,
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
            "attempt": delivery.attempts + 1,
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
        return self._recorded(delivery, verdict, fields, duration_s=time.monotonic() - started)

    async def _attempt(
        self, delivery: DeliveryRow, job: JobRow
    ) -> tuple[AttemptResult, Sequence[float]]:
        """Send ``delivery`` once: its result and its hook's retry schedule. Raises
        :class:`StoreError` if the job cannot be read (no attempt was made)."""
        hook = self._hooks.get(delivery.hook)
        if hook is None:
            return AttemptResult(ok=False, error=NOT_CONFIGURED, final=True), ()
        record = await self._store.job_record(job.id)
        if record is None:  # pragma: no cover - pruning keeps jobs with pending deliveries
            return AttemptResult(ok=False, error="job not found", final=True), ()
        body = encode_payload(event_payload(delivery, record))
        if isinstance(hook, WebhookHookSettings):
            result = await self._webhooks.post(hook, delivery.event_id, body)
        else:
            hidden = [
                other.secret_env
                for other in self._hooks.values()
                if isinstance(other, WebhookHookSettings) and other.secret_env
            ]
            env = command_env(os.environ, delivery, job, hidden=hidden)
            result = await run_command(hook, env=env, body=body)
        return result, hook.retry_schedule_s

    def _recorded(
        self, delivery: DeliveryRow, verdict: Verdict, fields: dict[str, Any], duration_s: float
    ) -> _Done:
        """Count and log an attempt whose result is recorded."""
        if self._metrics is not None:
            self._metrics.delivery(delivery.hook, verdict.result)
        if verdict.state is DeliveryState.DELIVERED:
            log.info("hook_delivered", **fields, duration_s=round(duration_s, 3))
            return _Done(attempted=True, due_again_s=None)
        if verdict.state is DeliveryState.DEAD:
            log.error("hook_dead", **fields)
            return _Done(attempted=True, due_again_s=None)
        log.warning("hook_retry_scheduled", **fields, retry_in_s=round(verdict.retry_in_s or 0, 3))
        return _Done(attempted=True, due_again_s=verdict.next_attempt_s)
