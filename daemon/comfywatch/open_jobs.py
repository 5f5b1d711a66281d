"""The jobs the poller tracks, in memory: by id, by server and prompt, and by deadline.

Loaded once at start and fed with new registrations; a job leaves once its terminal state
is committed. Deadlines (``not_found_after_s``, ``queue_timeout_s``, ``run_timeout_s``)
sit in a heap ordered by time; an entry whose job changed since is skipped when popped
(lazy invalidation), so each deadline costs O(log n) and a tick O(changes).

The heap is on the wall clock, unlike the rest of the poller's scheduling: a deadline is a
decision on stored timestamps (``registered_at``, ``queued_at``, ``started_at``), and the
heap only says when :func:`~comfywatch.tracking.decide` may find one passed. Were the wall
clock set back, the deadline itself would move with it.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from comfywatch.restarts import Mark
from comfywatch.states import JobState
from comfywatch.store import ActiveJob
from comfywatch.tracking import Decision, JobView, Policy
from comfywatch.watch import Tracked


@dataclass
class OpenJob:
    """A tracked job: its database facts and what this process saw of it."""

    job: ActiveJob
    #: When the job was last seen in the queue during this process's life.
    last_seen_at_s: float | None = None
    #: Consecutive queue reads that showed it in neither queue nor history.
    absent_count: int = 0
    #: The server's watch marks when it was last seen in the queue, and first missed since.
    seen_mark: Mark | None = None
    missed_mark: Mark | None = None

    def view(self) -> JobView:
        job = self.job
        return JobView(
            state=job.state,
            registered_at_s=job.registered_at.timestamp(),
            queued_at_s=_ts(job.queued_at),
            started_at_s=_ts(job.started_at),
            last_seen_at_s=self.last_seen_at_s,
            absent_count=self.absent_count,
            seen_mark=self.seen_mark,
            missed_mark=self.missed_mark,
        )


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _dt(value_s: float | None) -> datetime | None:
    return None if value_s is None else datetime.fromtimestamp(value_s, UTC)


def deadline_of(view: JobView, policy: Policy) -> float | None:
    """When the job's next deadline passes (epoch seconds), or ``None``: it has none."""
    if view.state is JobState.RUNNING:
        if policy.run_timeout_s is None:
            return None
        started = view.started_at_s if view.started_at_s is not None else view.registered_at_s
        return started + policy.run_timeout_s
    waiting_since = min(view.queued_at_s or view.registered_at_s, view.registered_at_s)
    candidates = []
    if policy.queue_timeout_s is not None:
        candidates.append(waiting_since + policy.queue_timeout_s)
    if view.state is JobState.REGISTERED:
        candidates.append(view.registered_at_s + policy.not_found_after_s)
    return min(candidates) if candidates else None


class OpenJobs:
    """Every tracked job, indexed three ways."""

    def __init__(self) -> None:
        self._jobs: dict[int, OpenJob] = {}
        self._by_server: defaultdict[str, dict[str, OpenJob]] = defaultdict(dict)
        self._states: defaultdict[str, Counter[JobState]] = defaultdict(Counter)
        self._heap: list[tuple[float, int, int]] = []
        self._version: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[OpenJob]:
        return iter(list(self._jobs.values()))

    def get(self, job_id: int) -> OpenJob | None:
        return self._jobs.get(job_id)

    def on(self, server: str) -> Mapping[str, OpenJob]:
        """The server's jobs by prompt id (a live view: do not hold it across awaits)."""
        return self._by_server.get(server, {})

    def servers(self) -> list[str]:
        return [name for name, jobs in self._by_server.items() if jobs]

    def tracked(self, server: str) -> Tracked:
        states = self._states[server]
        return Tracked(
            unseen=states[JobState.REGISTERED] > 0,
            in_queue=states[JobState.QUEUED] + states[JobState.RUNNING] > 0,
        )

    def add(self, job: ActiveJob) -> bool:
        """Track ``job``; a job already tracked takes the new hooks. True if new."""
        known = self._jobs.get(job.id)
        if known is not None:
            known.job = replace(known.job, hooks=job.hooks)
            return False
        open_job = OpenJob(job)
        self._jobs[job.id] = open_job
        self._by_server[job.server][job.prompt_id] = open_job
        self._states[job.server][job.state] += 1
        return True

    def update(self, job_id: int, decision: Decision) -> None:
        """Carry a non-terminal decision (committed if it changed the state) into memory."""
        open_job = self._jobs[job_id]
        job = open_job.job
        self._states[job.server][job.state] -= 1
        self._states[job.server][decision.state] += 1
        open_job.job = replace(
            job,
            state=decision.state,
            queued_at=job.queued_at or _dt(decision.queued_at_s),
            started_at=job.started_at or _dt(decision.started_at_s),
        )
        open_job.last_seen_at_s = decision.last_seen_at_s
        open_job.absent_count = decision.absent_count
        open_job.seen_mark = decision.seen_mark
        open_job.missed_mark = decision.missed_mark

    def remove(self, job_id: int) -> None:
        open_job = self._jobs.pop(job_id, None)
        if open_job is None:
            return
        job = open_job.job
        self._by_server[job.server].pop(job.prompt_id, None)
        self._states[job.server][job.state] -= 1
        self._version.pop(job_id, None)

    def schedule(self, job_id: int, at_s: float | None) -> None:
        """Set the job's next deadline (``None``: none); the previous one is dropped."""
        version = self._version.get(job_id, 0) + 1
        self._version[job_id] = version
        if at_s is not None:
            heapq.heappush(self._heap, (at_s, job_id, version))

    def due(self, now_s: float) -> dict[str, set[int]]:
        """Pop every deadline that passed, by server."""
        due: defaultdict[str, set[int]] = defaultdict(set)
        while self._heap and self._heap[0][0] <= now_s:
            _, job_id, version = heapq.heappop(self._heap)
            open_job = self._jobs.get(job_id)
            if open_job is not None and self._version.get(job_id) == version:
                due[open_job.job.server].add(job_id)
        return dict(due)
