"""Job queries: the active set for the poller, a tick's changes, lookups.

A tick's changes are recorded in one transaction together with their outputs and the hook
deliveries they owe (the outbox), so a hook is owed exactly when its job's end is durable.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from comfywatch.history import HistoryRecord, OutputRecord
from comfywatch.states import ACTIVE_STATES, DeliveryState
from comfywatch.store.engine import Database
from comfywatch.store.listen import DELIVERIES, JOBS, notify
from comfywatch.store.models import HookDelivery, Job, JobOutput
from comfywatch.store.reads import outputs_of, select_job, select_jobs
from comfywatch.store.replicas import fenced_servers
from comfywatch.store.rows import (
    chunks,
    utc,
    utc_ms,
)
from comfywatch.store.values import (
    ActiveJob,
    Change,
    Fence,
    JobFilter,
    JobRecord,
    ProgressUpdate,
    output_columns,
)

_ACTIVE = list(ACTIVE_STATES)
_JOBS: Table = Job.__table__
_OUTPUTS: Table = JobOutput.__table__
_DELIVERIES: Table = HookDelivery.__table__


class JobQueries(Database):
    """Tracking and reading jobs (registering them: :mod:`comfywatch.store.registration`)."""

    async def active_jobs(
        self, ids: Sequence[int] | None = None, *, servers: Collection[str] | None = None
    ) -> list[ActiveJob]:
        """The jobs not terminal yet (only those among ``ids``, and of ``servers``, when
        given)."""
        wanted = [Job.id.in_(list(ids))] if ids is not None else []
        if servers is not None:
            wanted.append(Job.server.in_(list(servers)))
        async with self._session(read_only=True) as session:
            rows = await session.execute(
                select(
                    Job.id,
                    Job.server,
                    Job.prompt_id,
                    Job.state,
                    Job.registered_at,
                    Job.queued_at,
                    Job.started_at,
                    Job.hooks,
                ).where(Job.state.in_(_ACTIVE), *wanted)
            )
            return [
                ActiveJob(
                    id=r.id,
                    server=r.server,
                    prompt_id=r.prompt_id,
                    state=r.state,
                    registered_at=r.registered_at,
                    queued_at=r.queued_at,
                    started_at=r.started_at,
                    hooks=tuple(str(h) for h in (r.hooks or [])),
                )
                for r in rows
            ]

    async def record(
        self, changes: Sequence[Change], now_s: float, *, fence: Fence | None = None
    ) -> list[int]:
        """Apply one tick's changes in one transaction; returns the ids actually changed.

        A job already terminal in the database is never touched again (terminal states
        never change), so a change computed from stale data is dropped, not applied. Jobs,
        outputs and deliveries are written in bulk: one ``executemany`` per statement.

        With a ``fence`` (several replicas), only the jobs of servers whose lease is still
        the fence's (owner and epoch) are written; the others are dropped.
        """
        if not changes:
            return []
        now = utc(now_s)
        by_id = {change.job_id: change for change in changes}
        async with self._session() as session:
            live = await _lock_active(session, list(by_id), fence)
            applied = [job_id for job_id in by_id if job_id in live]
            if not applied:
                return []
            await _update_active(session, [(i, _job_values(by_id[i], now)) for i in applied])
            outputs = [
                {"job_id": i, **output_columns(out)}
                for i in applied
                if (history := by_id[i].history) is not None
                for out in history.outputs
            ]
            if outputs:
                await session.execute(insert(_OUTPUTS), outputs)
            deliveries = [
                _new_delivery(i, by_id[i], hook, now)
                for i in applied
                for hook in by_id[i].deliveries
            ]
            if deliveries:
                await session.execute(insert(_DELIVERIES), deliveries)
                await notify(session, DELIVERIES)
            ended = [live[i] for i in applied if by_id[i].state.terminal]
            if ended:
                await notify(session, JOBS, ended)
        return applied

    async def record_progress(
        self, updates: Sequence[ProgressUpdate], *, fence: Fence | None = None
    ) -> None:
        """Write the jobs' latest progress in one transaction (one ``executemany``); a job
        already terminal is left as it is, and so is one whose server's lease is no longer
        ``fence``'s."""
        if not updates:
            return
        async with self._session() as session:
            if fence is not None:
                live = await _lock_active(session, [u.job_id for u in updates], fence)
                updates = [u for u in updates if u.job_id in live]
            await _update_active(session, [(u.job_id, _progress_values(u)) for u in updates])

    async def jobs(
        self, flt: JobFilter, *, with_deliveries: bool = False, with_history: bool = False
    ) -> list[JobRecord]:
        """Jobs matching ``flt``, newest registration first, with their outputs (and their
        deliveries and raw history entries when asked)."""
        async with self._session(read_only=True) as session:
            return await session.run_sync(
                lambda s: select_jobs(
                    s.connection(), flt, with_deliveries=with_deliveries, with_history=with_history
                )
            )

    async def job_record(self, job_id: int) -> JobRecord | None:
        """One job with its outputs, by database id."""
        async with self._session(read_only=True) as session:
            return await session.run_sync(lambda s: select_job(s.connection(), job_id))


