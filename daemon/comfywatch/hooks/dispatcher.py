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

A retry is due when its stored ``next_attempt_at`` (wall clock) has passed, or, for a retry
this dispatcher scheduled itself, once its delay has passed on the monotonic clock: setting
the wall clock back delays no retry while the process runs. After a restart only the stored
time is left.

The claim is in the database too (``claimed_by``: this dispatcher's ``owner`` id, random
per process; ``claimed_until``): several daemons on one PostgreSQL database each take
only deliveries no other holds, so each is sent by one of them. Claims last ``claim_s``
(the longest hook timeout plus a margin) and are renewed while held; a dispatcher that dies
leaves claims that expire, and another takes them over (at least once). Deliveries claimed
but never started are released when the dispatcher stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import socket
import uuid
from collections.abc import Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from comfywatch.clock import SYSTEM_CLOCK, Clock
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
#: A claim outlasts the longest hook timeout by this much.
CLAIM_MARGIN_S = 30.0
#: Held claims are renewed when this share of their time has passed.
RENEW_AFTER = 1 / 3


def new_owner_id() -> str:
    """A claimant id for this process: host, pid and a random part (unique even after the
    pid is reused)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _at(ts_s: float) -> datetime:
    return datetime.fromtimestamp(ts_s, tz=UTC)


class _RetryTimers:
    """The retries this dispatcher scheduled, by delivery id: their due times on the
    monotonic clock, then, once passed, ``ripe`` (asked for with every claim until claimed,
    since a full hook or a full batch may leave them out)."""

    def __init__(self) -> None:
        self._due: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []  # may hold stale entries (lazy removal)
        self.ripe: set[int] = set()

    def set(self, delivery_id: int, due_mono_s: float) -> None:
        self.ripe.discard(delivery_id)
        self._due[delivery_id] = due_mono_s
        heapq.heappush(self._heap, (due_mono_s, delivery_id))

    def due_at(self, delivery_id: int) -> float | None:
        return self._due.get(delivery_id)

    def earliest(self) -> float | None:
        """The earliest due time not passed yet when last ripened."""
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def ripen(self, mono_s: float) -> None:
        """Move the retries due at ``mono_s`` to ``ripe``."""
        while (earliest := self.earliest()) is not None and earliest <= mono_s:
            _, delivery_id = heapq.heappop(self._heap)
            del self._due[delivery_id]
            self.ripe.add(delivery_id)

    def drop(self, ids: Collection[int]) -> None:
        for delivery_id in ids:
            self._due.pop(delivery_id, None)
            self.ripe.discard(delivery_id)


@dataclass
class _Claims:
    """When to ask the outbox for due deliveries again. Times named ``mono`` are on the
    monotonic clock, ``now_s`` on the wall clock."""

    retries: _RetryTimers
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

    def due(self, now_s: float, mono_s: float) -> bool:
        if mono_s < self.retry_at:
            return False
        if self.look_every_s is not None and mono_s >= self._next_look():
            return True
        retry = self.retries.earliest()
        return (
            self.needed
            or (self.next_due is not None and self.next_due <= _at(now_s))
            or (retry is not None and retry <= mono_s)
        )

    def delay(self, now_s: float, mono_s: float) -> float:
        if mono_s < self.retry_at:
            return self.retry_at - mono_s
        if self.needed:
            return 0.0
        delays = [MAX_IDLE_S]
        if self.next_due is not None:
            delays.append(max(MIN_SLEEP_S, self.next_due.timestamp() - now_s))
        if (retry := self.retries.earliest()) is not None:
            delays.append(max(MIN_SLEEP_S, retry - mono_s))
        if self.look_every_s is not None:
            delays.append(max(MIN_SLEEP_S, self._next_look() - mono_s))
        return min(delays)

    def _next_look(self) -> float:
        return self.looked_at + min(self.look_every_s or MAX_IDLE_S, MAX_IDLE_S)

    def claimed(self, batch: DueBatch, *, skipped: set[str], mono_s: float) -> None:
        self.looked_at = mono_s
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
    claims: _Claims
    #: run_once: deliveries attempted in this pass and due again within it (not repeated).
    handled: set[int] = field(default_factory=set)
    attempts: int = 0
    #: Monotonic time the held claims are renewed next (None: run_once, no renewal).
    renew_at: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.lanes.running or self.lanes.waiting or self.recorder.held)

    def can_start(self) -> bool:
        return self.recorder.held < MAX_UNRECORDED

    def delay(self, now_s: float, mono_s: float, *, claims: bool = True) -> float:
        """How long to sleep when nothing finishes: until a claim or a recording is due."""
        delays = [MAX_IDLE_S]
        if claims and self.can_start():
            delays.append(self.claims.delay(now_s, mono_s))
        if self.renew_at is not None and self.busy:
            delays.append(max(MIN_SLEEP_S, self.renew_at - mono_s))
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
        clock: Clock = SYSTEM_CLOCK,
        claim_size: int = CLAIM_SIZE,
        look_every_s: float = MAX_IDLE_S,
        owner: str | None = None,
        claim_s: float | None = None,
    ) -> None:
        """``owner``: the id its claims are made under (default: :func:`new_owner_id`);
        ``claim_s``: how long a claim lasts unless renewed (default: the longest hook
        timeout plus :data:`CLAIM_MARGIN_S`)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if claim_size < 1:
            raise ValueError("claim_size must be at least 1")
        self._store = store
        self._hooks: dict[str, HookSettings] = dict(hooks)
        self._concurrency = concurrency
        self._claim_size = claim_size
        self._look_every_s = look_every_s
        self.owner = owner or new_owner_id()
        self._claim_s = claim_s
        self._work: _Work | None = None  # run()'s
        self._metrics = metrics
        self._clock = clock
        self._attempts = Attempts(clock=clock.wall)
        #: Retries scheduled by this dispatcher, due on the monotonic clock (this process).
        self._retries = _RetryTimers()
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

    @property
    def claim_s(self) -> float:
        """How long a claim lasts unless renewed."""
        if self._claim_s is not None:
            return self._claim_s
        timeouts = [float(getattr(hook, "timeout_s", 0.0)) for hook in self._hooks.values()]
        return max(timeouts, default=0.0) + CLAIM_MARGIN_S

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
        work.renew_at = self._clock.mono() + self.claim_s * RENEW_AFTER
        self._work = work
        stop_watch = asyncio.create_task(stop.wait(), name="hook-stop-watch")
        stop_watch.add_done_callback(lambda _: self._nudge.set())
        try:
            while not stop.is_set():
                try:
                    await self._claim_if_due(work, self._clock.wall(), self._clock.mono())
                except StoreError as exc:
                    log.error("hook_outbox_unreadable", error=str(exc), retry_in_s=STORE_RETRY_S)
                    work.claims.retry_at = self._clock.mono() + STORE_RETRY_S
                if stop.is_set():
                    break  # set while claiming: start nothing new
                await self._renew_if_due(work)
                self._advance(work)
                await self._sleep(work.delay(self._clock.wall(), self._clock.mono()))
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
        now_s, mono_s = self._clock.wall(), self._clock.mono()
        work = self._new_work()
        try:
            while True:
                await self._claim_if_due(work, now_s, mono_s)
                self._advance(work)
                if not work.busy and not work.claims.due(now_s, mono_s):
                    return work.attempts
                await self._sleep(work.delay(now_s, mono_s, claims=False))
                for outcome in self._collect(work):
                    again_s = outcome.verdict.next_attempt_s
                    again_mono = self._retries.due_at(outcome.delivery_id)
                    if (again_s is not None and again_s <= now_s) or (
                        again_mono is not None and again_mono <= mono_s
                    ):
                        work.handled.add(outcome.delivery_id)  # due again: not in this pass
        finally:
            await self._finish(work)

    # -- steps --------------------------------------------------------------------------

    def _new_work(self) -> _Work:
        self._nudge.clear()
        on_done = self._nudge.set
        recorder = Recorder(
            self._store, flush_s=FLUSH_S, flush_size=FLUSH_SIZE, on_done=on_done, owner=self.owner
        )
        lanes = Lanes(self._concurrency, on_done=on_done)
        self._lanes.append(lanes)
        return _Work(lanes, recorder, _Claims(self._retries))

    async def _claim_if_due(self, work: _Work, now_s: float, mono_s: float) -> None:
        """Claim due deliveries if the outbox may hold some that are not held yet. Hooks
        with enough waiting are left out, and so is every delivery held. Due are those
        whose stored time has passed on the wall clock (``now_s``) and the retries this
        dispatcher scheduled whose delay has passed on the monotonic clock (``mono_s``)."""
        claims = work.claims
        if self._wake.is_set():
            self._wake.clear()
            claims.needed = True
        full = work.lanes.full_hooks()
        if claims.skipped_hooks - full:
            claims.needed = True  # a hook left out last time has room again
        if not work.can_start() or not claims.due(now_s, mono_s):
            return
        skip = {
            *work.lanes.held_ids(except_hooks=full),
            *work.recorder.held_ids(except_hooks=full),
            *work.handled,
        }
        retries = self._retries
        retries.ripen(mono_s)
        ripe = sorted(retries.ripe - skip)
        batch = await self._store.due_batch(
            now_s,
            self._claim_size,
            skip_ids=skip,
            skip_hooks=full,
            due_ids=ripe,
            owner=self.owner,
            claim_s=self.claim_s,
        )
        work.lanes.add(batch.deliveries)
        claims.claimed(batch, skipped=full, mono_s=mono_s)
        retries.drop([due.delivery.id for due in batch.deliveries])
        if len(batch.deliveries) == self._claim_size:
            claims.needed = bool(retries.ripe)  # more may be due than the batch held
        elif not full:
            retries.drop(ripe)  # not returned: no longer pending (finished elsewhere)

    async def _renew_if_due(self, work: _Work) -> None:
        """Extend the claims of the deliveries held (waiting for a slot, being attempted,
        or their results waiting for the database), so no other dispatcher takes them."""
        if work.renew_at is None or self._clock.mono() < work.renew_at:
            return
        claim_s = self.claim_s
        work.renew_at = self._clock.mono() + claim_s * RENEW_AFTER
        held = {*work.lanes.held_ids(), *work.recorder.held_ids()}
        if not held:
            return
        try:
            await self._store.renew_claims(self.owner, held, until_s=self._clock.wall() + claim_s)
        except StoreError as exc:
            log.warning("hook_claims_not_renewed", count=len(held), error=str(exc))

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
            if verdict.retry_in_s is not None:
                self._retries.set(outcome.delivery_id, self._clock.mono() + verdict.retry_in_s)

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
        not recorded is made again later (at least once). No task outlives this. The
        claims of deliveries never started are released, for another daemon to take."""
        dropped = work.lanes.drop_waiting()
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
        if dropped:
            try:
                await self._store.release_claims(self.owner, dropped)
            except StoreError as exc:  # they expire instead
                log.warning("hook_claims_not_released", count=len(dropped), error=str(exc))
