"""The optional HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``, on the address of
``[daemon] http``, which a reload may change (:class:`HttpListener`)."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from comfywatch.config.schema import ListenAddress
from comfywatch.errors import StoreError

if TYPE_CHECKING:
    from comfywatch.service import Daemon

#: The loop counts as alive if a tick completed within this many poll intervals.
ALIVE_INTERVALS = 10
ALIVE_MIN_S = 60.0

_DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


async def _metrics(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    body = generate_latest(daemon.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    last = daemon.status.last_tick_monotonic
    limit = max(ALIVE_MIN_S, ALIVE_INTERVALS * daemon.settings.daemon.poll_interval_s)
    if last is None:
        return web.json_response({"status": "starting"}, status=503)
    age = time.monotonic() - last
    if age > limit:
        return web.json_response({"status": "stalled", "last_tick_age_s": age}, status=503)
    return web.json_response({"status": "ok", "last_tick_age_s": round(age, 3)})


async def _readyz(request: web.Request) -> web.Response:
    daemon = request.app[_DAEMON]
    problems: list[str] = []
    if not daemon.status.ready:
        problems.append("not started")
    try:
        current, head = await daemon.store.schema_revision()
        if current != head:
            problems.append(f"schema at {current}, expected {head}")
    except StoreError as exc:
        problems.append(f"database: {exc}")
    body: dict[str, object] = {"status": "not ready" if problems else "ready"}
    if problems:
        body["problems"] = problems
    if daemon.status.reload_error is not None:
        # Still tracking, on the previous configuration: a warning, not a 503.
        body["warnings"] = [
            f"config reload failed, previous configuration kept: {daemon.status.reload_error}"
        ]
    return web.json_response(body, status=503 if problems else 200)


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[_DAEMON] = daemon
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def start_http(daemon: Daemon, host: str, port: int) -> web.AppRunner:
    """Serve the app on ``host:port``; the caller cleans the runner up."""
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


class HttpListener:
    """The endpoints on ``[daemon] http``: started with the daemon, moved to another
    address or stopped by a reload (:meth:`prepare`, then :meth:`HttpMove.commit`)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        #: The address served (``None``: none).
        self.address: ListenAddress | None = None

    async def prepare(self, address: ListenAddress | None) -> HttpMove:
        """Start listening on ``address`` beside the current address; the old one stops
        at the move's commit. Raises OSError (the address is taken, say) and then serves
        as before. Another host on the same port takes the port over at once (both cannot
        be bound), and gives it back if it cannot be bound."""
        if address == self.address:
            return HttpMove(self, self._site, address)
        if address is None:
            return HttpMove(self, None, None)
        if self._runner is None:
            self._runner = web.AppRunner(make_app(self._daemon), access_log=None)
            await self._runner.setup()
        try:
            return HttpMove(self, await self._open(address), address)
        except OSError as exc:
            old = self.address
            if exc.errno != errno.EADDRINUSE or old is None or old.port != address.port:
                raise
        await self._stop_site()
        try:
            return HttpMove(self, await self._open(address), address, old_closed=old)
        except OSError:
            try:
                self._site = await self._open(old)
            except OSError:
                self.address = None  # neither address could be bound
            raise

    async def _open(self, address: ListenAddress) -> web.BaseSite:
        assert self._runner is not None
        site = web.TCPSite(self._runner, address.host, address.port)
        await site.start()
        return site

    async def _stop_site(self) -> None:
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()

    async def close(self) -> None:
        """Stop listening for good."""
        self._site = None
        self.address = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


@dataclass
class HttpMove:
    """A listener's move to a new address, prepared: the new address listens already."""

    listener: HttpListener
    site: web.BaseSite | None
    address: ListenAddress | None
    #: The old address, if preparing had to stop listening there.
    old_closed: ListenAddress | None = None

    async def commit(self) -> None:
        """Serve on the new address only."""
        listener = self.listener
        if self.site is not listener._site:
            await listener._stop_site()
        listener._site, listener.address = self.site, self.address

    async def rollback(self) -> None:
        """Serve on the old address only, as before :meth:`HttpListener.prepare`."""
        listener = self.listener
        if self.site is not None and self.site is not listener._site:
            await self.site.stop()
        if self.old_closed is not None:
            listener._site = await listener._open(self.old_closed)
