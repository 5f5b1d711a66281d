"""One server's poll: ``GET /queue``, then ``GET /history/{id}`` for the tracked prompts
that are not in the queue (at most ``max_history_fetches`` at a time).

What the server showed comes back as a :class:`ServerPoll`; a failure of the server as a
whole raises :class:`~comfywatch.errors.ServerError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from comfywatch.comfy import ComfyClient
from comfywatch.errors import BadResponse
from comfywatch.history import HistoryRecord, QueueSnapshot


@dataclass(frozen=True, slots=True)
class ServerPoll:
    """What one successful poll of a server showed about the tracked prompts."""

    queue: QueueSnapshot
    #: Per prompt not in the queue whose history was read: its entry (``None``: none).
    histories: Mapping[str, HistoryRecord | None]
    #: Prompts not in the queue whose history entry could not be read this time.
    unreadable: frozenset[str]


async def poll_server(client: ComfyClient, prompt_ids: Collection[str]) -> ServerPoll:
    """Read the queue, then the history of each of ``prompt_ids`` that left it.

    One unreadable history entry does not fail the poll: it is reported in ``unreadable``.
    """
    queue = await client.get_queue()
    waiting = [pid for pid in prompt_ids if pid not in queue.running | queue.pending]
    limit = asyncio.Semaphore(client.settings.max_history_fetches)

    async def fetch(prompt_id: str) -> HistoryRecord | BadResponse | None:
        async with limit:
            try:
                return await client.get_history(prompt_id)
            except BadResponse as exc:
                return exc  # one bad entry must not stall the rest of the server

    fetched = await _gather_or_cancel([fetch(pid) for pid in waiting])
    histories: dict[str, HistoryRecord | None] = {}
    unreadable: set[str] = set()
    for prompt_id, history in zip(waiting, fetched, strict=True):
        if isinstance(history, BadResponse):
            unreadable.add(prompt_id)
        else:
            histories[prompt_id] = history
    return ServerPoll(queue=queue, histories=histories, unreadable=frozenset(unreadable))


async def _gather_or_cancel(
    coros: Sequence[Coroutine[Any, Any, HistoryRecord | BadResponse | None]],
) -> list[HistoryRecord | BadResponse | None]:
    """Run the fetches concurrently; if one fails, cancel the rest before re-raising (no
    request keeps hitting a server that is being backed off)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
