"""Decide a job's next state from what its server showed (pure: no I/O, no clock).

``decide(job, seen, now, policy)`` is the whole life cycle of DESIGN.md in one function;
``owed_hooks(hooks, state, hook_states)`` says which hooks a state change owes. The poller
only gathers the observation and carries the decision out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from comfywatch.history import HistoryRecord
from comfywatch.restarts import Mark, vanished
from comfywatch.states import JobState, Reason

#: A prompt must be absent from queue and history this many times in a row to be gone.
ABSENT_CONFIRMATIONS = 2


@dataclass(frozen=True, slots=True)
class JobView:
    """What the tracker knows about one non-terminal job (times in epoch seconds)."""

    state: JobState
    registered_at_s: float
    queued_at_s: float | None = None
    started_at_s: float | None = None
    #: When the job was last seen in the queue during this daemon's life (None: not yet).
    last_seen_at_s: float | None = None
    #: Consecutive successful polls in which the job was in neither queue nor history.
    absent_count: int = 0
    #: The server's watch mark when the job was last seen in the queue (None: not yet),
    #: and when it was first missed since.
    seen_mark: Mark | None = None
    missed_mark: Mark | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    """What one successful poll of the job's server showed about the job."""

    running: bool = False
    pending: bool = False
    history: HistoryRecord | None = None
    #: The server's watch mark for a job seen in the queue by this poll (what was watched
    #: until the poll began, and the restarts it showed).
    sighting: Mark = field(default_factory=Mark)
    #: The server's watch mark after this poll.
    mark: Mark = field(default_factory=Mark)
    #: The job left the queue but its history entry could not be read this time: nothing
    #: is known, except that deadlines still pass.
    unreadable: bool = False
    #: The server could not be reached (no poll at all): why, as a deadline's timeout
    #: records it in ``detail``. Only deadlines pass; nothing becomes lost or not found.
    unreachable: str | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """Deadlines of one server (seconds; ``None`` means no deadline)."""

    not_found_after_s: float
    queue_timeout_s: float | None = None
    run_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The job's state after this poll, and what to record with it."""

    state: JobState
    reason: Reason | None = None
    history: HistoryRecord | None = None
    queued_at_s: float | None = None
    started_at_s: float | None = None
    last_seen_at_s: float | None = None
    absent_count: int = 0
    #: Why the state was reached, when the reason alone does not say (``jobs.detail``).
    detail: str | None = None
    seen_mark: Mark | None = None
    missed_mark: Mark | None = None


def decide(job: JobView, seen: Seen, now_s: float, policy: Policy) -> Decision:
    """The job's next state. Never called for terminal jobs (terminal states never change)."""
    if job.state.terminal:
        raise ValueError(f"decide() called for a terminal job in state {job.state}")
    if seen.history is not None:
        return Decision(
            state=seen.history.outcome,
            reason=Reason.FINISHED,
            history=seen.history,
            queued_at_s=job.queued_at_s,
            started_at_s=job.started_at_s,
            last_seen_at_s=job.last_seen_at_s,
            seen_mark=job.seen_mark,
            missed_mark=job.missed_mark,
        )
    if seen.unreachable is not None:
        return _deadline_only(job, now_s, policy, detail=seen.unreachable)
    if seen.unreadable:
        return _deadline_only(job, now_s, policy)
    if seen.running:
        return _running(job, seen.sighting, now_s, policy)
    if seen.pending:
        return _pending(job, seen.sighting, now_s, policy)
    return _absent(job, seen, now_s, policy)


def _running(job: JobView, mark: Mark, now_s: float, policy: Policy) -> Decision:
    """Seen running: it runs on, unless it has run past its deadline."""
    started = job.started_at_s if job.state is JobState.RUNNING else None
    started = started if started is not None else now_s
    queued = job.queued_at_s if job.queued_at_s is not None else now_s
    if policy.run_timeout_s is not None and now_s - started >= policy.run_timeout_s:
        return Decision(
            JobState.TIMEOUT, Reason.RUN_TIMEOUT, None, queued, started, now_s, seen_mark=mark
        )
    return Decision(JobState.RUNNING, None, None, queued, started, now_s, seen_mark=mark)


def _pending(job: JobView, mark: Mark, now_s: float, policy: Policy) -> Decision:
    """Seen waiting in the queue: it waits on, unless it has waited past its deadline."""
    queued = job.queued_at_s if job.queued_at_s is not None else now_s
    waiting_since = min(queued, job.registered_at_s)
    if policy.queue_timeout_s is not None and now_s - waiting_since >= policy.queue_timeout_s:
        return Decision(
            JobState.TIMEOUT, Reason.QUEUE_TIMEOUT, None, queued, None, now_s, seen_mark=mark
        )
    return Decision(JobState.QUEUED, None, None, queued, None, now_s, seen_mark=mark)


