"""Hook outbox queries: what is due, each attempt's result, listing and reviving deliveries.

Rows are written by :meth:`JobQueries.record` with the terminal state they announce; here
they are claimed for sending (in batches, with all the event needs) and updated after their
attempts (in batches too: one ``executemany`` per transaction).

A claim (``claimed_by``, ``claimed_until``) says which dispatcher sends a delivery, until
when: several daemons on one PostgreSQL database each take due deliveries nobody holds
(``FOR UPDATE SKIP LOCKED``), so each is sent by one of them. A claim is renewed while its
dispatcher holds the delivery, cleared with the attempt's result (recorded only while the
claim is still the recorder's), and taken by another dispatcher once it expires (its
dispatcher died). A daemon that holds the one-daemon lock (PostgreSQL without replicas)
knows that every claim but its own is stale, and ignores them.

Claims are written on PostgreSQL only. A SQLite file has one daemon (its ``flock``), whose
dispatcher's hold in memory is the whole claim: taking deliveries stays a read, which never
waits for the write lock, and the claim columns stay empty.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    true,
    update,
)

from comfywatch.states import DeliveryState
from comfywatch.store.engine import Database
from comfywatch.store.jobs import outputs_by_job
from comfywatch.store.listen import DELIVERIES, notify
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
#: with the attempts counted before it, still claimed by the dispatcher that made it), so
#: applying it twice changes nothing, and neither does a result whose claim was taken over.
_RECORD_ATTEMPT = (
    update(_DELIVERIES)
    .where(
        _DELIVERIES.c.id == bindparam("b_id"),
        _DELIVERIES.c.state == DeliveryState.PENDING,
        _DELIVERIES.c.attempts == bindparam("b_before"),
    )
    .values(
        claimed_by=None,
        claimed_until=None,
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
#: The same, only while the claim is still the recorder's (``b_owner``).
_RECORD_CLAIMED = _RECORD_ATTEMPT.where(
    _DELIVERIES.c.claimed_by.is_not_distinct_from(bindparam("b_owner", type_=String(64)))
)


class DeliveryQueries(Database):
    """Reading and updating ``hook_deliveries``."""

    @property
    def claims_in_database(self) -> bool:
        """Whether claims are written (PostgreSQL: several daemons may share it)."""
        return self.engine.dialect.name == "postgresql"

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
        due_ids: Collection[int] = (),
        owner: str | None = None,
        claim_s: float = 60.0,
    ) -> DueBatch:
        """Up to ``limit`` pending deliveries due at ``now_s``, oldest first, each with its
        job and the job's outputs, and when the next other one is due (or its claim
        expires); in one transaction. ``skip_ids`` and the deliveries of ``skip_hooks`` are
        left out (the hook dispatcher holds them already). ``due_ids`` are due whatever their
        ``next_attempt_at`` says, if still pending (retries whose delay the dispatcher saw
        pass on the monotonic clock).

        With an ``owner``, the deliveries are claimed for it until ``now_s + claim_s``:
        only those nobody else holds (unclaimed, claimed by ``owner`` itself but not held,
        or with an expired claim) are taken, and on PostgreSQL ``FOR UPDATE SKIP LOCKED``
        passes over those another dispatcher is claiming at the same moment."""
        if not self.claims_in_database:
            owner = None  # held in memory only
        now = utc(now_s)
        free = self._claim_free(now, owner)
        due = [*_pending(skip_ids, skip_hooks), free]
        time_has_come = HookDelivery.next_attempt_at <= now
        if due_ids:
            time_has_come = or_(time_has_come, HookDelivery.id.in_(list(due_ids)))
        async with self._session(read_only=owner is None) as session:
            pick = (
                select(HookDelivery.id)
                .where(*due, time_has_come)
                .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
                .limit(limit)
            )
            if owner is not None:
                pick = pick.with_for_update(skip_locked=True)
            taken = list(await session.scalars(pick))
            if taken and owner is not None:
                await session.execute(
                    update(_DELIVERIES)
                    .where(_DELIVERIES.c.id.in_(taken))
                    .values(claimed_by=owner, claimed_until=utc(now_s + claim_s))
                )
            rows = (
                (
                    await session.execute(
                        _with_job()
                        .where(HookDelivery.id.in_(taken))
                        .order_by(HookDelivery.next_attempt_at, HookDelivery.id)
                        .execution_options(populate_existing=True)
                    )
                ).all()
                if taken
                else []
            )
            outputs = await outputs_by_job(session, sorted({job.id for _, job in rows}))
            # Another's claim holds the delivery until it expires: look again then.
            next_at = await session.scalar(
                select(func.min(self._due_at(owner))).where(
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

    def _claim_free(self, now: Any, owner: str | None) -> ColumnElement[bool]:
        """Deliveries no other dispatcher holds: unclaimed, claimed by ``owner`` (not held:
        the caller skips those it holds), or whose claim expired. A daemon holding the
        one-daemon lock is alone: every other claim is stale."""
        if self.sole_daemon:
            return true()
        return or_(
            HookDelivery.claimed_until.is_(None),
            HookDelivery.claimed_until <= now,
            HookDelivery.claimed_by == owner,
        )

    def _due_at(self, owner: str | None) -> ColumnElement[Any]:
        """When a pending delivery can be taken: its due time, or the end of another's
        claim if later."""
        if self.sole_daemon:
            return HookDelivery.next_attempt_at  # type: ignore[return-value]
        return case(
            (
                and_(
                    HookDelivery.claimed_until.is_not(None),
                    HookDelivery.claimed_until > HookDelivery.next_attempt_at,
                    or_(HookDelivery.claimed_by.is_(None), HookDelivery.claimed_by != owner),
                ),
                HookDelivery.claimed_until,
            ),
            else_=HookDelivery.next_attempt_at,
        )

    async def renew_claims(self, owner: str, ids: Collection[int], *, until_s: float) -> int:
        """Extend ``owner``'s claims on the pending deliveries among ``ids`` (those it still
        holds) to ``until_s``; returns how many it still had."""
        if not ids or not self.claims_in_database:
            return 0
        async with self._session() as session:
            result = await session.execute(
                update(_DELIVERIES)
                .where(
                    _DELIVERIES.c.id.in_(sorted(ids)),
                    _DELIVERIES.c.claimed_by == owner,
                    _DELIVERIES.c.state == DeliveryState.PENDING,
                )
                .values(claimed_until=utc(until_s))
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def release_claims(self, owner: str, ids: Collection[int]) -> int:
        """Give up ``owner``'s claims on ``ids`` (claimed, never attempted): another
        dispatcher may take them at once. Returns how many were released."""
        if not ids or not self.claims_in_database:
            return 0
        async with self._session() as session:
            result = await session.execute(
                update(_DELIVERIES)
                .where(_DELIVERIES.c.id.in_(sorted(ids)), _DELIVERIES.c.claimed_by == owner)
                .values(claimed_by=None, claimed_until=None)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                await notify(session, DELIVERIES)
            return int(result.rowcount)  # type: ignore[attr-defined]

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

    async def record_attempts(
        self, attempts: Sequence[FinishedAttempt], *, owner: str | None = None
    ) -> int:
        """Record finished attempts in one transaction, clearing their claims; returns how
        many rows changed.

        A row changes only if it is still pending with the attempts counted before this
        one, and (PostgreSQL) still claimed by ``owner`` (``None``: by nobody): a result
        recorded again
        (after an error whose commit went through anyway) changes nothing the second time,
        and neither does one whose claim another dispatcher took over meanwhile.
        """
        if not attempts:
            return 0
        params = [_attempt_params(attempt) for attempt in attempts]
        statement = _RECORD_ATTEMPT
        if self.claims_in_database:
            statement = _RECORD_CLAIMED
            params = [{**p, "b_owner": owner} for p in params]
        async with self._session() as session:
            if self.engine.dialect.supports_sane_multi_rowcount:
                result = await session.execute(statement, params)
                return int(result.rowcount)  # type: ignore[attr-defined]
            # asyncpg counts no rows of an executemany (-1): one statement per attempt, in
            # the same transaction.
            changed = 0
            for one in params:
                result = await session.execute(statement, one)
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
            result = await session.execute(update(HookDelivery).where(cond).values(_revived(now_s)))
            if result.rowcount:  # type: ignore[attr-defined]
                await notify(session, DELIVERIES)
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
                    .values(_revived(now_s))
                )
                await notify(session, DELIVERIES)
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


def _revived(now_s: float) -> dict[str, Any]:
    """A dead delivery made pending again: due now, its attempts and any stale claim
    cleared."""
    at = utc(now_s)
    return {
        "state": DeliveryState.PENDING,
        "attempts": 0,
        "next_attempt_at": at,
        "updated_at": at,
        "claimed_by": None,
        "claimed_until": None,
    }
