"""Recording attempt outcomes in batches: one transaction for all the outcomes that finished
since the last one, started when ``flush_size`` are waiting, when the oldest has waited
``flush_s``, or at once when nothing else is running. One recording runs at a time.

An outcome that could not be recorded (the database is busy or down) is kept and recorded
later, so its delivery is not sent again needlessly; it is made again only if the daemon
stops before its result is recorded (at least once). A result is recorded only while the
delivery is still claimed by this dispatcher: if its claim expired and another dispatcher
took the delivery over, the newer state stays (see :mod:`comfywatch.store.deliveries`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

import structlog

from comfywatch.errors import StoreError
from comfywatch.hooks.attempt import Outcome
from comfywatch.store import Store

log = structlog.get_logger("comfywatch.hooks")

#: Delay before trying again to record outcomes after a database error.
STORE_RETRY_S = 1.0


class Recorder:
    """Outcomes waiting to be recorded, and the one recording in progress."""

    def __init__(
        self,
        store: Store,
        *,
        flush_s: float,
        flush_size: int,
        on_done: Callable[[], None],
        owner: str | None = None,
    ) -> None:
        self._store = store
        self._owner = owner  # whose claims the results are recorded under
        self._flush_s = flush_s
        self._flush_size = flush_size
        self._on_done = on_done
        self._waiting: list[Outcome] = []
        self._oldest_at = 0.0  # monotonic time the oldest waiting outcome arrived
        self._retry_at = 0.0  # monotonic time before which no recording is tried again
        self._flushing: list[Outcome] = []
        self._task: asyncio.Task[bool] | None = None

    @property
    def held(self) -> int:
        """Outcomes not recorded yet."""
        return len(self._waiting) + len(self._flushing)

    def held_ids(self, *, except_hooks: Collection[str] = ()) -> list[int]:
        return [
            o.delivery_id for o in (*self._waiting, *self._flushing) if o.hook not in except_hooks
        ]

    def add(self, outcomes: list[Outcome]) -> None:
        if outcomes and not self._waiting:
            self._oldest_at = time.monotonic()
        self._waiting.extend(outcomes)

    def flush_in(self, *, now: bool) -> float | None:
        """Seconds until a recording should start (``now``: at once, whatever the batch
        size); ``None`` if there is nothing to record or a recording is running."""
        if not self._waiting or self._task is not None:
            return None
        due = self._retry_at
        if not now and len(self._waiting) < self._flush_size:
            due = max(due, self._oldest_at + self._flush_s)
        return max(0.0, due - time.monotonic())

    def maybe_flush(self, *, now: bool) -> None:
        """Start recording the waiting outcomes if their time has come (see ``flush_in``)."""
        if self.flush_in(now=now) == 0.0:
            self._flushing, self._waiting = self._waiting, []
            self._task = asyncio.create_task(self._record(self._flushing), name="hook-recorder")
            self._task.add_done_callback(lambda _: self._on_done())

    def reap(self) -> list[Outcome]:
        """The outcomes just recorded, once their transaction has committed; those that
        could not be recorded wait for the next try."""
        if self._task is None or not self._task.done():
            return []
        recorded = self._task.result()
        batch, self._flushing, self._task = self._flushing, [], None
        if recorded:
            return batch
        self._waiting[:0] = batch
        self._oldest_at = time.monotonic()
        self._retry_at = time.monotonic() + STORE_RETRY_S
        return []

    async def _record(self, batch: list[Outcome]) -> bool:
        try:
            await self._store.record_attempts(
                [outcome.finished() for outcome in batch], owner=self._owner
            )
        except StoreError as exc:
            # The attempts were made but not recorded: kept, and recorded on a later try.
            log.error(
                "hook_result_not_recorded",
                count=len(batch),
                error=str(exc),
                retry_in_s=STORE_RETRY_S,
            )
            return False
        return True

    async def cancel(self) -> None:
        """Stop a recording in progress (its outcomes are lost: made again later)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("hook_recording_failed", exc_info=exc)  # a bug, met while stopping

    def drop(self) -> None:
        """Forget the outcomes not recorded (their deliveries stay pending)."""
        self._waiting.clear()
        self._flushing.clear()
