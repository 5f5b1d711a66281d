"""Hook outbox queries: what is due, each attempt's result, listing and reviving deliveries.

Rows are written by :meth:`JobQueries.record` with the terminal state they announce; here
they are read for sending (in batches, with all the event needs) and updated after their
attempts (in batches too: one ``executemany`` per transaction).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, func, select, update

from comfywatch.states import DeliveryState
from comfywatch.store.engine import Database
from comfywatch.store.jobs import outputs_by_job
from comfywatch.store.models import HookDelivery, Job
from comfywatch.store.reads import select_deliveries
from comfywatch.store.rows import delivery_row, job_row, utc
from comfywatch.store.values import (
    DeliveryRecord,
    DueBatch,
    DueDelivery,
    FinishedAttempt,
    JobRecord,
)

_DELIVERIES: Table = HookDelivery.__table__


def _typed(name: str, column: str) -> Any:
    return bindparam(name, type_=_DELIVERIES.c[column].type)


#: One attempt's result; applied only to the row as the attempt found it (still pending,
#: with the attempts counted before it), so applying it twice changes nothing.
_RECORD_ATTEMPT = (
    update(_DELIVERIES)
    .where(
        _DELIVERIES.c.id == bindparam("b_id"),
        _DELIVERIES.c.state == DeliveryState.PENDING,
        _DELIVERIES.c.attempts == bindparam("b_before"),
    )
    .values(
        state=_typed("b_state", "state"),
        attempts=_typed("b_attempts", "attempts"),
        next_attempt_at=_typed("b_next_attempt_at", "next_attempt_at"),
        last_status_code=_typed("b_status_code", "last_status_code"),
        last_error=_typed("b_error", "last_error"),
        last_response=_typed("b_response", "last_response"),
        updated_at=_typed("b_updated_at", "updated_at"),
        delivered_at=_typed("b_delivered_at", "delivered_at"),
    )
)


class DeliveryQueries(Database):
    """Reading and updating ``hook_deliveries``."""

    async def due_deliveries(self, now_s: float, limit: int) -> list[DeliveryRecord]:
        """Pending deliveries whose time has come, oldest first, with their jobs."""
        return await self._delivery_records(
            _with_job()
            .where(*_pending(), HookDelivery.next_attempt_at <= utc(now_s))
            .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
            .limit(limit)
        )

    async def due_batch(
        self,
        now_s: float,
        limit: int,
        *,
        skip_ids: Collection[int] = (),
        skip_hooks: Collection[str] = (),
    ) -> DueBatch:
        """Up to ``limit`` pending deliveries due at ``now_s``, oldest first, each with its
        job and the job's outputs, and when the next other one is due; in one read
        transaction. ``skip_ids`` and the deliveries of ``skip_hooks`` are left out (the
        hook dispatcher holds them already)."""
        due = _pending(skip_ids, skip_hooks)
        async with self._session(read_only=True) as session:
            rows = (
                await session.execute(
                    _with_job()
                    .where(*due, HookDelivery.next_attempt_at <= utc(now_s))
                    .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
                    .limit(limit)
                )
            ).all()
            outputs = await outputs_by_job(session, sorted({job.id for _, job in rows}))
            taken = [delivery.id for delivery, _ in rows]
            next_at = await session.scalar(
                select(func.min(HookDelivery.next_attempt_at)).where(
                    *_pending([*skip_ids, *taken], skip_hooks)
                )
            )
            batch = tuple(
                DueDelivery(
                    delivery_row(delivery),
                    JobRecord(job_row(job), tuple(outputs.get(job.id, ()))),
                )
                for delivery, job in rows
            )
        return DueBatch(batch, next_at)

    async def deliveries(
        self, *, states: Sequence[DeliveryState] = (), limit: int | None = None
    ) -> list[DeliveryRecord]:
        """Deliveries in ``states`` (any if empty), newest first."""
        async with self._session(read_only=True) as session:
            return await session.run_sync(
                lambda s: select_deliveries(s.connection(), states=states, limit=limit)
            )

    async def _delivery_records(self, query: Select[HookDelivery, Job]) -> list[DeliveryRecord]:
        async with self._session(read_only=True) as session:
            return [
                DeliveryRecord(delivery_row(r[0]), job_row(r[1]))
                for r in await session.execute(query)
            ]

    async def record_attempts(self, attempts: Sequence[FinishedAttempt]) -> int:
        """Record finished attempts in one transaction; returns how many rows changed.

        A row changes only if it is still pending with the attempts counted before this
        one: a result recorded again (after an error whose commit went through anyway)
        changes nothing the second time.
        """
        if not attempts:
            return 0
        params = [_attempt_params(attempt) for attempt in attempts]
        async with self._session() as session:
            if self.engine.dialect.supports_sane_multi_rowcount:
                result = await session.execute(_RECORD_ATTEMPT, params)
                return int(result.rowcount)  # type: ignore[attr-defined]
            # asyncpg counts no rows of an executemany (-1): one statement per attempt, in
            # the same transaction.
            changed = 0
            for one in params:
                result = await session.execute(_RECORD_ATTEMPT, one)
                changed += int(result.rowcount)  # type: ignore[attr-defined]
            return changed

    async def finish_attempt(
        self,
        delivery_id: int,
        *,
        state: DeliveryState,
        now_s: float,
        next_attempt_s: float | None,
        status_code: int | None,
        error: str | None,
        response: str | None,
    ) -> None:
        """Record one delivery attempt's result, whatever the row's attempts before it."""
        now = utc(now_s)
        async with self._session() as session:
            await session.execute(
                update(HookDelivery)
                .where(HookDelivery.id == delivery_id)
                .values(
                    state=state,
                    attempts=HookDelivery.attempts + 1,
                    next_attempt_at=utc(next_attempt_s) if next_attempt_s is not None else None,
                    last_status_code=status_code,
                    last_error=error,
                    last_response=response,
                    updated_at=now,
                    delivered_at=now if state == DeliveryState.DELIVERED else None,
                )
            )

    async def revive_deliveries(self, ids: Sequence[int], *, all_dead: bool, now_s: float) -> int:
        """Make dead deliveries pending again, due now; returns how many."""
        cond = HookDelivery.state == DeliveryState.DEAD
        if not all_dead:
            cond = and_(cond, HookDelivery.id.in_(list(ids)))
        async with self._session() as session:
            result = await session.execute(
                update(HookDelivery)
                .where(cond)
                .values(
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=utc(now_s),
                    updated_at=utc(now_s),
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def requeue_deliveries(
        self, ids: Collection[int], *, now_s: float
    ) -> dict[int, DeliveryState | None]:
        """Make the dead deliveries among ``ids`` pending again, due now, in one
        transaction; returns the state each id had before (``None``: no such delivery).
        Pending ones are left as they are: they are queued already."""
        wanted = sorted(set(ids))
        async with self._session() as session:
            rows = await session.execute(
                select(HookDelivery.id, HookDelivery.state).where(HookDelivery.id.in_(wanted))
            )
            before: dict[int, DeliveryState] = {row.id: row.state for row in rows}
            dead = [i for i, state in before.items() if state is DeliveryState.DEAD]
            if dead:
                await session.execute(
                    update(HookDelivery)
                    .where(HookDelivery.id.in_(dead), HookDelivery.state == DeliveryState.DEAD)
                    .values(
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=utc(now_s),
                        updated_at=utc(now_s),
                    )
                )
        return {i: before.get(i) for i in wanted}

    async def pending_delivery_count(self) -> int:
        async with self._session(read_only=True) as session:
            count = await session.scalar(
                select(func.count())
                .select_from(HookDelivery)
                .where(HookDelivery.state == DeliveryState.PENDING)
            )
            return int(count or 0)


def _with_job() -> Select[HookDelivery, Job]:
    return select(HookDelivery, Job).join(Job, Job.id == HookDelivery.job_id)


def _pending(
    skip_ids: Collection[int] = (), skip_hooks: Collection[str] = ()
) -> list[ColumnElement[bool]]:
    """Pending deliveries, but for ``skip_ids`` and those of ``skip_hooks``."""
    conds = [HookDelivery.state == DeliveryState.PENDING]
    if skip_ids:
        conds.append(HookDelivery.id.not_in(list(skip_ids)))
    if skip_hooks:
        conds.append(HookDelivery.hook.not_in(list(skip_hooks)))
    return conds


def _attempt_params(attempt: FinishedAttempt) -> dict[str, Any]:
    at = utc(attempt.finished_at_s)
    delivered = attempt.state is DeliveryState.DELIVERED
    return {
        "b_id": attempt.delivery_id,
        "b_before": attempt.attempt - 1,
        "b_state": attempt.state,
        "b_attempts": attempt.attempt,
        "b_next_attempt_at": (
            utc(attempt.next_attempt_s) if attempt.next_attempt_s is not None else None
        ),
        "b_status_code": attempt.status_code,
        "b_error": attempt.error,
        "b_response": attempt.response,
        "b_updated_at": at,
        "b_delivered_at": at if delivered else None,
    }
