"""What a hook receives: the event body, its encoding and its Standard Webhooks signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from comfywatch.history import OutputRecord
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import DeliveryRow, DueDelivery, JobRecord, JobRow
from comfywatch.views import iso, job_json

#: The ``type`` of the sample events ``comfywatch hooks test`` sends (never a real event's).
TEST_EVENT_TYPE = "job.test"

#: The reason a sample job in each terminal state carries.
_SAMPLE_REASONS = {
    JobState.CANCELLED: Reason.DELETED_FROM_QUEUE,
    JobState.LOST: Reason.SERVER_RESTARTED,
    JobState.NOT_FOUND: Reason.NEVER_SEEN,
    JobState.TIMEOUT: Reason.RUN_TIMEOUT,
}


def sign(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def event_payload(delivery: DeliveryRow, record: JobRecord) -> dict[str, Any]:
    """The event sent for a delivery; ``timestamp`` is when the job's end was recorded, so
    every retry sends the same body."""
    return {
        "type": delivery.event_type,
        "timestamp": iso(delivery.created_at),
        "data": job_json(record),
    }


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact, ASCII-only JSON (any string, even a lone surrogate, encodes)."""
    return json.dumps(payload, separators=(",", ":")).encode("ascii")


def sample_delivery(hook: str, state: JobState, *, server: str, now_s: float) -> DueDelivery:
    """A made-up delivery of a made-up job in ``state`` (terminal) to ``hook``, as
    ``comfywatch hooks test`` sends it: of type :data:`TEST_EVENT_TYPE`, with fresh ids."""
    now = datetime.fromtimestamp(now_s, UTC)
    finished = state in (JobState.SUCCESS, JobState.ERROR, JobState.INTERRUPTED)
    failed = state in (JobState.ERROR, JobState.INTERRUPTED)
    job = JobRow(
        id=0,
        server=server,
        prompt_id=str(uuid.uuid4()),
        state=state,
        reason=Reason.FINISHED if finished else _SAMPLE_REASONS.get(state),
        status_str=("success" if state is JobState.SUCCESS else "error") if finished else None,
        completed=state is JobState.SUCCESS if finished else None,
        number=0 if finished else None,
        labels={},
        hooks=(hook,),
        source="comfywatch hooks test",
        detail=None,
        registered_at=now - timedelta(seconds=3),
        queued_at=now - timedelta(seconds=3),
        started_at=now - timedelta(seconds=2) if finished else None,
        finished_at=now,
        detected_at=now,
        updated_at=now,
        comfy_created_at_ms=None,
        comfy_started_at_ms=None,
        comfy_finished_at_ms=None,
        error_node_id="9" if failed else None,
        error_node_type="SaveImage" if failed else None,
        error_exception_type="Exception" if state is JobState.ERROR else None,
        error_exception_message="a sample error" if state is JobState.ERROR else None,
        error_traceback=None,
    )
    outputs = (
        (
            OutputRecord(
                node_id="9",
                kind="images",
                position=0,
                filename="comfywatch_test_00001_.png",
                subfolder="",
                type="output",
            ),
        )
        if state is JobState.SUCCESS
        else ()
    )
    delivery = DeliveryRow(
        id=0,
        job_id=0,
        hook=hook,
        event_id=f"msg_{uuid.uuid4().hex}",
        event_type=TEST_EVENT_TYPE,
        state=DeliveryState.PENDING,
        attempts=0,
        next_attempt_at=now,
        last_status_code=None,
        last_error=None,
        last_response=None,
        created_at=now,
        updated_at=now,
        delivered_at=None,
    )
    return DueDelivery(delivery, JobRecord(job, outputs))
