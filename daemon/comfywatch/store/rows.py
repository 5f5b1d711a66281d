"""Conversions at the store's edge: ORM rows into frozen values, epoch times into datetimes.

Called inside a session, so that no value depends on one afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from comfywatch.store.values import DeliveryRow, JobRow

if TYPE_CHECKING:  # the ORM only where its objects are converted (not the Core reads)
    from comfywatch.store.models import HookDelivery, Job

T = TypeVar("T")


def utc(ts_s: float) -> datetime:
    return datetime.fromtimestamp(ts_s, tz=UTC)


def utc_ms(ts_ms: int | None) -> datetime | None:
    if ts_ms is None:
        return None
    try:
        return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def job_row(job: Job, *, with_history: bool = False) -> JobRow:
    """``job`` as a value; its (deferred) history only if it was loaded (``with_history``)."""
    return JobRow(
        id=job.id,
        server=job.server,
        prompt_id=job.prompt_id,
        state=job.state,
        reason=job.reason,
        status_str=job.status_str,
        completed=job.completed,
        number=job.number,
        labels=dict(job.labels or {}),
        hooks=tuple(str(h) for h in (job.hooks or [])),
        source=job.source,
        registered_at=job.registered_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        detected_at=job.detected_at,
        updated_at=job.updated_at,
        comfy_created_at_ms=job.comfy_created_at_ms,
        comfy_started_at_ms=job.comfy_started_at_ms,
        comfy_finished_at_ms=job.comfy_finished_at_ms,
        error_node_id=job.error_node_id,
        error_node_type=job.error_node_type,
        error_exception_type=job.error_exception_type,
        error_exception_message=job.error_exception_message,
        error_traceback=job.error_traceback,
        detail=job.detail,
        progress_node=job.progress_node,
        progress_value=job.progress_value,
        progress_max=job.progress_max,
        progress_at=job.progress_at,
        history=job.history if with_history else None,
    )


def delivery_row(delivery: HookDelivery) -> DeliveryRow:
    return DeliveryRow(
        id=delivery.id,
        job_id=delivery.job_id,
        hook=delivery.hook,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        state=delivery.state,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        last_response=delivery.last_response,
        created_at=delivery.created_at,
        updated_at=delivery.updated_at,
        delivered_at=delivery.delivered_at,
    )


def chunks(items: Sequence[T], size: int = 500) -> Iterable[Sequence[T]]:
    """``items`` in slices of ``size`` (bounded ``IN (...)`` lists)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
