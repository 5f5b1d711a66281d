"""``FakeComfyUI``: the fake ComfyUI on a port, its life cycle and its faults.

It puts the :class:`~.process.FakeProcess` (queue, history, worker, sockets and what
tests script) behind a listener with the HTTP routes, the fault injector and the
accounting, and offers what happens to a server as a whole: start, stop, restart, go
down and come up, inject faults.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from .faults import Fault, FaultInjector
from .listener import Listener, bind, build_app, close, serve_on
from .process import FakeProcess
from .routes import ComfyRoutes, normalize_route
from .stats import stats_routes

__all__ = ["FakeComfyUI"]

log = logging.getLogger(__name__)

JSON = Any


class FakeComfyUI(FakeProcess):
    """A ComfyUI 0.3.64 look-alike served by aiohttp on a real TCP port.

    Every method is meant to be called from the event loop that runs the server. State
    changes made by the synchronous methods are atomic with respect to HTTP requests.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        run_time_s: float = 0.05,
        required_headers: Mapping[str, str] | None = None,
        progress_steps: int = 4,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {port}")
        super().__init__(run_time_s=run_time_s, progress_steps=progress_steps)
        self._host = host
        self._requested_port = port
        self._bound_port: int | None = None
        self._required_headers = dict(required_headers or {})
        #: Size of the body the ``oversize`` fault sends.
        self.oversize_bytes = 80 * 1024 * 1024
        #: Send the ``oversize`` body chunked instead of with a Content-Length.
        self.oversize_chunked = False
        #: ``slow_drip``: bytes per write and pause between writes.
        self.drip_bytes = 1
        self.drip_interval_s = 0.5
        #: Status of the ``html`` fault's page (a login page on 200, a proxy page otherwise).
        self.html_status = 200
        #: What the ``wrong_shape`` fault answers (valid JSON, not what the route returns).
        self.wrong_shape_body: JSON = ["wrong", "shape"]
        self._faults = FaultInjector(self)
        self._routes = ComfyRoutes(
            self._model, self._outputs, run_time_s=lambda: self.run_time_s, argv=self._argv
        )
        self._listener: Listener | None = None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The TCP port (the one picked at the first start when constructed with 0)."""
        if self._bound_port is not None:
            return self._bound_port
        if self._requested_port:
            return self._requested_port
        raise RuntimeError("FakeComfyUI has no port yet: call start() first")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8188`` (loopback when bound to all addresses)."""
        host = self._host or "127.0.0.1"
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                host = "127.0.0.1" if address.version == 4 else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def is_up(self) -> bool:
        """Whether the server is listening."""
        return self._listener is not None

    async def start(self) -> None:
        """Start the worker and listen (port 0 picks a free port, reused on every restart)."""
        if self._listener is not None:
            raise RuntimeError("FakeComfyUI is already listening")
        started_process = self._start_process()
        try:
            await self._listen()
        except BaseException:
            if started_process:
                await self._stop_process()
            raise

    async def stop(self) -> None:
        """Close every connection and stop the worker. State is kept for inspection.

        A prompt running at stop() stays in ``queue_running``; a later start() runs it
        again from its beginning.
        """
        await self._stop_listening()
        await self._stop_process()
        self._notify()

    async def restart(self) -> None:
        """Like killing the process and starting it again on the same port.

        The queue, the running prompt and the history are forgotten, ``number`` restarts
        at 0, temp files are gone and a held worker is released; output files stay.
        pause(), injected faults and request counts are test controls and stay too.
        """
        await self.go_down(forget=True)
        await self.come_up()

    async def go_down(self, *, forget: bool = False) -> None:
        """Stop listening (connections are dropped, new ones refused).

        With ``forget=False`` the "process" lives on: prompts keep running and finishing
        while nobody can ask. With ``forget=True`` it dies: see :meth:`restart`.
        """
        await self._stop_listening()
        if forget:
            await self._stop_process()
            self._forget()

    async def come_up(self) -> None:
        """Listen again on the same port (and start the worker if it is not running)."""
        await self.start()

    async def _listen(self) -> None:
        port = self._bound_port if self._bound_port is not None else self._requested_port
        sock = await bind(self._host, port)
        self._bound_port = sock.getsockname()[1]
        listener = Listener()
        routes = [*self._routes.table(), ("GET", "/ws", self._sockets.handle)]
        app = build_app(
            listener,
            routes,
            requests=self.requests,
            on_request=self._notify,
            required_headers=self._required_headers,
            faults=self._faults,
            stats=self.stats,
            private_routes=stats_routes(self.stats),
        )
        await serve_on(listener, sock, app)
        self._listener = listener
        log.debug("fake ComfyUI listening on %s", self.url)

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.closing = True
        self._faults.wake()
        self._sockets.forget_sockets()
        await close(listener)

    def _argv(self) -> list[str]:
        """``system.argv`` of ``GET /system_stats``: how this server would have been run."""
        port = str(self.port)
        return ["main.py", "--cpu", "--listen", self._host, "--port", port, "--disable-auto-launch"]

    # ------------------------------------------------------------------ requests and faults

    async def wait_requests(self, route: str, count: int = 1, timeout_s: float = 10) -> None:
        """Wait until ``requests[route]`` reaches ``count`` (counted when a request arrives)."""
        kind = normalize_route(route)
        await self._wait_for(
            lambda: self.requests[kind] >= count,
            timeout_s,
            f"fewer than {count} {kind} requests arrived",
        )

    def inject(self, fault: Fault, *, route: str | None = None, times: int | None = None) -> None:
        """Make requests misbehave, for resilience tests (each fault: see :data:`FAULTS`).

        ``route`` is a kind from :data:`ROUTES` (``"GET /queue"``; an ``/api`` path is
        the same kind), ``None`` for every route. ``times`` limits how many requests the
        fault hits (``None``: until :meth:`clear_faults`). Injections are tried in the
        order they were made; the first matching one applies.
        """
        self._faults.inject(fault, normalize_route(route) if route is not None else None, times)

    def clear_faults(self) -> None:
        """Remove every injected fault; hanging and dripping requests answer normally."""
        self._faults.clear()
