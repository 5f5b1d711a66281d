"""A webhook receiver on a real port, shared by the hook tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiohttp import web

WAIT_S = 10.0  # upper bound on waiting for an event; never reached when things work


class Receiver:
    """A webhook receiver on a real port: answers with scripted statuses, records requests."""

    def __init__(
        self, statuses: Sequence[int] = (), *, body: bytes = b"ok", hang: bool = False
    ) -> None:
        self.statuses = list(statuses)
        self.body = body
        self.hang = hang
        self.release = asyncio.Event()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.active = 0
        self.max_active = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hook?token=url-secret"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            async with self._changed:
                self.requests.append((dict(request.headers), body))
                self._changed.notify_all()
            if self.hang:
                await self.release.wait()
        finally:
            self.active -= 1
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, body=self.body)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(predicate)