async def _lock_active(
    session: AsyncSession, ids: Sequence[int], fence: Fence | None = None
) -> dict[int, str]:
    """Those of ``ids`` that are still active, locked until the transaction ends, each
    with its ``server/prompt_id``.

    On SQLite the write lock is already held (``BEGIN IMMEDIATE``); elsewhere ``FOR UPDATE``
    takes it: either way the rows found active stay active until this transaction commits.
    With a ``fence``, only the jobs of servers whose lease is still its own (their lease
    rows locked too, so no takeover commits before this transaction does).
    """
    allowed: set[str] | None = None
    if fence is not None:
        allowed = await fenced_servers(session, fence, fence.epochs)
        if not allowed:
            return {}
    live: dict[int, str] = {}
    for chunk in chunks(ids):
        query = select(Job.id, Job.server, Job.prompt_id).where(
            Job.id.in_(chunk), Job.state.in_(_ACTIVE)
        )
        if allowed is not None:
            query = query.where(Job.server.in_(sorted(allowed)))
        rows = await session.execute(query.with_for_update())
        live.update({r.id: f"{r.server}/{r.prompt_id}" for r in rows})
    return live


async def _update_active(
    session: AsyncSession, values_by_id: Sequence[tuple[int, dict[str, Any]]]
) -> None:
    """``UPDATE jobs`` by primary key, one ``executemany`` per set of columns written.

    Each row is guarded by its state: a job that is already terminal is left as it is
    (terminal exactly once), whatever the caller checked before.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for job_id, values in values_by_id:
        params = {"b_id": job_id, **{f"v_{name}": value for name, value in values.items()}}
        groups.setdefault(tuple(sorted(values)), []).append(params)
    still_active = or_(*(_JOBS.c.state == state for state in _ACTIVE))
    for columns, rows in groups.items():
        statement = (
            update(_JOBS)
            .where(_JOBS.c.id == bindparam("b_id"), still_active)
            .values({name: bindparam(f"v_{name}", type_=_JOBS.c[name].type) for name in columns})
        )
        await session.execute(statement, rows)


async def outputs_by_job(
    session: AsyncSession, ids: Sequence[int]
) -> dict[int, list[OutputRecord]]:
    """The output records of each job in ``ids``, in the order they were written."""
    return await session.run_sync(lambda sync: outputs_of(sync.connection(), ids))


def _new_delivery(job_id: int, change: Change, hook: str, now: datetime) -> dict[str, Any]:
    """A ``hook_deliveries`` row owed for ``change``: pending, due now."""
    return {
        "job_id": job_id,
        "hook": hook,
        "event_id": f"msg_{uuid.uuid4().hex}",
        "event_type": f"job.{change.state.value}",
        "state": DeliveryState.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _job_values(change: Change, now: datetime) -> dict[str, Any]:
    """The ``jobs`` columns ``change`` sets."""
    values: dict[str, Any] = {"state": change.state, "updated_at": now}
    if change.queued_at_s is not None:
        values["queued_at"] = utc(change.queued_at_s)
    if change.started_at_s is not None:
        values["started_at"] = utc(change.started_at_s)
    if change.state.terminal:
        values["reason"] = change.reason
        values["detected_at"] = now
        values["finished_at"] = now
        if change.detail is not None:
            values["detail"] = change.detail
    if change.history is not None:
        values.update(_history_values(change.history, queued_known=change.queued_at_s is not None))
    if change.progress is not None:
        values.update(_progress_values(change.progress))
    return values


def _progress_values(update: ProgressUpdate) -> dict[str, Any]:
    """The ``progress_*`` columns of ``update``."""
    return {
        "progress_node": update.node,
        "progress_value": update.value,
        "progress_max": update.max,
        "progress_at": utc(update.at_s),
    }


def _history_values(record: HistoryRecord, *, queued_known: bool) -> dict[str, Any]:
    """The ``jobs`` columns a history entry fills (its times win over our observations)."""
    values: dict[str, Any] = {
        "status_str": record.status_str,
        "completed": record.completed,
        "comfy_created_at_ms": record.created_at_ms,
        "comfy_started_at_ms": record.started_at_ms,
        "comfy_finished_at_ms": record.finished_at_ms,
        "history": record.entry,
    }
    started = utc_ms(record.started_at_ms)
    finished = utc_ms(record.finished_at_ms)
    created = utc_ms(record.created_at_ms)
    if started is not None:
        values["started_at"] = started
    if finished is not None:
        values["finished_at"] = finished
    if created is not None and not queued_known:
        values["queued_at"] = created
    if record.number is not None:
        values["number"] = record.number
    if record.error is not None:
        values.update(
            error_node_id=record.error.node_id,
            error_node_type=record.error.node_type,
            error_exception_type=record.error.exception_type,
            error_exception_message=record.error.exception_message,
            error_traceback=record.error.traceback,
        )
    return values
