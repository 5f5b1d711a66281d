"""The ORM classes, mapped onto the Core tables of :mod:`comfywatch.store.tables` (where the
columns and indexes are declared): what the daemon's queries use.

Only the store uses them; what it hands out are the values of :mod:`comfywatch.store.values`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, deferred

from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import tables
from comfywatch.store.tables import NAMING, EnumString, UTCDateTime, render_type

__all__ = [
    "NAMING",
    "Base",
    "EnumString",
    "HookDelivery",
    "Job",
    "JobOutput",
    "UTCDateTime",
    "render_type",
]


class Base(DeclarativeBase):
    metadata = tables.metadata


class Job(Base):
    """One tracked prompt: a (server, prompt_id) pair and everything learnt about it."""

    __table__ = tables.jobs

    id: Mapped[int]
    server: Mapped[str]
    prompt_id: Mapped[str]
    state: Mapped[JobState]
    reason: Mapped[Reason | None]
    status_str: Mapped[str | None]
    completed: Mapped[bool | None]
    number: Mapped[int | None]
    labels: Mapped[dict[str, Any]]
    hooks: Mapped[list[Any]]
    source: Mapped[str | None]

    registered_at: Mapped[datetime]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    detected_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    comfy_created_at_ms: Mapped[int | None]
    comfy_started_at_ms: Mapped[int | None]
    comfy_finished_at_ms: Mapped[int | None]

    error_node_id: Mapped[str | None]
    error_node_type: Mapped[str | None]
    error_exception_type: Mapped[str | None]
    error_exception_message: Mapped[str | None]
    error_traceback: Mapped[str | None]

    detail: Mapped[str | None]
    progress_node: Mapped[str | None]
    progress_value: Mapped[int | None]
    progress_max: Mapped[int | None]
    progress_at: Mapped[datetime | None]

    #: Up to 1 MB per job: loaded only when asked for (``Store.jobs(with_history=True)``).
    history: Mapped[dict[str, Any] | None] = deferred(tables.jobs.c.history)


class JobOutput(Base):
    """One output record of a finished job: a file (image, video, ...) or a plain value."""

    __table__ = tables.job_outputs

    id: Mapped[int]
    job_id: Mapped[int]
    node_id: Mapped[str]
    kind: Mapped[str]
    position: Mapped[int]
    filename: Mapped[str | None]
    subfolder: Mapped[str | None]
    type: Mapped[str | None]
    value: Mapped[Any | None]
    extra: Mapped[dict[str, Any] | None]


class HookDelivery(Base):
    """One completion hook owed for one terminal job (the outbox)."""

    __table__ = tables.hook_deliveries

    id: Mapped[int]
    job_id: Mapped[int]
    hook: Mapped[str]
    event_id: Mapped[str]
    event_type: Mapped[str]
    state: Mapped[DeliveryState]
    attempts: Mapped[int]
    next_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None]
    last_response: Mapped[str | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None]
    claimed_until: Mapped[datetime | None]
