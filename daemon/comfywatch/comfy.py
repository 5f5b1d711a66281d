"""The ComfyUI HTTP client: one aiohttp session per server, nothing but transport.

Every transport failure is translated here into a :class:`~comfywatch.errors.ServerError`
subclass; aiohttp exceptions never leave this module. Bodies are size-capped, every request
has explicit connect and read timeouts, and header values (credentials) are never logged.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from comfywatch.config import ServerSettings
from comfywatch.errors import BadResponse, ParseError, ServerAuthError, ServerUnavailable
from comfywatch.history import HistoryRecord, QueueSnapshot, parse_history_response, parse_queue

_CHUNK = 65_536
_WS_HEARTBEAT_S = 30.0
_WS_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_WS_MAX_BACKOFF_S = 60.0

log = structlog.get_logger("comfywatch.comfy")


class ComfyClient:
    """Reads ``/queue`` and ``/history/{id}`` from one ComfyUI server."""

    def __init__(self, settings: ServerSettings, *, user_agent: str = "comfywatch") -> None:
        self.settings = settings
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def name(self) -> str:
        return self.settings.name

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ServerUnavailable(self.name, "client closed")
        if self._session is None or self._session.closed:
            timeout_s = self.settings.request_timeout_s
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": self._user_agent, **dict(self.settings.headers)},
                timeout=aiohttp.ClientTimeout(
                    total=timeout_s, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
                ),
                connector=aiohttp.TCPConnector(
                    limit=self.settings.max_history_fetches + 1, ttl_dns_cache=60
                ),
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def watch_queue(self, on_drain: Callable[[], None]) -> None:
        """Call ``on_drain`` whenever ComfyUI's ``status`` broadcast shows the queue shrink.

        A prompt that finished (or was deleted) shrinks the queue, and ComfyUI broadcasts
        the new size to every WebSocket client after writing the history entry. This is
        only a hint to poll now: frames can stop arriving while HTTP works, so polling
        stays the source of truth. Runs until cancelled, reconnecting with backoff, with a
        fresh client id per connection (reusing one silently breaks delivery).
        """
        failures = 0
        while True:
            try:
                await self._watch_once(on_drain)
                failures = 0
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures += 1
                if failures == 1:
                    log.info("websocket_unavailable", server=self.name, error=type(exc).__name__)
            delay = min(_WS_MAX_BACKOFF_S, 2 ** min(failures, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter

    async def _watch_once(self, on_drain: Callable[[], None]) -> None:
        session = self._ensure_session()
        scheme = "wss" if self.settings.url.startswith("https:") else "ws"
        url = f"{scheme}:{self.settings.url.partition(':')[2]}/ws?clientId={uuid.uuid4().hex}"
        last: int | None = None
        async with session.ws_connect(
            url,
            heartbeat=_WS_HEARTBEAT_S,
            max_msg_size=_WS_MAX_MESSAGE_BYTES,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
            autoping=True,
        ) as ws:
            log.debug("websocket_connected", server=self.name)
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    continue  # binary frames are previews
                remaining = _queue_remaining(message.data)
                if remaining is None:
                    continue
                if last is not None and remaining < last:
                    on_drain()
                last = remaining

    async def get_queue(self) -> QueueSnapshot:
        body = await self._get_json("/queue")
        try:
            return parse_queue(body)
        except ParseError as exc:
            raise BadResponse(self.name, f"GET /queue: {exc}") from None

    async def get_history(self, prompt_id: str) -> HistoryRecord | None:
        path = "/history/" + quote(prompt_id, safe="")
        body = await self._get_json(path)
        try:
            return parse_history_response(prompt_id, body)
        except ParseError as exc:
            raise BadResponse(self.name, f"GET /history/{{id}}: {exc}") from None

    async def _get_json(self, path: str) -> Any:
        session = self._ensure_session()
        url = self.settings.url + path
        route = "GET " + (path if not path.startswith("/history/") else "/history/{id}")
        try:
            # Redirects are not followed: ComfyUI never sends them, and following one
            # could carry the configured credential headers to another host.
            async with session.get(url, allow_redirects=False) as response:
                if response.status in (401, 403):
                    raise ServerAuthError(
                        self.name,
                        f"{route}: HTTP {response.status}: authentication refused "
                        "(check the server's headers in the config)",
                    )
                if 300 <= response.status < 400:
                    raise BadResponse(
                        self.name, f"{route}: HTTP {response.status} redirect (not followed)"
                    )
                if response.status != 200:
                    raise BadResponse(self.name, f"{route}: HTTP {response.status}")
                raw = await self._read_capped(response, route)
        except (ServerAuthError, BadResponse):
            raise
        except TimeoutError:
            raise ServerUnavailable(self.name, f"{route}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerUnavailable(self.name, f"{route}: {describe_error(exc)}") from None
        try:
            # NaN and infinities (Python's json.dumps writes them) become null.
            return json.loads(raw, parse_constant=lambda _name: None)
        except (ValueError, RecursionError):
            kind = "HTML" if raw.lstrip()[:1] == b"<" else "non-JSON"
            raise BadResponse(self.name, f"{route}: {kind} body ({len(raw)} bytes)") from None

    async def _read_capped(self, response: aiohttp.ClientResponse, route: str) -> bytes:
        cap = self.settings.max_response_bytes
        if response.content_length is not None and response.content_length > cap:
            raise BadResponse(
                self.name, f"{route}: body of {response.content_length} bytes exceeds {cap}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise BadResponse(self.name, f"{route}: body exceeds {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _queue_remaining(text: str) -> int | None:
    """``queue_remaining`` from a ``status`` message, or ``None`` for anything else."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("type") != "status":
        return None
    try:
        value = message["data"]["status"]["exec_info"]["queue_remaining"]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe_error(exc: BaseException) -> str:
    """A short description of a transport or OS error, without URLs or header values
    (shared by the ComfyUI client and the webhook sender)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection broken while reading the body"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:300]
    return type(exc).__name__
