"""The ComfyUI HTTP client: one aiohttp session per server, nothing but transport.

Every transport failure is translated here into a :class:`~comfywatch.errors.ServerError`
subclass; aiohttp exceptions never leave this module. Bodies are size-capped, every request
has explicit connect and read timeouts, and header values (credentials) are never logged.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp

from comfywatch.config import ServerSettings
from comfywatch.errors import BadResponse, ParseError, ServerAuthError, ServerUnavailable
from comfywatch.history import HistoryRecord, QueueSnapshot, parse_history_response, parse_queue

_MAX_REDIRECTS = 3
_CHUNK = 65_536


class ComfyClient:
    """Reads ``/queue`` and ``/history/{id}`` from one ComfyUI server."""

    def __init__(self, settings: ServerSettings, *, user_agent: str = "comfywatch") -> None:
        self.settings = settings
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def _ensure_session(self) -> aiohttp.ClientSession:
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
        if self._session is not None:
            await self._session.close()
            self._session = None

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
            async with session.get(
                url, allow_redirects=True, max_redirects=_MAX_REDIRECTS
            ) as response:
                if response.status in (401, 403):
                    raise ServerAuthError(
                        self.name,
                        f"{route}: HTTP {response.status}: authentication refused "
                        "(check the server's headers in the config)",
                    )
                if response.status != 200:
                    raise BadResponse(self.name, f"{route}: HTTP {response.status}")
                raw = await self._read_capped(response, route)
        except (ServerAuthError, BadResponse):
            raise
        except aiohttp.TooManyRedirects:
            raise BadResponse(self.name, f"{route}: too many redirects") from None
        except TimeoutError:
            raise ServerUnavailable(self.name, f"{route}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerUnavailable(self.name, f"{route}: {_describe(exc)}") from None
        try:
            return json.loads(raw)
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


def _describe(exc: BaseException) -> str:
    """A short description of a transport error, without URLs' credentials or headers."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection broken while reading the body"
    return type(exc).__name__
