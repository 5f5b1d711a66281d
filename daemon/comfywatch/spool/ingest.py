"""Ingesting the spool: each file of ``jobs_dir`` read once, its jobs committed, then moved.

:meth:`Spool.ingest` is called once per poll interval. It lists the inbox only when the files
of the previous listing are all handled, so a pass costs what is waiting, never what was
ever registered. Files are read in name order, in bounded batches, in a worker thread; a
batch's jobs are committed in one transaction before its files leave the inbox. A crash
between the commit and the move leaves the file to be read again: registering is an
upsert, so that adds no job and fires no hook. A bad file is set aside in ``rejected/``
and stops nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from comfywatch.config import JobSpec, Settings
from comfywatch.config.document import os_reason
from comfywatch.errors import ConfigError, StoreError
from comfywatch.metrics import Metrics
from comfywatch.spool.inbox import move_to_done, prune_before, reject, waiting_names
from comfywatch.spool.parse import read_spool_file
from comfywatch.store import ActiveJob, NewJob, Store

log = structlog.get_logger("comfywatch.spool")

#: Files read per batch (one worker-thread call, one transaction).
BATCH_FILES = 200
#: A batch ends early once its files hold this many jobs (one file is never split).
BATCH_JOBS = 2000
#: A file that could not be moved out of the inbox is read again after this long.
RETRY_UNMOVABLE_S = 60.0


@dataclass(frozen=True, slots=True)
class _Accepted:
    name: str
    jobs: list[JobSpec]


@dataclass(slots=True)
class _Batch:
    """What a worker thread made of some waiting files."""

    accepted: list[_Accepted] = field(default_factory=list)
    rejected: list[tuple[str, str, Path]] = field(default_factory=list)  # name, error, where
    failed: list[tuple[str, str]] = field(default_factory=list)  # name, why it stayed
    unread: list[str] = field(default_factory=list)  # left for the next batch


def _read_batch(inbox: Path, names: list[str], settings: Settings) -> _Batch:
    """Reads ``names`` (worker thread): good files are returned, bad ones set aside."""
    batch = _Batch()
    jobs = 0
    for index, name in enumerate(names):
        if jobs >= BATCH_JOBS:
            batch.unread = names[index:]
            break
        try:
            specs = read_spool_file(inbox / name, settings)
        except ConfigError as exc:
            try:
                moved = reject(inbox, name, str(exc))
            except OSError as err:
                batch.failed.append((name, f"cannot set it aside: {os_reason(err)}"))
                continue
            if moved is not None:  # else its producer took it back before we read it
                batch.rejected.append((name, str(exc), moved))
            continue
        batch.accepted.append(_Accepted(name, specs))
        jobs += len(specs)
    return batch


def _finish(inbox: Path, names: list[str], *, keep: bool) -> list[tuple[str, Path | str | None]]:
    """Moves registered files to ``done/`` or deletes them (worker thread): per name, where
    it went (None: deleted), or why it could not go (a string)."""
    results: list[tuple[str, Path | str | None]] = []
    for name in names:
        try:
            if keep:
                results.append((name, move_to_done(inbox, name)))
            else:
                (inbox / name).unlink()
                results.append((name, None))
        except FileNotFoundError:
            results.append((name, None))  # taken back by its producer: its jobs stay
        except OSError as exc:
            results.append((name, os_reason(exc)))
    return results


class Spool:
    """The inbox of ``jobs_dir``: what waits there, and ingesting it."""

    def __init__(self, settings: Settings, *, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backlog: deque[str] = deque()  # listed, not yet read
        self._unmovable: dict[str, float] = {}  # name -> when to read it again (monotonic)
        self._problem: str | None = None

    def configure(self, settings: Settings) -> None:
        """Use reloaded settings (servers and hooks to check against, the inbox, ...)."""
        if settings.daemon.jobs_dir != self._settings.daemon.jobs_dir:
            self._backlog.clear()
            self._unmovable.clear()
        self._settings = settings

    @property
    def waiting(self) -> int:
        """Files listed and not yet read (0 once the last listing is handled)."""
        return len(self._backlog)

    async def ingest(self, store: Store, *, now_s: float, budget_s: float) -> list[ActiveJob]:
        """Reads waiting files, batch after batch, until none is left of the last listing
        or ``budget_s`` has passed (at least one batch); returns the jobs newly inserted."""
        inbox = self._settings.daemon.jobs_dir
        if inbox is None:
            return []
        deadline_s = time.monotonic() + budget_s
        if not self._backlog:
            self._backlog.extend(await self._scan(inbox))
        added: list[ActiveJob] = []
        try:
            while self._backlog:
                added.extend(await self._one_batch(store, inbox, now_s))
                if time.monotonic() >= deadline_s:
                    break
        except StoreError as exc:
            # The batch's files stay in the inbox; the next pass lists them again.
            log.error("spool_not_recorded", error=str(exc))
            self._backlog.clear()
        self._metrics.spool_waiting.set(len(self._backlog))
        return added

    async def prune(self, cutoff_s: float) -> int:
        """Deletes files that came to ``done/`` and ``rejected/`` before ``cutoff_s``."""
        inbox = self._settings.daemon.jobs_dir
        if inbox is None:
            return 0
        try:
            return await asyncio.to_thread(prune_before, inbox, cutoff_s)
        except OSError as exc:
            log.warning("spool_prune_failed", jobs_dir=str(inbox), error=os_reason(exc))
            return 0

    async def _scan(self, inbox: Path) -> list[str]:
        try:
            names = await asyncio.to_thread(waiting_names, inbox)
        except NotADirectoryError:
            self._report("is not a directory", inbox)
            return []
        except OSError as exc:
            self._report(f"cannot list it: {os_reason(exc)}", inbox)
            return []
        if names is None:
            self._report("does not exist", inbox)
            return []
        self._report(None, inbox)
        now_s = time.monotonic()
        listed = set(names)
        self._unmovable = {n: t for n, t in self._unmovable.items() if n in listed and t > now_s}
        return [name for name in names if name not in self._unmovable]

    def _report(self, problem: str | None, inbox: Path) -> None:
        """Logs a problem with the inbox once, not once per pass."""
        if problem is not None and problem != self._problem:
            log.warning("spool_unavailable", jobs_dir=str(inbox), problem=problem)
        self._problem = problem

    async def _one_batch(self, store: Store, inbox: Path, now_s: float) -> list[ActiveJob]:
        count = min(BATCH_FILES, len(self._backlog))
        names = [self._backlog.popleft() for _ in range(count)]
        batch = await asyncio.to_thread(_read_batch, inbox, names, self._settings)
        self._backlog.extendleft(reversed(batch.unread))
        for name, error, moved in batch.rejected:
            log.warning("spool_file_rejected", file=name, error=error, moved_to=str(moved))
            self._metrics.spool_files.labels("rejected").inc()
        for name, why in batch.failed:
            self._stuck(name, why)
        if not batch.accepted:
            return []
        specs = [_new_job(job) for accepted in batch.accepted for job in accepted.jobs]
        added = await store.register(specs, now_s)
        names = [accepted.name for accepted in batch.accepted]
        keep = self._settings.daemon.keep_registered_files
        moves = dict(await asyncio.to_thread(_finish, inbox, names, keep=keep))
        fresh = {(job.server, job.prompt_id) for job in added}
        for accepted in batch.accepted:
            where = moves[accepted.name]
            if isinstance(where, str):
                self._stuck(accepted.name, f"registered, but cannot move it: {where}")
            new = sum(1 for job in accepted.jobs if (job.server, job.prompt_id) in fresh)
            log.info(
                "spool_file_registered",
                file=accepted.name,
                jobs=len(accepted.jobs),
                new=new,
                moved_to=str(where) if isinstance(where, Path) else None,
            )
            self._metrics.spool_files.labels("registered").inc()
        return added

    def _stuck(self, name: str, why: str) -> None:
        """A file that stays in the inbox: logged, and left alone for a while."""
        log.error("spool_file_stuck", file=name, error=why, retry_in_s=RETRY_UNMOVABLE_S)
        self._unmovable[name] = time.monotonic() + RETRY_UNMOVABLE_S


def _new_job(job: JobSpec) -> NewJob:
    return NewJob(
        server=job.server,
        prompt_id=job.prompt_id,
        labels=dict(job.labels),
        hooks=tuple(job.hooks),
        source=job.source,
    )
