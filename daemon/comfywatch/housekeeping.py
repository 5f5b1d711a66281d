"""Chores between ticks: the database-wide gauges and retention pruning.

The gauges (jobs and deliveries by state, the oldest active job) are refreshed at most
every ``STATS_EVERY_S``. With ``retention_days`` set, old terminal jobs are pruned at most
every ``PRUNE_EVERY_S``, in a task of its own and in small transactions, so ticks go on
between the batches. Those intervals run on the monotonic clock; the ages and the
retention cutoff, on stored times, on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

import structlog

from comfywatch.errors import StoreError
from comfywatch.metrics import Metrics
from comfywatch.spool import Spool
from comfywatch.store import Store, retention_cutoff

log = structlog.get_logger("comfywatch.service")

#: How often the database-wide counts behind the gauges are refreshed.
STATS_EVERY_S = 10.0
#: How often retention pruning runs when ``retention_days`` is set.
PRUNE_EVERY_S = 3600.0


class Housekeeping:
    """Keeps the gauges fresh and the database pruned; ``stop()`` ends a prune in flight."""

    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        spool: Spool | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self._mono = mono
        #: When the gauges were refreshed and pruning started (monotonic; None: never).
        self._last_stats_m: float | None = None
        self._last_prune_m: float | None = None
        self._prune_task: asyncio.Task[None] | None = None

    async def refresh_gauges(self, now_s: float) -> None:
        """Refresh the gauges if they are due (``now_s``: the wall clock, for the ages).
        Raises StoreError."""
        now_m = self._mono()
        if self._last_stats_m is not None and now_m - self._last_stats_m < STATS_EVERY_S:
            return
        self._last_stats_m = now_m
        stats = await self._store.stats()
        self._metrics.set_job_counts(stats.jobs)
        self._metrics.set_delivery_counts(stats.deliveries)
        ages_s = {key: now_s - value.timestamp() for key, value in stats.oldest_active.items()}
        self._metrics.set_oldest_active(ages_s)

    def prune_if_due(
        self, now_s: float, retention_days: float, keep: Collection[tuple[str, str]]
    ) -> None:
        """Start pruning jobs older than ``retention_days`` (but those in ``keep``) if an
        hour has passed since the last run and none is running."""
        now_m = self._mono()
        recent = self._last_prune_m is not None and now_m - self._last_prune_m < PRUNE_EVERY_S
        if recent or (self._prune_task is not None and not self._prune_task.done()):
            return
        self._last_prune_m = now_m
        self._prune_task = asyncio.create_task(
            self._prune(now_s, retention_days, keep), name="prune"
        )

    async def stop(self) -> None:
        if self._prune_task is not None:
            self._prune_task.cancel()  # between batches: each batch commits whole
            await asyncio.wait({self._prune_task})

    async def _prune(
        self, now_s: float, retention_days: float, keep: Collection[tuple[str, str]]
    ) -> None:
        cutoff_s = retention_cutoff(now_s, retention_days)
        # The spool's done/ and rejected/ files age out with the jobs.
        files = await self._spool.prune(cutoff_s) if self._spool is not None else 0
        try:
            pruned = await self._store.prune(cutoff_s, dry_run=False, keep=keep)
        except StoreError as exc:
            log.warning("prune_failed", error=str(exc))
            return
        if pruned or files:
            log.info("pruned", jobs=pruned, spool_files=files, retention_days=retention_days)
