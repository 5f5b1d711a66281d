"""The dispatcher that empties the outbox (``hook_deliveries``), concurrently and
independently of polling.

It claims due deliveries in batches (one query for up to ``claim_size``, with all their
events need), runs their attempts in one lane per hook (at most ``concurrency`` at once per
hook: a slow receiver holds only its own slots), records the outcomes in batches (see
:mod:`comfywatch.hooks.recorder`), then sleeps until a delivery is due, a wake-up or a stop.
While running, it also looks at the outbox at least every ``look_every_s`` (the poll
interval), a cheap indexed read: deliveries queued by another process (``comfywatch hooks
retry``) go out within that time.

A delivery is held in memory from its claim until its outcome is recorded, and left out of
later claims meanwhile: never attempted twice at once, nor again because its result waits
for the database. Logs and metrics of an attempt follow the commit of its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from comfywatch.config import HookSettings
from comfywatch.errors import StoreError
from comfywatch.hooks.attempt import Attempts, Outcome
from comfywatch.hooks.lanes import Lanes
from comfywatch.hooks.recorder import STORE_RETRY_S, Recorder
from comfywatch.metrics import Metrics
from comfywatch.states import DeliveryState
from comfywatch.store import DueBatch, DueDelivery, Store

log = structlog.get_logger("comfywatch.hooks")

#: The longest the dispatcher sleeps without looking at the outbox (clock jumps, missed
#: wakes, deliveries queued by another process).
MAX_IDLE_S = 60.0
#: Due deliveries asked for in one query.
CLAIM_SIZE = 256
#: Outcomes are recorded once this many wait, or once the oldest has waited FLUSH_S.
FLUSH_SIZE = 200
FLUSH_S = 0.005
#: Outcomes not recorded yet beyond which no attempt starts (the database is behind).
MAX_UNRECORDED = 2_000
#: The shortest sleep while a delivery's due time is about to come.
MIN_SLEEP_S = 0.001


def _at(ts_s: float) -> datetime:
    return datetime.fromtimestamp(ts_s, tz=UTC)


@dataclass
class _Claims:
    """When to ask the outbox for due deliveries again."""

    needed: bool = True
    #: The due time of the earliest pending delivery not held (None: none is pending).
    next_due: datetime | None = None
    #: Hooks left out of the last claim because enough of theirs were waiting.
    skipped_hooks: frozenset[str] = frozenset()
    retry_at: float = 0.0  # monotonic: no claim before, after a read error
    #: Look at the outbox at least this often (None: only when a delivery is due or on a
    #: wake), for what other processes queue; ``looked_at`` is monotonic.
    look_every_s: float | None = None
    looked_at: float = 0.0

    def due(self, now_s: float) -> bool:
        if time.monotonic() < self.retry_at:
            return False
        if self.look_every_s is not None and time.monotonic() >= self._next_look():
            return True
        return self.needed or (self.next_due is not None and self.next_due <= _at(now_s))

    def delay(self, now_s: float) -> float:
        if time.monotonic() < self.retry_at:
            return self.retry_at - time.monotonic()
        if self.needed:
            return 0.0
        delays = [MAX_IDLE_S]
        if self.next_due is not None:
            delays.append(max(MIN_SLEEP_S, self.next_due.timestamp() - now_s))
        if self.look_every_s is not None:
            delays.append(max(MIN_SLEEP_S, self._next_look() - time.monotonic()))
        return min(delays)

    def _next_look(self) -> float:
        return self.looked_at + min(self.look_every_s or MAX_IDLE_S, MAX_IDLE_S)

    def claimed(self, batch: DueBatch, *, skipped: set[str]) -> None:
        self.looked_at = time.monotonic()
        self.needed = False
        self.next_due = batch.next_at
        self.skipped_hooks = frozenset(skipped)

    def earlier(self, ts_s: float) -> None:
        at = _at(ts_s)
        if self.next_due is None or at < self.next_due:
            self.next_due = at


@dataclass
class _Work:
    """What one run holds: the lanes, the outcomes to record, when to claim again."""

    lanes: Lanes
    recorder: Recorder
    claims: _Claims = field(default_factory=_Claims)
    #: run_once: deliveries attempted in this pass and due again within it (not repeated).
    handled: set[int] = field(default_factory=set)
    attempts: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.lanes.running or self.lanes.waiting or self.recorder.held)

    def can_start(self) -> bool:
        return self.recorder.held < MAX_UNRECORDED

    def delay(self, now_s: float, *, claims: bool = True) -> float:
        """How long to sleep when nothing finishes: until a claim or a recording is due."""
        delays = [MAX_IDLE_S]
        if claims and self.can_start():
            delays.append(self.claims.delay(now_s))
        flush_in = self.recorder.flush_in(now=not self.lanes.running)
        if flush_in is not None:
            delays.append(flush_in)
        return min(delays)


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
        claim_size: int = CLAIM_SIZE,
        look_every_s: float = MAX_IDLE_S,
        servers: Callable[[], Collection[str] | None] = lambda: None,
    ) -> None:
        """``servers``: whose jobs' deliveries to send (``None``: all). With replicas, each
        sends those of the servers it holds the lease of."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if claim_size < 1:
            raise ValueError("claim_size must be at least 1")
        self._store = store
        self._servers = servers
        self._hooks: dict[str, HookSettings] = dict(hooks)
        self._concurrency = concurrency
        self._claim_size = claim_size
        self._look_every_s = look_every_s
        self._work: _Work | None = None  # run()'s
        self._metrics = metrics
        self._clock = clock
        self._attempts = Attempts(clock=clock)
        self._wake = asyncio.Event()  # new deliveries may be due: claim
        self._nudge = asyncio.Event()  # something to look at: woken, finished, stopped
        self._lanes: list[Lanes] = []  # those of the runs in progress (reconfigured live)

    # -- control ------------------------------------------------------------------------

    def configure(
        self,
        *,
        hooks: Mapping[str, HookSettings],
        concurrency: int | None = None,
        look_every_s: float | None = None,
    ) -> None:
        """Adopt reloaded hook settings and, if given, a new bound of attempts in flight
        per hook (attempts already running keep the old settings and run to their end;
        a lower bound only holds back the next ones) and a new poll interval."""
        if concurrency is not None:
            if concurrency < 1:
                raise ValueError("concurrency must be at least 1")
            self._concurrency = concurrency
            for lanes in self._lanes:
                lanes.per_hook = concurrency
        self._hooks = dict(hooks)
        if look_every_s is not None:
            self._look_every_s = look_every_s
            if self._work is not None:
                self._work.claims.look_every_s = look_every_s
        self.wake()

    def wake(self) -> None:
        """New deliveries may be due now: look at the outbox without waiting."""
        self._wake.set()
        self._nudge.set()

    async def close(self) -> None:
        """Close the HTTP session (a later attempt opens a new one)."""
        await self._attempts.close()

    # -- loops --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Send due deliveries until ``stop`` is set, then let running attempts finish and
        record their outcomes.

        If run() is cancelled, attempts in flight are cancelled too (their deliveries
        stay pending). Anything but a database fault that passes (a bug, in an
        attempt, a recording or a claim) makes run() raise at once: loudly, not
        half-broken. Attempts in flight are cancelled then; their deliveries stay pending.
        """
        work = self._new_work()
        work.claims.look_every_s = self._look_every_s
        self._work = work
        stop_watch = asyncio.create_task(stop.wait(), name="hook-stop-watch")
        stop_watch.add_done_callback(lambda _: self._nudge.set())
        try:
            while not stop.is_set():
                now_s = self._clock()
                try:
                    await self._claim_if_due(work, now_s)
                except StoreError as exc:
                    log.error("hook_outbox_unreadable", error=str(exc), retry_in_s=STORE_RETRY_S)
                    work.claims.retry_at = time.monotonic() + STORE_RETRY_S
                if stop.is_set():
                    break  # set while claiming: start nothing new
                self._advance(work)
                await self._sleep(work.delay(self._clock()))
                self._collect(work)
        except BaseException:
            await self._abandon(work)
            raise
        finally:
            self._work = None
            stop_watch.cancel()
            await asyncio.wait([stop_watch])
        await self._finish(work)

    async def run_once(self) -> int:
        """Send every delivery due now (each at most once), wait for their outcomes to be
        recorded; returns how many attempts were made. Raises :class:`StoreError` if the
        outbox cannot be read (outcomes that cannot be recorded are tried again)."""
        now_s = self._clock()
        work = self._new_work()
        try:
            while True:
                await self._claim_if_due(work, now_s)
                self._advance(work)
                if not work.busy and not work.claims.due(now_s):
                    return work.attempts
                await self._sleep(work.delay(now_s, claims=False))
                for outcome in self._collect(work):
                    again_s = outcome.verdict.next_attempt_s
                    if again_s is not None and again_s <= now_s:
                        work.handled.add(outcome.delivery_id)  # due again: not in this pass
        finally:
            await self._finish(work)

    # -- steps --------------------------------------------------------------------------

    def _new_work(self) -> _Work:
        self._nudge.clear()
        on_done = self._nudge.set
        recorder = Recorder(self._store, flush_s=FLUSH_S, flush_size=FLUSH_SIZE, on_done=on_done)
        lanes = Lanes(self._concurrency, on_done=on_done)
        self._lanes.append(lanes)
        return _Work(lanes, recorder)

    async def _claim_if_due(self, work: _Work, now_s: float) -> None:
        """Claim due deliveries if the outbox may hold some that are not held yet. Hooks
        with enough waiting are left out, and so is every delivery held."""
        claims = work.claims
        if self._wake.is_set():
            self._wake.clear()
            claims.needed = True
        full = work.lanes.full_hooks()
        if claims.skipped_hooks - full:
            claims.needed = True  # a hook left out last time has room again
        if not work.can_start() or not claims.due(now_s):
            return
        skip = {
            *work.lanes.held_ids(except_hooks=full),
            *work.recorder.held_ids(except_hooks=full),
            *work.handled,
        }
        batch = await self._store.due_batch(
            now_s, self._claim_size, skip_ids=skip, skip_hooks=full, servers=self._servers()
        )
        work.lanes.add(batch.deliveries)
        claims.claimed(batch, skipped=full)

    def _advance(self, work: _Work) -> None:
        """Start attempts in free slots; start a recording if one is due."""
        if work.can_start():
            work.lanes.start(self._attempt)
        work.recorder.maybe_flush(now=not work.lanes.running)

    def _attempt(self, due: DueDelivery) -> Coroutine[Any, Any, Outcome]:
        return self._attempts.make(due, self._hooks)  # the settings as the attempt starts

    async def _sleep(self, delay_s: float) -> None:
        """Sleep up to ``delay_s``; a wake, a stop, a finished attempt or recording ends it."""
        if self._nudge.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._nudge.wait()

    def _collect(self, work: _Work) -> list[Outcome]:
        """Hand finished attempts to the recorder; count and log those whose outcomes are
        recorded (committed). Returns the latter."""
        self._nudge.clear()
        work.recorder.add(work.lanes.reap())
        recorded = work.recorder.reap()
        for outcome in recorded:
            self._recorded(work, outcome)
        return recorded

    def _recorded(self, work: _Work, outcome: Outcome) -> None:
        work.attempts += 1
        verdict = outcome.verdict
        if self._metrics is not None:
            self._metrics.delivery(outcome.hook, verdict.result)
        fields = outcome.log_fields()
        if verdict.state is DeliveryState.DELIVERED:
            log.info("hook_delivered", **fields, duration_s=round(outcome.duration_s, 3))
        elif verdict.state is DeliveryState.DEAD:
            log.error("hook_dead", **fields)
        else:
            log.warning(
                "hook_retry_scheduled", **fields, retry_in_s=round(verdict.retry_in_s or 0, 3)
            )
            if verdict.next_attempt_s is not None:
                work.claims.earlier(verdict.next_attempt_s)

    @staticmethod
    async def _abandon(work: _Work) -> None:
        """After a bug: cancel the attempts and the recording in flight, forget what waits
        (pending in the outbox: made again after the restart). No task outlives this."""
        work.lanes.drop_waiting()
        await work.lanes.cancel()
        await work.recorder.cancel()
        work.recorder.drop()

    async def _finish(self, work: _Work) -> None:
        """Start nothing new; let running attempts finish and record every outcome held
        (tried again after a database error). If cancelled meanwhile, cancel them: what is
        not recorded is made again later (at least once). No task outlives this."""
        work.lanes.drop_waiting()
        try:
            while work.lanes.running or work.recorder.held:
                work.recorder.maybe_flush(now=True)
                flush_in = work.recorder.flush_in(now=True)
                await self._sleep(MAX_IDLE_S if flush_in is None else flush_in)
                self._collect(work)
        except BaseException:
            await work.lanes.cancel()
            await work.recorder.cancel()
            raise
        finally:
            self._lanes.remove(work.lanes)
