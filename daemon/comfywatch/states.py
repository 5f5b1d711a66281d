"""Job states, the reasons recorded beside terminal ones, and hook delivery states.

Each is a ``StrEnum`` whose values are the lowercase words stored in the database and shown
in JSON (public contract). Pure: no I/O, no SQLAlchemy.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a tracked prompt is in its life cycle; names are part of the public interface."""

    REGISTERED = "registered"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    LOST = "lost"
    NOT_FOUND = "not_found"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {
        JobState.SUCCESS,
        JobState.ERROR,
        JobState.INTERRUPTED,
        JobState.CANCELLED,
        JobState.LOST,
        JobState.NOT_FOUND,
        JobState.TIMEOUT,
    }
)
ACTIVE_STATES: frozenset[JobState] = frozenset(JobState) - TERMINAL_STATES


class Reason(StrEnum):
    """Why a job reached its terminal state (stored in ``jobs.reason``)."""

    FINISHED = "finished"  # a history entry was read; the outcome says the rest
    SERVER_RESTARTED = "server_restarted"
    LEFT_UNOBSERVED = "left_unobserved"  # left the queue while not watched without a gap
    HISTORY_CLEARED = "history_cleared"
    DELETED_FROM_QUEUE = "deleted_from_queue"
    NEVER_SEEN = "never_seen"
    QUEUE_TIMEOUT = "queue_timeout"
    RUN_TIMEOUT = "run_timeout"


class DeliveryState(StrEnum):
    """Where one ``hook_deliveries`` row is (stored in ``hook_deliveries.state``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
