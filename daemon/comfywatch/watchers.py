"""WebSocket watchers: one task per server that enables it, each a hint to poll it now.

Polling stays the source of truth; a watcher only shortens the time to notice a finished
prompt. A watcher that dies stops the daemon loudly (see :meth:`QueueWatchers.check`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping

from comfywatch.comfy import ComfyClient


class QueueWatchers:
    """Runs ``client.watch_queue`` for each server with ``websocket`` on; calls
    ``hint(server)`` whenever one sees that server's queue shrink."""

    def __init__(self, hint: Callable[[str], None]) -> None:
        self._hint = hint
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, clients: Mapping[str, ComfyClient]) -> None:
        for name, client in clients.items():
            if client.settings.websocket:
                self._tasks[name] = asyncio.create_task(
                    client.watch_queue(functools.partial(self._hint, name)),
                    name=f"watch-{name}",
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def check(self) -> None:
        """Raise if a watcher stopped (its own exception, or a RuntimeError)."""
        for name, task in self._tasks.items():
            if task.done():
                task.result()
                raise RuntimeError(f"websocket watcher for {name} stopped unexpectedly")
