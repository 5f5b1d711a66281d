"""The fake's TCP side: binding the port, the aiohttp app and its gate, going down.

One :class:`Listener` is one listening period (``start()``/``come_up()`` to
``stop()``/``go_down()``). The middleware in :func:`build_app` counts every request by
route kind and accounts its cost per client, checks the required headers, and lets an
injected fault answer instead of the handler. Going down closes every connection at
once, as a dying server would.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .faults import FaultInjector, drop
from .routes import MAX_UPLOAD_SIZE, route_kind
from .stats import ServerStats, client_name

__all__ = ["Listener", "bind", "build_app", "close", "serve_on"]

log = logging.getLogger(__name__)

#: Routes outside the ComfyUI API (the fake's own), never counted, faulted or refused.
PRIVATE_PREFIX: Final = "/_fake/"
#: Backstop for handlers that ignore the shutdown signal (they should not exist).
_SHUTDOWN_TIMEOUT_S: Final = 2.0


@dataclass(slots=True)
class Listener:
    """One listening period, from start()/come_up() to stop()/go_down()."""

    runner: web.AppRunner | None = None
    closing: bool = False
    transports: set[asyncio.BaseTransport] = field(default_factory=set)


def build_app(
    listener: Listener,
    routes: list[tuple[str, str, Handler]],
    *,
    requests: collections.Counter[str],
    on_request: Callable[[], object],
    required_headers: Mapping[str, str],
    faults: FaultInjector,
    stats: ServerStats,
    private_routes: Sequence[tuple[str, str, Handler]] = (),
) -> web.Application:
    """The aiohttp app: ``routes`` under ``/`` and ``/api`` behind the gate, and
    ``private_routes`` (``/_fake/...``) beside them, neither counted nor faulted."""

    def answer(request: web.Request, handler: Handler, kind: str) -> Awaitable[web.StreamResponse]:
        return _answer(request, handler, kind, listener, required_headers, faults)

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PRIVATE_PREFIX):
            return await handler(request)
        kind = route_kind(request)
        requests[kind] += 1
        on_request()
        transport = request.transport
        if transport is not None:
            listener.transports.add(transport)
        try:
            if kind == "GET /ws":
                stats.record_connection(client_name(request), kind)
                return await answer(request, handler, kind)
            return await _accounted(stats, request, kind, answer(request, handler, kind))
        finally:
            if transport is not None:
                listener.transports.discard(transport)

    app = web.Application(middlewares=[gate], client_max_size=MAX_UPLOAD_SIZE)
    for method, path, route_handler in routes:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, route_handler)
    for method, path, route_handler in private_routes:
        app.router.add_route(method, path, route_handler)
    return app


async def _answer(
    request: web.Request,
    handler: Handler,
    kind: str,
    listener: Listener,
    required_headers: Mapping[str, str],
    faults: FaultInjector,
) -> web.StreamResponse:
    """The handler's answer, or a refusal, or an injected fault's."""
    if listener.closing:
        drop(request)
        return web.Response(status=503)
    if not all(request.headers.get(k) == v for k, v in required_headers.items()):
        return web.Response(status=401, text="Unauthorized")
    fault = faults.take(kind)
    if fault is None:
        return await handler(request)
    return await faults.apply(fault, kind, request, handler, lambda: listener.closing)


async def _accounted(
    stats: ServerStats,
    request: web.Request,
    kind: str,
    answering: Awaitable[web.StreamResponse],
) -> web.StreamResponse:
    """Await the answer and record what it cost (streamed answers count 0 body bytes)."""
    started_s, started_cpu_s = time.monotonic(), time.thread_time()
    response: web.StreamResponse | None = None
    try:
        response = await answering
        return response
    finally:
        cpu_s = time.thread_time() - started_cpu_s
        body = response.body if isinstance(response, web.Response) else None
        stats.record(
            client_name(request),
            kind,
            response_bytes=len(body) if isinstance(body, bytes) else 0,
            cpu_s=cpu_s,
            started_s=started_s,
            finished_s=time.monotonic(),
        )


async def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (SO_REUSEADDR, so a restart gets the port)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_on(listener: Listener, sock: socket.socket, app: web.Application) -> None:
    """Serve ``app`` on ``sock``; on failure the socket is closed."""
    runner = web.AppRunner(app, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    listener.runner = runner


async def close(listener: Listener) -> None:
    """Drop in-flight requests and WebSockets (a dying server sends nothing more)."""
    listener.closing = True
    for transport in list(listener.transports):
        transport.close()
    listener.transports.clear()
    if listener.runner is not None:
        await listener.runner.cleanup()
    log.debug("fake ComfyUI stopped listening")
