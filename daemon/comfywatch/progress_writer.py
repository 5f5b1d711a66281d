"""Writes the tracked jobs' latest ``progress`` (from the :class:`~comfywatch.progress.
ProgressBook`) in small batches: one transaction for every job due, at most one write per
job per ``min_gap_s``, never one per message. Progress is a hint, not a state: a write
the database refuses is logged and tried again later, and never stops the daemon.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from comfywatch.errors import StoreError
from comfywatch.progress import Noted, ProgressBook
from comfywatch.store import Fence, ProgressUpdate, Store

log = structlog.get_logger("comfywatch.progress")

#: The id of the job tracking (server, prompt id), if one does.
JobIdOf = Callable[[str, str], int | None]


class ProgressWriter:
    """``run(stop)`` until stopped; ``wake()`` when the book or the tracked jobs changed."""

    def __init__(
        self,
        *,
        store: Store,
        book: ProgressBook,
        job_id_of: JobIdOf,
        monotonic: Callable[[], float] = time.monotonic,
        fence: Callable[[], Fence | None] = lambda: None,
    ) -> None:
        self._store = store
        self._fence = fence
        self._book = book
        self._job_id_of = job_id_of
        self._monotonic = monotonic
        self._wake = asyncio.Event()
        self._failing = False

    def wake(self) -> None:
        self._wake.set()

    def _tracked(self, server: str, prompt_id: str) -> bool:
        return self._job_id_of(server, prompt_id) is not None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            await self.write_due()
            # A failed write is due again one gap after it was tried.
            next_m = self._book.next_due_m(self._tracked)
            timeout_s = None if next_m is None else max(0.0, next_m - self._monotonic())
            waits = [asyncio.ensure_future(e.wait()) for e in (self._wake, stop)]
            try:
                await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    async def write_due(self) -> int:
        """Write what is due now in one transaction; returns how many jobs it updated."""
        due = self._book.due(self._monotonic(), self._tracked)
        updates = [u for noted in due if (u := self._update(noted)) is not None]
        if not updates:
            return 0
        try:
            await self._store.record_progress(updates, fence=self._fence())
        except StoreError as exc:
            self._book.unwritten(due)
            if not self._failing:
                log.warning("progress_not_recorded", error=str(exc), jobs=len(updates))
            self._failing = True
            return 0
        self._failing = False
        return len(updates)

    def _update(self, noted: Noted) -> ProgressUpdate | None:
        job_id = self._job_id_of(noted.server, noted.progress.prompt_id)
        if job_id is None:
            return None
        p = noted.progress
        return ProgressUpdate(job_id, node=p.node, value=p.value, max=p.max, at_s=noted.at_s)
