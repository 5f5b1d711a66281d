"""Housekeeping queries: counts for metrics, and pruning old terminal jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import and_, delete, func, select

from comfywatch.states import ACTIVE_STATES
from comfywatch.store.engine import Database
from comfywatch.store.models import HookDelivery, Job, JobOutput
from comfywatch.store.reads import owes_delivery, prunable
from comfywatch.store.values import StoreStats

_ACTIVE = list(ACTIVE_STATES)
_DAY_S = timedelta(days=1).total_seconds()


def retention_cutoff(now_s: float, days: float) -> float:
    """The epoch time ``days`` before ``now_s``; never before the epoch (a retention longer
    than that, such as ``retention_days = 1e9``, keeps everything)."""
    return max(0.0, now_s - days * _DAY_S)


class UpkeepQueries(Database):
    """Statistics and retention."""

    async def stats(self) -> StoreStats:
        """Counts for metrics: jobs by (server, state), deliveries by (hook, state), and
        the registration time of the oldest active job per (server, state)."""
        async with self._session(read_only=True) as session:
            jobs = await session.execute(
                select(Job.server, Job.state, func.count()).group_by(Job.server, Job.state)
            )
            deliveries = await session.execute(
                select(HookDelivery.hook, HookDelivery.state, func.count()).group_by(
                    HookDelivery.hook, HookDelivery.state
                )
            )
            oldest = await session.execute(
                select(Job.server, Job.state, func.min(Job.registered_at))
                .where(Job.state.in_(_ACTIVE))
                .group_by(Job.server, Job.state)
            )
            return StoreStats(
                jobs={(r[0], r[1]): int(r[2]) for r in jobs},
                deliveries={(r[0], r[1]): int(r[2]) for r in deliveries},
                oldest_active={(r[0], r[1]): r[2] for r in oldest if r[2] is not None},
            )

    async def prune(
        self,
        older_than_s: float,
        *,
        dry_run: bool,
        keep: Collection[tuple[str, str]] = frozenset(),
        batch: int = 500,
    ) -> int:
        """Delete terminal jobs finished before ``older_than_s`` (with outputs and
        deliveries), in small transactions; returns how many (would) go.

        Kept: jobs with pending deliveries, and the (server, prompt_id) pairs in ``keep``:
        jobs still in the configuration, which the next load would register again as new
        (to end as not_found and fire their hooks a second time).
        """
        cond = and_(prunable(older_than_s), ~owes_delivery())
        keep = set(keep)
        total = 0
        after_id = 0
        while True:
            async with self._session(read_only=dry_run) as session:
                rows = (
                    await session.execute(
                        select(Job.id, Job.server, Job.prompt_id)
                        .where(cond, Job.id > after_id)
                        .order_by(Job.id)
                        .limit(batch)
                    )
                ).all()
                if not rows:
                    return total
                after_id = rows[-1].id
                ids = [r.id for r in rows if (r.server, r.prompt_id) not in keep]
                total += len(ids)
                if ids and not dry_run:
                    await session.execute(delete(JobOutput).where(JobOutput.job_id.in_(ids)))
                    await session.execute(delete(HookDelivery).where(HookDelivery.job_id.in_(ids)))
                    await session.execute(delete(Job).where(Job.id.in_(ids)))
            await asyncio.sleep(0)  # let tracking run between batches
