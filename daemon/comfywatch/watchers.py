"""WebSocket watchers: one task per server that enables it, reporting every event.

Each connection, ``status`` count and disconnection goes to ``on_event(server, kind,
remaining)`` (the poller's watch state of that server), each ``progress`` message to
``on_progress(server, progress)``. A watcher that dies stops the daemon loudly
(``on_ended`` wakes it, :meth:`QueueWatchers.check` raises what the watcher raised); a
stalled one is restarted. Every watcher's exception is retrieved: by ``check``, or kept by
``stop`` and ``reconnect`` for the next ``check`` (or the caller of ``stop``).
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

    def __init__(
        self,
        on_event: OnEvent,
        on_progress: OnProgress = _ignore,
        on_ended: Callable[[], None] | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_progress = on_progress
        self._on_ended = on_ended
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: What watchers that ended on their own raised, not raised by ``check`` yet.
        self._failures: list[BaseException] = []

    def start(self, clients: Mapping[str, ComfyClient]) -> None:
        for name, client in clients.items():
            if client.settings.websocket:
                self._start(name, client)

    def _start(self, name: str, client: ComfyClient) -> None:
        task = asyncio.create_task(
            client.watch(
                functools.partial(self._on_event, name),
                functools.partial(self._on_progress, name),
            ),
            name=f"watch-{name}",
        )
        if self._on_ended is not None:
            on_ended = self._on_ended
            task.add_done_callback(lambda t: None if t.cancelled() else on_ended())
        self._tasks[name] = task

    def reconnect(self, name: str, client: ComfyClient) -> None:
        """Close a (stalled) socket and open a new one, with a fresh client id."""
        task = self._tasks.pop(name, None)
        if task is not None:
            if task.done():
                self._ended(name, task)
            task.cancel()
        self._on_event(name, "disconnected", None)
        self._start(name, client)

    async def stop(self) -> list[BaseException]:
        """Cancel every watcher; returns what those that had ended on their own raised,
        and what no ``check`` has raised yet (kept for the next ``check``: a reload stops
        the watchers and starts them again)."""
        tasks = dict(self._tasks)
        self._tasks.clear()
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks.values())
        for name, task in tasks.items():
            if not task.cancelled():
                self._ended(name, task)
        return list(self._failures)

    def check(self) -> None:
        """Raise if a watcher stopped (its own exception, or a RuntimeError)."""
        for name, task in list(self._tasks.items()):
            if task.done():
                del self._tasks[name]
                self._ended(name, task)
        if self._failures:
            raise self._failures.pop(0)

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        """Keep what a watcher that ended on its own raised (retrieving it)."""
        exc = None if task.cancelled() else task.exception()
        self._failures.append(
            exc or RuntimeError(f"websocket watcher for {name} stopped unexpectedly")
        )
