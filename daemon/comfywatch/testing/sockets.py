"""The fake's WebSocket ``/ws``: who is connected, and one task that sends to them in order.

As in ComfyUI, a message goes to one client id (``sid``) or, with ``sid=None``, to every
socket; a client connecting gets a ``status`` message with its ``sid`` first; reusing a
live ``clientId`` silently takes delivery away from the older socket. Messages are
serialised when emitted, so later changes to the data do not show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .stats import client_name

__all__ = ["Broadcaster"]

JSON = Any


@dataclass(frozen=True, slots=True)
class _Socket:
    ws: web.WebSocketResponse
    client: str  # the accounting name (see stats.py)


def _ignore(*_: object) -> None:
    return None


class Broadcaster:
    """Connected sockets by client id, and the sender task (``start()`` / ``stop()``)."""

    def __init__(
        self,
        queue_remaining: Callable[[], int],
        on_sent: Callable[[str, int], object] = _ignore,
    ) -> None:
        """``on_sent(client, byte_count)`` is called for every frame that went out."""
        self._queue_remaining = queue_remaining
        self._on_sent = on_sent
        self._sockets: dict[str, _Socket] = {}
        self._muted = False
        self._outbox: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> int:
        return len(self._sockets)

    def start(self) -> asyncio.Task[None]:
        """Start the sender with an empty outbox (the messages of a dead process are lost)."""
        if self._task is not None:
            raise RuntimeError("the WebSocket sender is already running")
        self._outbox = asyncio.Queue()
        self._task = asyncio.create_task(self._send_loop(), name="fake-comfyui-ws-sender")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def mute(self, muted: bool = True) -> None:
        """Stop (or resume) sending frames while every connection stays open: a stalled
        socket, as happens when a proxy or the server's event loop wedges."""
        self._muted = muted

    def forget_sockets(self) -> None:
        """The listener went away with every connection."""
        self._sockets.clear()

    def emit(self, event: str, data: JSON, sid: str | None, *, broadcast: bool = False) -> None:
        """Queue a message: to ``sid``, or to everyone if there is none and ``broadcast``."""
        if (
            self._task is None
            or not self._sockets
            or self._muted
            or (sid is None and not broadcast)
        ):
            return
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    async def flush(self, timeout_s: float) -> None:
        """Wait until every queued message went out, at most ``timeout_s``."""
        if self._sockets:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), timeout_s)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /ws?clientId=X``: greet with ``status`` and the sid, then keep it open."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = client_name(request)
        self._sockets[sid] = _Socket(ws, client)
        status = {"status": {"exec_info": {"queue_remaining": self._queue_remaining()}}}
        hello = json.dumps({"type": "status", "data": {**status, "sid": sid}})
        with contextlib.suppress(ConnectionError):
            await ws.send_str(hello)
            self._on_sent(client, len(hello))
            async for _message in ws:
                pass  # ComfyUI reads only feature flags from clients
        if (current := self._sockets.get(sid)) is not None and current.ws is ws:
            del self._sockets[sid]
        return ws

    async def _send_loop(self) -> None:
        while True:
            text, sid = await self._outbox.get()
            try:
                if sid is None:
                    targets = list(self._sockets.values())
                else:
                    target = self._sockets.get(sid)
                    targets = [target] if target is not None else []
                for socket in targets:
                    if not socket.ws.closed:
                        with contextlib.suppress(ConnectionError):  # it is going away
                            await socket.ws.send_str(text)
                            self._on_sent(socket.client, len(text))
            finally:
                self._outbox.task_done()
