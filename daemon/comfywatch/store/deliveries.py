"""Hook outbox queries: what is due, each attempt's result, listing and reviving deliveries.

Rows are written by :meth:`JobQueries.record` with the terminal state they announce; here
they are read for sending and updated after each attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, and_, func, select, update

from comfywatch.states import DeliveryState
from comfywatch.store.engine import Database
from comfywatch.store.models import HookDelivery, Job
from comfywatch.store.reads import select_deliveries
from comfywatch.store.rows import delivery_row, job_row, utc
from comfywatch.store.values import DeliveryRecord


class DeliveryQueries(Database):
    """Reading and updating ``hook_deliveries``."""

    async def due_deliveries(self, now_s: float, limit: int) -> list[DeliveryRecord]:
        """Pending deliveries whose time has come, oldest first, with their jobs."""
        return await self._delivery_records(
            _with_job()
            .where(
                HookDelivery.state == DeliveryState.PENDING,
                HookDelivery.next_attempt_at <= utc(now_s),
            )
            .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
            .limit(limit)
        )

    async def deliveries(
        self, *, states: Sequence[DeliveryState] = (), limit: int | None = None
    ) -> list[DeliveryRecord]:
        """Deliveries in ``states`` (any if empty), newest first."""
        async with self._session() as session:
            return await session.run_sync(
                lambda s: select_deliveries(s.connection(), states=states, limit=limit)
            )

    async def _delivery_records(self, query: Select[HookDelivery, Job]) -> list[DeliveryRecord]:
        async with self._session() as session:
            return [
                DeliveryRecord(delivery_row(r[0]), job_row(r[1]))
                for r in await session.execute(query)
            ]

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
        """Record one delivery attempt's result."""
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

    async def pending_delivery_count(self) -> int:
        async with self._session() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(HookDelivery)
                .where(HookDelivery.state == DeliveryState.PENDING)
            )
            return int(count or 0)

    async def next_delivery_at_excluding(self, ids: Sequence[int]) -> datetime | None:
        """The earliest next attempt time of pending deliveries other than ``ids``.

        The hook dispatcher passes the deliveries it is sending right now: they are still
        pending (a row changes only after its attempt), so they would always look due.
        """
        cond = HookDelivery.state == DeliveryState.PENDING
        if ids:
            cond = and_(cond, HookDelivery.id.not_in(list(ids)))
        async with self._session() as session:
            return await session.scalar(select(func.min(HookDelivery.next_attempt_at)).where(cond))


def _with_job() -> Select[HookDelivery, Job]:
    return select(HookDelivery, Job).join(Job, Job.id == HookDelivery.job_id)
