"""Webhook hooks: one signed POST per attempt, its answer turned into an :class:`AttemptResult`.

A 2xx answer is a success; 410 Gone is final; anything else (redirects included: they are
not followed), a timeout or a connection error may be retried. aiohttp errors go no further
than here. URLs and header values are never logged.
"""

from __future__ import annotations

import contextlib
import time

import aiohttp

from comfywatch.comfy import describe_error
from comfywatch.config import WebhookHookSettings
from comfywatch.hooks.payload import sign
from comfywatch.hooks.policy import AttemptResult

USER_AGENT = "comfywatch"
#: How much of a webhook receiver's answer is kept in ``last_response``.
RESPONSE_EXCERPT_BYTES = 2048


class WebhookSender:
    """Posts events over one HTTP session (opened on first use) with kept-alive connections.

    The connector sets no limit of its own: the dispatcher's per-hook lanes bound the
    requests in flight (a shared per-host limit would let a slow hook starve another hook
    on the same host).
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session (a later attempt opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def post(self, hook: WebhookHookSettings, event_id: str, body: bytes) -> AttemptResult:
        """POST ``body`` to ``hook``, signed for message ``event_id``."""
        # The signing time is the real wall clock whatever the injected clock says: receivers
        # compare it with their own clocks (Standard Webhooks allows 5 minutes of skew).
        timestamp_s = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        for name, value in hook.headers.items():
            _set_header(headers, name, value)
        _set_header(headers, "webhook-id", event_id)
        _set_header(headers, "webhook-timestamp", str(timestamp_s))
        signature = sign(hook.secret, event_id, timestamp_s, body) if hook.secret else None
        _set_header(headers, "webhook-signature", signature)
        session = self._ensure_session()
        try:
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
                allow_redirects=False,
            ) as response:
                status = response.status
                excerpt = await _read_excerpt(response)
        except TimeoutError:
            return AttemptResult(ok=False, error=f"timed out after {hook.timeout_s:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return AttemptResult(ok=False, error=describe_error(exc))
        if 200 <= status < 300:
            return AttemptResult(ok=True, status_code=status, response=excerpt)
        return AttemptResult(
            ok=False,
            status_code=status,
            error=f"HTTP {status}" + (" (gone: not retried)" if status == 410 else ""),
            response=excerpt,
            final=status == 410,
        )


def _set_header(headers: dict[str, str], name: str, value: str | None) -> None:
    """Set (or, with ``None``, remove) a header, whatever the case of its name."""
    for existing in [n for n in headers if n.lower() == name.lower()]:
        del headers[existing]
    if value is not None:
        headers[name] = value


async def _read_excerpt(response: aiohttp.ClientResponse) -> str | None:
    """The first bytes of a response body; a body that breaks off keeps what arrived."""
    kept = bytearray()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        while len(kept) < RESPONSE_EXCERPT_BYTES:
            chunk = await response.content.read(RESPONSE_EXCERPT_BYTES - len(kept))
            if not chunk:
                break
            kept += chunk
    return kept.decode("utf-8", errors="replace") if kept else None
