"""The JSON shapes of jobs and deliveries (``show --json``, ``jobs --json``, webhook data).

These field names are a public contract: scripts and webhook receivers depend on them.
They are built from the store's values, never from database rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from comfywatch.history import OutputRecord
from comfywatch.store import DeliveryRow, JobRecord, JobRow, output_columns


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, or ``None``."""
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def output_json(out: OutputRecord) -> dict[str, Any]:
    """An output as its stored columns, without a file's (empty) value or an empty extra."""
    data = output_columns(out)
    if out.is_file:
        del data["value"]
    if not data["extra"]:
        del data["extra"]
    return data


def error_json(job: JobRow) -> dict[str, Any] | None:
    fields = (
        job.error_node_id,
        job.error_node_type,
        job.error_exception_type,
        job.error_exception_message,
        job.error_traceback,
    )
    if all(f is None for f in fields):
        return None
    return {
        "node_id": job.error_node_id,
        "node_type": job.error_node_type,
        "exception_type": job.error_exception_type,
        "exception_message": job.error_exception_message,
        "traceback": job.error_traceback,
    }


def progress_json(job: JobRow) -> dict[str, Any] | None:
    """The last ``progress`` message recorded for the job, or ``None``."""
    if job.progress_value is None or job.progress_max is None:
        return None
    return {
        "node": job.progress_node,
        "value": job.progress_value,
        "max": job.progress_max,
        "at": iso(job.progress_at),
    }


def job_json(record: JobRecord, *, deliveries: bool = False) -> dict[str, Any]:
    """One job as an object; ``deliveries`` adds its hook deliveries (for ``show``)."""
    job = record.job
    data: dict[str, Any] = {
        "server": job.server,
        "prompt_id": job.prompt_id,
        "state": job.state.value,
        "reason": job.reason.value if job.reason is not None else None,
        "status_str": job.status_str,
        "completed": job.completed,
        "number": job.number,
        "registered_at": iso(job.registered_at),
        "queued_at": iso(job.queued_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "detected_at": iso(job.detected_at),
        "comfy_created_at_ms": job.comfy_created_at_ms,
        "comfy_started_at_ms": job.comfy_started_at_ms,
        "comfy_finished_at_ms": job.comfy_finished_at_ms,
        "labels": dict(job.labels),
        "hooks": list(job.hooks),
        "error": error_json(job),
        "detail": job.detail,
        "progress": progress_json(job),
        "outputs": [output_json(out) for out in record.outputs],
    }
    if deliveries:
        data["deliveries"] = [delivery_json(d, job) for d in record.deliveries]
    return data


def delivery_json(delivery: DeliveryRow, job: JobRow) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "hook": delivery.hook,
        "server": job.server,
        "prompt_id": job.prompt_id,
        "job_state": job.state.value,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "last_response": delivery.last_response,
        "created_at": iso(delivery.created_at),
        "delivered_at": iso(delivery.delivered_at),
    }
