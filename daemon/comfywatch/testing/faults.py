"""Fault injection: requests that misbehave the way broken servers and proxies do.

:class:`FaultInjector` keeps the injected faults (which route, how many more times) and
turns a request into the faulty answer. Its knobs (sizes, pauses, the HTML status) are
read from a :class:`FaultSettings` object at the moment a fault applies, so a test can
change them on the fake at any time. :data:`FAULTS` says what each fault does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Literal, Protocol, get_args

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["FAULTS", "Fault", "FaultInjector", "FaultSettings", "drop", "internal_error"]

JSON = Any

#: What ``FakeComfyUI.inject`` can do to a request.
Fault = Literal[
    "http_500",
    "html",
    "wrong_shape",
    "truncated_json",
    "auth_401",
    "auth_403",
    "redirect_loop",
    "slow_drip",
    "hang",
    "reset",
    "oversize",
]
FAULTS: Final[tuple[Fault, ...]] = get_args(Fault)
"""Every :data:`Fault`. What each does to a request:

- ``http_500``: ``500`` text/plain, as ComfyUI answers an unhandled exception.
- ``html``: an HTML page (text/html) with status ``html_status``.
- ``wrong_shape``: ``200`` with ``wrong_shape_body`` as JSON.
- ``truncated_json``: the real answer, cut in half (Content-Length matches).
- ``auth_401`` / ``auth_403``: what an authenticating proxy answers.
- ``redirect_loop``: ``302`` to the same URL, forever.
- ``slow_drip``: the real answer, ``drip_bytes`` every ``drip_interval_s``; the rest goes
  at once when faults are cleared.
- ``hang``: no answer until faults are cleared (then the real one) or the server goes
  down (then the connection is dropped).
- ``reset``: the real answer's headers and half its body, then the connection is closed.
- ``oversize``: a valid JSON object of ``oversize_bytes`` bytes, streamed.

``truncated_json``, ``slow_drip`` and ``reset`` run the real handler (so a ``POST
/prompt`` is queued although the client cannot read the answer); the others answer
without it (nothing is queued, deleted or interrupted).
"""

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_OVERSIZE_CHUNK: Final = b"x" * 65_536


class FaultSettings(Protocol):
    """The knobs of the faults (attributes of ``FakeComfyUI``)."""

    oversize_bytes: int
    oversize_chunked: bool
    drip_bytes: int
    drip_interval_s: float
    html_status: int
    wrong_shape_body: JSON


@dataclass(slots=True)
class _Injection:
    fault: Fault
    route: str | None
    remaining: int | None


def drop(request: web.Request) -> None:
    """Close the connection under a request, as a dying server would."""
    if request.transport is not None:
        request.transport.close()


def internal_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (e.g. on a body that is not JSON)."""
    return web.Response(
        status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
    )


