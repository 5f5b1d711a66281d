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
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from comfywatch.config import ServerSettings
from comfywatch.errors import (
    BadResponse,
    ParseError,
    PromptRefused,
    ResponseTooLarge,
    ServerAuthError,
    ServerUnavailable,
)
from comfywatch.history import (
    HistoryRecord,
    Progress,
    PromptQueued,
    QueueSnapshot,
    parse_history_entry,
    parse_history_response,
    parse_progress,
    parse_prompt_queued,
    parse_prompt_refusal,
    parse_queue,
)

_CHUNK = 65_536
#: Bodies larger than this are parsed in a thread, not on the event loop.
THREAD_PARSE_BYTES = 256 * 1024
_WS_HEARTBEAT_S = 30.0
_WS_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_WS_MAX_BACKOFF_S = 60.0

log = structlog.get_logger("comfywatch.comfy")

#: What a WebSocket reports: connected, a ``queue_remaining`` count, disconnected.
SocketEvent = Literal["connected", "count", "disconnected"]
#: Where a WebSocket's ``progress`` messages go.
OnProgress = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class HistoryTail:
    """A ``GET /history?max_items=K`` page: every id, oldest first, and the entries of
    the ids asked for, parsed (those that could not be parsed are in ``unreadable``)."""

    ids: tuple[str, ...]
    records: Mapping[str, HistoryRecord]
    unreadable: frozenset[str]


def _tail_of(body: Any, wanted: Container[str] | None) -> HistoryTail:
    """Read a history page; one bad entry never blocks the others."""
    if not isinstance(body, dict):
        raise ParseError(f"history: expected an object, got {type(body).__name__}")
    ids = tuple(str(prompt_id) for prompt_id in body)
    records: dict[str, HistoryRecord] = {}
    unreadable: set[str] = set()
    for prompt_id, entry in body.items():
        if wanted is not None and prompt_id not in wanted:
            continue
        try:
            records[prompt_id] = parse_history_entry(prompt_id, entry)
        except ParseError:
            unreadable.add(prompt_id)
    return HistoryTail(ids, records, frozenset(unreadable))


