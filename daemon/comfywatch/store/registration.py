"""Registration: jobs from the main config file and the spool, upserted on (server, prompt_id).

A job not yet known is inserted and handed back as an :class:`ActiveJob`, ready for the
poller. A known job keeps its row and its state: registering it again can change its
labels (and, while it is still active, its hooks, in which case it is handed back too, so
the poller owes the new hooks), never its state, so no hook fires twice and no terminal
job comes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from comfywatch.states import ACTIVE_STATES, JobState
from comfywatch.store.engine import Database
from comfywatch.store.listen import REGISTERED, joined, notify
from comfywatch.store.models import Job
from comfywatch.store.rows import chunks, utc
from comfywatch.store.values import ActiveJob, NewJob

_Key = tuple[str, str]


class _Known(NamedTuple):
    """What registration needs of a job already in the database."""

    id: int
    state: JobState
    labels: Any
    hooks: Any
    registered_at: datetime
    queued_at: datetime | None
    started_at: datetime | None


class RegistrationQueries(Database):
    """Registering jobs."""

    async def register(self, jobs: Iterable[NewJob], now_s: float) -> list[ActiveJob]:
        """Upserts ``jobs`` in one transaction; returns those it inserted, and the active
        ones whose hooks it changed (on PostgreSQL, their ids are announced on
        ``comfywatch_registered`` as the transaction commits).

        A known job takes the labels given (whatever its state) and, while still
        registered, queued or running, the hooks given; its state, times and source stay.
        When one (server, prompt_id) comes several times, the last one wins.
        """
        wanted = {(job.server, job.prompt_id): job for job in jobs}
        if not wanted:
            return []
        now = utc(now_s)
        async with self._session() as session:
            known = await _known_jobs(session, wanted)
            rehooked = await _refresh(session, wanted, known, now)
            fresh = [job for key, job in wanted.items() if key not in known]
            registered = [*await _insert(session, fresh, now), *rehooked]
            if registered:
                await notify(session, REGISTERED, joined([str(job.id) for job in registered]))
            return registered


async def _known_jobs(session: AsyncSession, wanted: Iterable[_Key]) -> dict[_Key, _Known]:
    """The jobs among ``wanted`` (server, prompt_id) pairs that are already registered."""
    by_server: dict[str, list[str]] = {}
    for server, prompt_id in wanted:
        by_server.setdefault(server, []).append(prompt_id)
    known: dict[_Key, _Known] = {}
    for server, prompt_ids in by_server.items():
        for chunk in chunks(prompt_ids):
            rows = await session.execute(
                select(
                    Job.id,
                    Job.prompt_id,
                    Job.state,
                    Job.labels,
                    Job.hooks,
                    Job.registered_at,
                    Job.queued_at,
                    Job.started_at,
                ).where(Job.server == server, Job.prompt_id.in_(chunk))
            )
            known.update(
                {
                    (server, r.prompt_id): _Known(
                        r.id, r.state, r.labels, r.hooks, r.registered_at, r.queued_at, r.started_at
                    )
                    for r in rows
                }
            )
    return known


async def _refresh(
    session: AsyncSession,
    wanted: Mapping[_Key, NewJob],
    known: Mapping[_Key, _Known],
    now: datetime,
) -> list[ActiveJob]:
    """New labels (and, for active jobs, hooks) onto known jobs whose values differ;
    returns the active jobs whose hooks changed, as the poller sees them."""
    labels_only: list[dict[str, Any]] = []
    with_hooks: list[dict[str, Any]] = []
    rehooked: list[ActiveJob] = []
    for key, row in known.items():
        job = wanted[key]
        labels, hooks = dict(job.labels), list(job.hooks)
        if row.state in ACTIVE_STATES and row.hooks != hooks:
            with_hooks.append({"id": row.id, "labels": labels, "hooks": hooks, "updated_at": now})
            rehooked.append(
                ActiveJob(
                    id=row.id,
                    server=key[0],
                    prompt_id=key[1],
                    state=row.state,
                    registered_at=row.registered_at,
                    queued_at=row.queued_at,
                    started_at=row.started_at,
                    hooks=tuple(job.hooks),
                )
            )
        elif row.labels != labels:
            labels_only.append({"id": row.id, "labels": labels, "updated_at": now})
    for values in (labels_only, with_hooks):
        for chunk in chunks(values):
            await session.execute(update(Job), list(chunk))
    return rehooked


async def _insert(session: AsyncSession, jobs: list[NewJob], now: datetime) -> list[ActiveJob]:
    """Inserts ``jobs`` (none known yet) as ``registered``; returns them as the poller sees
    them."""
    hooks = {(job.server, job.prompt_id): tuple(job.hooks) for job in jobs}
    rows = [
        {
            "server": job.server,
            "prompt_id": job.prompt_id,
            "state": JobState.REGISTERED,
            "labels": dict(job.labels),
            "hooks": list(job.hooks),
            "source": job.source,
            "registered_at": now,
            "updated_at": now,
        }
        for job in jobs
    ]
    inserted: list[ActiveJob] = []
    statement = insert(Job)
    if session.get_bind().dialect.name == "postgresql":
        # Replicas sharing a spool register the same file at once: the one that loses
        # the race inserts nothing (its rows were inserted by the other).
        statement = pg_insert(Job).on_conflict_do_nothing(
            index_elements=[Job.server, Job.prompt_id]
        )
    for chunk in chunks(rows):
        result = await session.execute(
            statement.returning(Job.id, Job.server, Job.prompt_id), list(chunk)
        )
        inserted.extend(
            ActiveJob(
                id=r.id,
                server=r.server,
                prompt_id=r.prompt_id,
                state=JobState.REGISTERED,
                registered_at=now,
                queued_at=None,
                started_at=None,
                hooks=hooks[(r.server, r.prompt_id)],
            )
            for r in result
        )
    return inserted
