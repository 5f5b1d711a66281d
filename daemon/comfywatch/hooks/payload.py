"""What a hook receives: the event body, its encoding and its Standard Webhooks signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from comfywatch.store import DeliveryRow, JobRecord
from comfywatch.views import iso, job_json


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