class FaultInjector:
    """Injected faults, tried in the order they were made; the first that matches applies."""

    def __init__(self, settings: FaultSettings) -> None:
        self._settings = settings
        self._injections: list[_Injection] = []
        self._generation = 0  # bumped by clear(): hanging and dripping requests let go
        self._wake = asyncio.Event()  # replaced on clear() and wake()

    def inject(self, fault: Fault, route: str | None, times: int | None) -> None:
        """Add a fault for a route kind (``None``: every route), ``times`` times or for ever."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        self._injections.append(_Injection(fault=fault, route=route, remaining=times))

    def clear(self) -> None:
        """Remove every fault; hanging and dripping requests answer normally."""
        self._injections.clear()
        self._generation += 1
        self.wake()

    def wake(self) -> None:
        """Wake every request that waits in a fault (to look at the server going down)."""
        self._wake.set()
        self._wake = asyncio.Event()

    def take(self, kind: str) -> Fault | None:
        """The fault for a request of this route kind, counting it down, or ``None``."""
        for injection in self._injections:
            if injection.route is None or injection.route == kind:
                if injection.remaining is not None:
                    injection.remaining -= 1
                    if injection.remaining <= 0:
                        self._injections.remove(injection)
                return injection.fault
        return None

    async def apply(
        self,
        fault: Fault,
        kind: str,
        request: web.Request,
        handler: Handler,
        closing: Callable[[], bool],
    ) -> web.StreamResponse:
        """Answer ``request`` with ``fault``; ``closing()`` tells that the server goes down."""
        immediate = self._immediate(fault, request)
        if immediate is not None:
            return immediate
        if fault == "hang":
            generation = self._generation
            while generation == self._generation:
                if closing():
                    drop(request)
                    return web.Response(status=503)
                await self._pause(None)
            return await handler(request)
        if fault == "oversize":
            return await self._send_oversize(request, closing)
        status, content_type, body = await _render(kind, request, handler)
        if fault == "truncated_json":
            return web.Response(
                status=status,
                body=body[: len(body) // 2] or b"{",
                headers={"Content-Type": content_type},
            )
        if fault == "reset":
            return await _send_reset(request, status, content_type, body or b"{}")
        return await self._send_drip(request, status, content_type, body, closing)

    def _immediate(self, fault: Fault, request: web.Request) -> web.Response | None:
        """The answer of a fault that never runs the handler, or ``None``."""
        if fault == "http_500":
            return internal_error()
        if fault == "html":
            status = self._settings.html_status
            return web.Response(status=status, text=_html_page(status), content_type="text/html")
        if fault == "wrong_shape":
            return web.json_response(self._settings.wrong_shape_body)
        if fault == "auth_401":
            return web.Response(status=401, text="Unauthorized")
        if fault == "auth_403":
            return web.Response(status=403, text="Forbidden")
        if fault == "redirect_loop":
            location = str(request.rel_url)
            return web.Response(status=302, text="302: Found", headers={"Location": location})
        return None

    async def _pause(self, timeout_s: float | None) -> None:
        """Sleep until faults are cleared, the server goes down, or ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _send_drip(
        self,
        request: web.Request,
        status: int,
        content_type: str,
        body: bytes,
        closing: Callable[[], bool],
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        response.content_length = len(body)
        generation = self._generation
        step = max(1, self._settings.drip_bytes)
        with contextlib.suppress(ConnectionError):  # the client gave up
            await response.prepare(request)
            sent = 0
            while sent < len(body):
                if closing():
                    drop(request)
                    return response
                if generation != self._generation:
                    step = len(body)  # faults cleared: the rest at once
                await response.write(body[sent : sent + step])
                sent += step
                if sent < len(body) and generation == self._generation:
                    await self._pause(self._settings.drip_interval_s)
            await response.write_eof()
        return response

    async def _send_oversize(
        self, request: web.Request, closing: Callable[[], bool]
    ) -> web.StreamResponse:
        head, tail = b'{"padding": "', b'"}'
        size = max(self._settings.oversize_bytes, len(head) + len(tail))
        response = web.StreamResponse(status=200, headers={"Content-Type": JSON_CONTENT_TYPE})
        if self._settings.oversize_chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        with contextlib.suppress(ConnectionError):  # the client gave up, as it should
            await response.prepare(request)
            await response.write(head)
            remaining = size - len(head) - len(tail)
            while remaining > 0:
                if closing():
                    drop(request)
                    return response
                chunk = _OVERSIZE_CHUNK[: min(remaining, len(_OVERSIZE_CHUNK))]
                await response.write(chunk)
                remaining -= len(chunk)
            await response.write(tail)
            await response.write_eof()
        return response


async def _render(kind: str, request: web.Request, handler: Handler) -> tuple[int, str, bytes]:
    """Status, content type and body of the real answer (the handler runs)."""
    if kind == "GET /ws":
        return 200, JSON_CONTENT_TYPE, b"{}"  # a mangled answer is no upgrade anyway
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        return exc.status, exc.content_type, (exc.text or "").encode()
    body = response.body if isinstance(response, web.Response) else None
    content_type = response.headers.get("Content-Type", JSON_CONTENT_TYPE)
    return response.status, content_type, body if isinstance(body, bytes) else b""


async def _send_reset(
    request: web.Request, status: int, content_type: str, body: bytes
) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    response.content_length = len(body)
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
    drop(request)
    return response


def _html_page(status: int) -> str:
    if status == 200:
        return (
            "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n"
            '<body><form method="post" action="/login"><h1>Please sign in</h1>'
            '<input name="user"><input name="password" type="password"></form></body></html>\n'
        )
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
