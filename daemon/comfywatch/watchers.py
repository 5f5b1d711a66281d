"""WebSocket watchers: one task per server that enables it, reporting every event.

Each connection, ``status`` count and disconnection goes to ``on_event(server, kind,
remaining)`` (the poller's watch state of that server), each ``progress`` message to
``on_progress(server, progress)``. A watcher that dies stops the
daemon loudly (see :meth:`QueueWatchers.check`); a stalled one is restarted.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping

from comfywatch.comfy import ComfyClient, SocketEvent
from comfywatch.history import Progress

OnEvent = Callable[[str, SocketEvent, int | None], None]
OnProgress = Callable[[str, Progress], None]


def _ignore(_server: str, _progress: Progress) -> None:
    return None


class QueueWatchers:
    """Runs ``client.watch`` for each server with ``websocket`` on."""

    def __init__(self, on_event: OnEvent, on_progress: OnProgress = _ignore) -> None:
        self._on_event = on_event
        self._on_progress = on_progress
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, clients: Mapping[str, ComfyClient]) -> None:
        for name, client in clients.items():
            if client.settings.websocket:
                self._start(name, client)

    def _start(self, name: str, client: ComfyClient) -> None:
        self._tasks[name] = asyncio.create_task(
            client.watch(
                functools.partial(self._on_event, name),
                functools.partial(self._on_progress, name),
            ),
            name=f"watch-{name}",
        )

    def reconnect(self, name: str, client: ComfyClient) -> None:
        """Close a (stalled) socket and open a new one, with a fresh client id."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self._on_event(name, "disconnected", None)
        self._start(name, client)

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
