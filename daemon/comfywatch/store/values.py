"""What goes into the store and what comes out of it: frozen values, never ORM objects.

A value read from the store stays valid after its transaction (no lazy loading, no
``DetachedInstanceError``). Output records are :class:`~comfywatch.history.OutputRecord` both
ways; :func:`output_columns` is their one mapping to ``job_outputs`` columns and JSON fields.
No SQLAlchemy here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, NamedTuple

from comfywatch.history import HistoryRecord, OutputRecord
from comfywatch.states import DeliveryState, JobState, Reason

# -- into the store --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to register (from a config file)."""

    server: str
    prompt_id: str
    labels: Mapping[str, str]
    hooks: Sequence[str]
    source: str


@dataclass(frozen=True, slots=True)
class Change:
    """One job's new state, as decided for this tick (times in epoch seconds)."""

    job_id: int
    state: JobState
    reason: Reason | None = None
    history: HistoryRecord | None = None
    queued_at_s: float | None = None
    started_at_s: float | None = None
    #: Hooks owed for this change (only for terminal states), created in the same transaction.
    deliveries: Sequence[str] = ()
    #: Why a terminal state was reached, when the reason alone does not say (``jobs.detail``).
    detail: str | None = None
    #: The job's latest progress, written with the change (a terminal change keeps the last).
    progress: ProgressUpdate | None = None


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """A job's latest ``progress`` message, to write into its ``progress_*`` columns."""

    job_id: int
    node: str | None
    value: int
    max: int
    #: When it arrived (epoch seconds, this host's clock).
    at_s: float


@dataclass(frozen=True, slots=True)
class FinishedAttempt:
    """One delivery attempt's result, to record (see :meth:`Store.record_attempts`)."""

    delivery_id: int
    #: This attempt's number (1-based): the row counted ``attempt - 1`` attempts before it.
    attempt: int
    state: DeliveryState
    finished_at_s: float
    next_attempt_s: float | None
    status_code: int | None
    error: str | None
    response: str | None


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs :meth:`Store.jobs` returns; empty ``states`` means any state."""

    states: Sequence[JobState] = ()
    server: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    prompt_id: str | None = None
    limit: int | None = None


# -- out of the store ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveJob:
    """What the poller needs of a non-terminal job."""

    id: int
    server: str
    prompt_id: str
    state: JobState
    registered_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    hooks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobRow:
    """One ``jobs`` row, field for column."""

    id: int
    server: str
    prompt_id: str
    state: JobState
    reason: Reason | None
    status_str: str | None
    completed: bool | None
    number: int | None
    labels: Mapping[str, Any]
    hooks: tuple[str, ...]
    source: str | None
    registered_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    detected_at: datetime | None
    updated_at: datetime
    comfy_created_at_ms: int | None
    comfy_started_at_ms: int | None
    comfy_finished_at_ms: int | None
    error_node_id: str | None
    error_node_type: str | None
    error_exception_type: str | None
    error_exception_message: str | None
    error_traceback: str | None
    #: Why the state was reached when the reason alone does not say it, e.g. "server
    #: unreachable since ...: ..." on a timeout.
    detail: str | None
    #: The last ``progress`` message recorded for the job (see :class:`ProgressUpdate`).
    progress_node: str | None = None
    progress_value: int | None = None
    progress_max: int | None = None
    progress_at: datetime | None = None
    #: The stored history entry; ``None`` too when not asked for (``with_history``): it
    #: holds up to 1 MB.
    history: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One ``hook_deliveries`` row (the outbox), field for column."""

    id: int
    job_id: int
    hook: str
    event_id: str
    event_type: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_response: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    #: With several replicas: the replica sending it now, and until when its claim holds.
    claimed_by: str | None = None
    claimed_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class PruneCandidate:
    """A terminal job that ended before a cutoff: what ``prune`` deletes, unless it still
    owes a hook delivery (or the config lists it, which the store does not know)."""

    server: str
    prompt_id: str
    state: JobState
    ended_at: datetime  # detected_at (else updated_at): what its age is measured from
    owes_delivery: bool


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job with its outputs (and deliveries when asked), as the CLI and hooks show it."""

    job: JobRow
    outputs: tuple[OutputRecord, ...]
    deliveries: tuple[DeliveryRow, ...] = ()


class DeliveryRecord(NamedTuple):
    """A delivery with the job it is owed for."""

    delivery: DeliveryRow
    job: JobRow


class DueDelivery(NamedTuple):
    """A delivery to send, with its job and the job's outputs (all the event needs)."""

    delivery: DeliveryRow
    job: JobRecord


@dataclass(frozen=True, slots=True)
class DueBatch:
    """What :meth:`Store.due_batch` found: due deliveries, oldest first, and when the next
    pending delivery that is neither in the batch nor skipped is due (``None``: none is
    pending; a time already past: more were due than the batch could hold)."""

    deliveries: tuple[DueDelivery, ...]
    next_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts for metrics (see :meth:`Store.stats`)."""

    jobs: Mapping[tuple[str, JobState], int]
    deliveries: Mapping[tuple[str, DeliveryState], int]
    oldest_active: Mapping[tuple[str, JobState], datetime]


# -- output records ----------------------------------------------------------------------------

#: The ``job_outputs`` columns (beside ``id`` and ``job_id``) and JSON fields of an output.
OUTPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(OutputRecord))


def output_columns(out: OutputRecord) -> dict[str, Any]:
    """An output record as ``job_outputs`` columns (a file record keeps no value)."""
    columns = {name: getattr(out, name) for name in OUTPUT_FIELDS}
    if out.is_file:
        columns["value"] = None
    return columns


@dataclass(frozen=True, slots=True)
class Fence:
    """The leases a replica writes under (``[daemon] replicas``): its id, and the epoch of
    each server's lease it holds. A write for a job of a server whose lease has another
    owner or another epoch now is refused (the replica lost it, and another took over)."""

    owner: str
    epochs: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """A live replica, with the leases it holds (``comfywatch replicas``)."""

    id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    expires_at: datetime
    #: Each server it holds, with its epoch and when that lease expires.
    leases: tuple[tuple[str, int, datetime | None], ...]
