"""Carry one tick's decisions out: every change in one transaction, then a log line each.

The hook deliveries a terminal change owes (:func:`comfywatch.tracking.owed_hooks`) are
written in the same transaction as the change, and so is the job's latest progress (the
last one of a finished job, whether or not it was written before). The commit is shielded:
a stop that cancels the tick never cuts it in half, and :meth:`Recorder.wait` lets the
poller wait for it.

Detection lag (``comfywatch_detection_lag_seconds``) runs on this host's monotonic clock,
from when the finish became observable (the socket frame or probe answer that showed the
queue shrink, else the poll's answers) to the end of the commit: never from ComfyUI's own
timestamps, which are on another host's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import structlog

from comfywatch.metrics import Metrics
from comfywatch.progress import ProgressBook
from comfywatch.states import JobState
from comfywatch.store import ActiveJob, Change, Fence, ProgressUpdate, Store
from comfywatch.tracking import Decision, owed_hooks

log = structlog.get_logger("comfywatch.poller")


@dataclass(frozen=True, slots=True)
class Recorded:
    """How many jobs one tick changed, and how many of them finished."""

    changed: int
    finished: int
    #: The ids of the jobs whose change was committed.
    applied: frozenset[int] = frozenset()


class Recorder:
    """Writes decisions to the store and logs (and counts) what was written."""

    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics | None,
        mono: Callable[[], float] = time.monotonic,
        progress: ProgressBook | None = None,
        fence: Callable[[], Fence | None] = lambda: None,
    ) -> None:
        """``fence``: the leases writes are conditional on (``[daemon] replicas``)."""
        self._store = store
        self._fence = fence
        self._metrics = metrics
        self._mono = mono
        self._progress = progress
        self._recording: asyncio.Future[list[int]] | None = None

    async def record(
        self,
        decisions: Sequence[tuple[ActiveJob, Decision]],
        now_s: float,
        hook_states: Mapping[str, Collection[JobState]],
        *,
        observed_at_s: Mapping[str, float] | None = None,
    ) -> Recorded:
        """Record every decision that changes its job's state, in one transaction.
        ``observed_at_s``: per server, when what its poll showed became observable
        (monotonic seconds; detection lag is measured from it)."""
        changes = [
            _change(job, decision, hook_states, self._progress_of(job))
            for job, decision in decisions
            if decision.state is not job.state
        ]
        self._recording = asyncio.ensure_future(
            self._store.record(changes, now_s, fence=self._fence())
        )
        applied = set(await asyncio.shield(self._recording))
        committed_at_s = self._mono()
        observed = observed_at_s or {}
        finished = 0
        for job, decision in decisions:
            if job.id in applied:
                lag_s: float | None = None
                at_s = observed.get(job.server)
                if decision.history is not None and at_s is not None:
                    lag_s = committed_at_s - at_s
                finished += self._log_change(job, decision, lag_s)
        return Recorded(changed=len(applied), finished=finished, applied=frozenset(applied))

    def _progress_of(self, job: ActiveJob) -> ProgressUpdate | None:
        noted = self._progress.latest(job.server, job.prompt_id) if self._progress else None
        if noted is None:
            return None
        p = noted.progress
        return ProgressUpdate(job.id, node=p.node, value=p.value, max=p.max, at_s=noted.at_s)

    async def wait(self) -> None:
        """Wait for a commit in flight (one whose tick was cancelled) to end."""
        if self._recording is not None and not self._recording.done():
            log.info("waiting_for_commit")
            await asyncio.wait({self._recording})

    def _log_change(self, job: ActiveJob, decision: Decision, lag_s: float | None) -> int:
        """Log one applied change; returns 1 if the job finished, else 0. ``lag_s``: its
        detection lag, for a finish read from the history."""
        if not decision.state.terminal:
            log.info(
                "job_state_changed",
                server=job.server,
                prompt_id=job.prompt_id,
                previous=job.state.value,
                state=decision.state.value,
            )
            return 0
        record = decision.history
        duration_s: float | None = None
        if record and record.started_at_ms is not None and record.finished_at_ms is not None:
            duration_s = (record.finished_at_ms - record.started_at_ms) / 1000  # ComfyUI's clock
        log.info(
            "job_finished",
            server=job.server,
            prompt_id=job.prompt_id,
            previous=job.state.value,
            state=decision.state.value,
            reason=decision.reason.value if decision.reason else None,
            duration_s=duration_s,
            outputs=len(record.outputs) if record else 0,
            **({"detail": decision.detail} if decision.detail is not None else {}),
        )
        if self._metrics is not None:
            self._metrics.job_finished(job.server, decision.state, lag_s)
        return 1


def _change(
    job: ActiveJob,
    decision: Decision,
    hook_states: Mapping[str, Collection[JobState]],
    progress: ProgressUpdate | None,
) -> Change:
    owed = owed_hooks(job.hooks, decision.state, hook_states)
    for name in owed.unconfigured:
        log.warning("hook_not_configured", hook=name, server=job.server, prompt_id=job.prompt_id)
    return Change(
        job_id=job.id,
        state=decision.state,
        reason=decision.reason,
        history=decision.history,
        queued_at_s=decision.queued_at_s if job.queued_at is None else None,
        started_at_s=decision.started_at_s if job.started_at is None else None,
        deliveries=owed.deliveries,
        detail=decision.detail,
        progress=progress,
    )