def _absent(job: JobView, seen: Seen, now_s: float, policy: Policy) -> Decision:
    """In neither queue nor history: gone once that was seen twice in a row."""
    absent = job.absent_count + 1
    stay = Decision(
        state=job.state,
        queued_at_s=job.queued_at_s,
        started_at_s=job.started_at_s,
        last_seen_at_s=job.last_seen_at_s,
        absent_count=absent,
        seen_mark=job.seen_mark,
        # The first poll that missed it: a restart after that is no cause of its leaving.
        missed_mark=job.missed_mark if absent > 1 and job.missed_mark else seen.mark,
    )
    if job.state is JobState.REGISTERED:
        past_grace = now_s - job.registered_at_s >= policy.not_found_after_s
        if past_grace and absent >= ABSENT_CONFIRMATIONS:
            return _terminal(stay, JobState.NOT_FOUND, Reason.NEVER_SEEN)
        if policy.queue_timeout_s is not None and (
            now_s - job.registered_at_s >= policy.queue_timeout_s
        ):
            return _terminal(stay, JobState.TIMEOUT, Reason.QUEUE_TIMEOUT)
        return stay
    if absent < ABSENT_CONFIRMATIONS:
        return stay
    lost_reason = vanished(stay.seen_mark, stay.missed_mark, seen.mark)
    if job.state is JobState.RUNNING:
        return _terminal(stay, JobState.LOST, lost_reason or Reason.HISTORY_CLEARED)
    # QUEUED: it left the line without a history entry.
    if lost_reason is not None:
        return _terminal(stay, JobState.LOST, lost_reason)
    return _terminal(stay, JobState.CANCELLED, Reason.DELETED_FROM_QUEUE)


def _deadline_only(
    job: JobView, now_s: float, policy: Policy, *, detail: str | None = None
) -> Decision:
    """Nothing was learnt about the job: it keeps its state unless a deadline passed (a
    timeout then records ``detail``)."""
    stay = Decision(
        state=job.state,
        queued_at_s=job.queued_at_s,
        started_at_s=job.started_at_s,
        last_seen_at_s=job.last_seen_at_s,
        absent_count=job.absent_count,
        seen_mark=job.seen_mark,
        missed_mark=job.missed_mark,
    )
    if job.state is JobState.RUNNING:
        started = job.started_at_s if job.started_at_s is not None else job.registered_at_s
        if policy.run_timeout_s is not None and now_s - started >= policy.run_timeout_s:
            return _terminal(stay, JobState.TIMEOUT, Reason.RUN_TIMEOUT, detail)
        return stay
    waiting_since = min(job.queued_at_s or job.registered_at_s, job.registered_at_s)
    if policy.queue_timeout_s is not None and now_s - waiting_since >= policy.queue_timeout_s:
        return _terminal(stay, JobState.TIMEOUT, Reason.QUEUE_TIMEOUT, detail)
    return stay


def _terminal(
    stay: Decision, state: JobState, reason: Reason, detail: str | None = None
) -> Decision:
    return Decision(
        state=state,
        reason=reason,
        queued_at_s=stay.queued_at_s,
        started_at_s=stay.started_at_s,
        last_seen_at_s=stay.last_seen_at_s,
        absent_count=stay.absent_count,
        detail=detail,
        seen_mark=stay.seen_mark,
        missed_mark=stay.missed_mark,
    )


@dataclass(frozen=True, slots=True)
class OwedHooks:
    """The hook deliveries one state change owes."""

    #: One delivery per name, in the job's order.
    deliveries: tuple[str, ...] = ()
    #: Those of ``deliveries`` whose hook is not configured (for the caller to log).
    unconfigured: tuple[str, ...] = ()


def owed_hooks(
    job_hooks: Sequence[str], state: JobState, hook_states: Mapping[str, Collection[JobState]]
) -> OwedHooks:
    """The deliveries a job owes on reaching ``state``; ``hook_states`` maps each
    configured hook to the states it fires on. Only terminal states owe anything.

    A hook the job names that is no longer configured is still owed: the dispatcher marks
    it dead ("hook not configured") and ``comfywatch hooks retry`` sends it once the hook
    is back.
    """
    if not state.terminal:
        return OwedHooks()
    deliveries: list[str] = []
    unconfigured: list[str] = []
    for name in job_hooks:
        fires_on = hook_states.get(name)
        if fires_on is None:
            unconfigured.append(name)
            deliveries.append(name)
        elif state in fires_on:
            deliveries.append(name)
    return OwedHooks(tuple(deliveries), tuple(unconfigured))