def loads(raw: bytes) -> Any:
    """JSON with orjson; NaN and infinities (Python's json.dumps writes them) become null."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw, parse_constant=lambda _name: None)


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

    async def watch(
        self,
        on_event: Callable[[SocketEvent, int | None], None],
        on_progress: OnProgress | None = None,
    ) -> None:
        """Report each connection, every ``status`` count and each disconnection, and
        every ``progress`` message to ``on_progress``.

        ComfyUI broadcasts ``queue_remaining`` to every WebSocket client on each put,
        start, finish (after writing the history entry) and delete; ``progress`` goes to
        the submitter's socket, or to every socket for a prompt submitted without a
        client id. Frames can stop arriving while HTTP works: the poller probes the count
        to notice. Runs until cancelled, reconnecting with backoff, with a fresh client id
        per connection (reusing one silently breaks delivery).
        """
        failures = 0
        while True:
            try:
                await self._watch_once(on_event, on_progress)
                failures = 0
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures += 1
                if failures == 1:
                    log.info("websocket_unavailable", server=self.name, error=type(exc).__name__)
            delay = min(_WS_MAX_BACKOFF_S, 2 ** min(failures, 10))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter

    async def _watch_once(
        self, on_event: Callable[[SocketEvent, int | None], None], on_progress: OnProgress | None
    ) -> None:
        session = self._ensure_session()
        scheme = "wss" if self.settings.url.startswith("https:") else "ws"
        url = f"{scheme}:{self.settings.url.partition(':')[2]}/ws?clientId={uuid.uuid4().hex}"
        async with session.ws_connect(
            url,
            heartbeat=_WS_HEARTBEAT_S,
            max_msg_size=_WS_MAX_MESSAGE_BYTES,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
            autoping=True,
        ) as ws:
            log.debug("websocket_connected", server=self.name)
            on_event("connected", None)
            try:
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        continue  # binary frames are previews
                    news = _read_message(message.data)
                    if isinstance(news, Progress):
                        if on_progress is not None:
                            on_progress(news)
                    elif news is not None:
                        on_event("count", news)
            finally:
                on_event("disconnected", None)

    async def get_queue(self) -> QueueSnapshot:
        body = await self._get_json("/queue")
        try:
            return parse_queue(body)
        except ParseError as exc:
            raise BadResponse(self.name, f"GET /queue: {exc}") from None

    async def get_queue_remaining(self) -> int:
        """``GET /prompt``: pending + running, in a 37-byte answer."""
        body = await self._get_json("/prompt")
        try:
            value = body["exec_info"]["queue_remaining"]
        except (KeyError, TypeError):
            value = None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadResponse(self.name, "GET /prompt: no queue_remaining count")
        return value

    async def get_history_tail(
        self, max_items: int, offset: int | None = None, wanted: Container[str] | None = None
    ) -> HistoryTail:
        """The ``max_items`` newest history entries (or from ``offset``, counted from the
        oldest), oldest first; only the entries of ``wanted`` ids are parsed."""
        path = f"/history?max_items={max_items}"
        if offset is not None:
            path += f"&offset={offset}"
        body = await self._get_json(path)
        try:
            return _tail_of(body, wanted)
        except ParseError as exc:
            raise BadResponse(self.name, f"GET /history: {exc}") from None

    async def get_history(self, prompt_id: str) -> HistoryRecord | None:
        path = "/history/" + quote(prompt_id, safe="")
        body = await self._get_json(path)
        try:
            return parse_history_response(prompt_id, body)
        except ParseError as exc:
            raise BadResponse(self.name, f"GET /history/{{id}}: {exc}") from None

    async def post_prompt(self, graph: Mapping[str, Any], *, prompt_id: str) -> PromptQueued:
        """``POST /prompt`` with ``{"prompt": graph, "prompt_id": prompt_id}`` and no client
        id, so that ComfyUI sends the prompt's progress to every socket.

        ComfyUI 0.3.64 takes the id given; older versions make their own, which the
        answer carries. Raises :class:`PromptRefused` when the server refuses the graph
        (HTTP 400, with its ``error`` and ``node_errors``), a ServerError otherwise. It
        is never retried: a lost answer could mean the prompt was queued.
        """
        body = orjson.dumps({"prompt": graph, "prompt_id": prompt_id})
        status, answer = await self._fetch(
            "POST", "/prompt", "POST /prompt", ok=(200, 400), data=body
        )
        if status == 400:
            refusal = parse_prompt_refusal(answer)
            raise PromptRefused(self.name, refusal.error, refusal.node_errors)
        try:
            return parse_prompt_queued(answer)
        except ParseError as exc:
            raise BadResponse(self.name, f"POST /prompt: {exc}") from None

    async def _get_json(self, path: str) -> Any:
        route = "GET " + path.partition("?")[0]
        if path.startswith("/history/"):
            route = "GET /history/{id}"
        _, body = await self._fetch("GET", path, route, ok=(200,))
        return body

    async def _fetch(
        self, method: str, path: str, route: str, *, ok: Container[int], data: bytes | None = None
    ) -> tuple[int, Any]:
        """One request; the status (one of ``ok``) and the parsed JSON body."""
        session = self._ensure_session()
        url = self.settings.url + path
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            # Redirects are not followed: ComfyUI never sends them, and following one
            # could carry the configured credential headers to another host.
            async with session.request(
                method, url, data=data, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if status in (401, 403):
                    raise ServerAuthError(
                        self.name,
                        f"{route}: HTTP {status}: authentication refused "
                        "(check the server's headers in the config)",
                    )
                if 300 <= status < 400:
                    raise BadResponse(self.name, f"{route}: HTTP {status} redirect (not followed)")
                if status not in ok:
                    raise BadResponse(self.name, f"{route}: HTTP {status}")
                raw = await self._read_capped(response, route)
        except (ServerAuthError, BadResponse):  # ResponseTooLarge included
            raise
        except TimeoutError:
            raise ServerUnavailable(self.name, f"{route}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerUnavailable(self.name, f"{route}: {describe_error(exc)}") from None
        try:
            if len(raw) > THREAD_PARSE_BYTES:
                return status, await asyncio.to_thread(loads, raw)
            return status, loads(raw)
        except (ValueError, RecursionError):
            kind = "HTML" if raw.lstrip()[:1] == b"<" else "non-JSON"
            raise BadResponse(self.name, f"{route}: {kind} body ({len(raw)} bytes)") from None

    async def _read_capped(self, response: aiohttp.ClientResponse, route: str) -> bytes:
        cap = self.settings.max_response_bytes
        if response.content_length is not None and response.content_length > cap:
            raise ResponseTooLarge(
                self.name, f"{route}: body of {response.content_length} bytes exceeds {cap}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise ResponseTooLarge(self.name, f"{route}: body exceeds {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _read_message(text: str) -> int | Progress | None:
    """``queue_remaining`` from a ``status`` message, a ``progress`` message, or ``None``
    for anything else (a malformed message included)."""
    try:
        message = loads(text.encode())
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    if message.get("type") == "progress":
        try:
            return parse_progress(message.get("data"))
        except ParseError:
            return None
    if message.get("type") != "status":
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
