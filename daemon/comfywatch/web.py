"""The optional HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


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
