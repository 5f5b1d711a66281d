"""One server's poll: the requests its :class:`~comfywatch.watch.ServerWatch` says are due.

In order: ``GET /prompt`` (the count), ``GET /history?max_items=K`` (the tail, grown until
it overlaps what was seen before), ``GET /queue`` (only when the watch asks for it), then
the history of the tracked prompts the queue no longer shows: ``GET /history/{id}`` when
few, pages of ``GET /history`` when many. What the server showed comes back as a
:class:`ServerPoll`; a failure of the server as a whole raises
:class:`~comfywatch.errors.ServerError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comfywatch.comfy import ComfyClient
from comfywatch.errors import BadResponse, ResponseTooLarge
from comfywatch.history import HistoryRecord, QueueSnapshot
from comfywatch.watch import ServerWatch, Tracked

#: What the poller tracks on the server, asked again after each answer.
TrackedNow = Callable[[], Tracked]

#: Entries per page when many prompts must be looked for in the whole history.
HISTORY_PAGE = 256
#: More absent prompts than max_history_fetches times this: page the history instead.
PER_ID_FACTOR = 4


@dataclass(frozen=True, slots=True)
class ServerPoll:
    """What one successful poll of a server showed about the tracked prompts."""

    #: The queue, when it was read (``None``: not asked, or too large to read).
    queue: QueueSnapshot | None = None
    queue_too_large: bool = False
    #: Per prompt looked for: its history entry (``None``: looked for, none there).
    histories: Mapping[str, HistoryRecord | None] = field(default_factory=dict)
    #: Prompts whose history entry could not be read this time.
    unreadable: frozenset[str] = frozenset()
    #: The requests made, per kind (``probe``, ``tail``, ``queue``, ``history``, ``page``).
    requests: Mapping[str, int] = field(default_factory=dict)
    #: When what this poll shows became observable (monotonic seconds): the arrival of the
    #: socket frame or probe answer that showed the count change, else of the last answer.
    observed_at_s: float = 0.0
    #: The ids of the last history tail read (``None``: none was), and whether it came back
    #: shorter than asked, so that it holds the whole history.
    tail: tuple[str, ...] | None = None
    tail_whole: bool = False


@dataclass
class _Found:
    histories: dict[str, HistoryRecord | None] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    requests: dict[str, int] = field(default_factory=dict)
    tail: tuple[str, ...] | None = None
    tail_whole: bool = False

    def count(self, kind: str, n: int = 1) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + n

    def poll(
        self,
        queue: QueueSnapshot | None,
        *,
        too_large: bool = False,
        changed_at_s: float | None,
        mono: Callable[[], float],
    ) -> ServerPoll:
        return ServerPoll(
            queue,
            too_large,
            self.histories,
            frozenset(self.unreadable),
            self.requests,
            observed_at_s=mono() if changed_at_s is None else changed_at_s,
            tail=self.tail,
            tail_whole=self.tail_whole,
        )


async def poll_server(
    client: ComfyClient,
    watch: ServerWatch,
    prompt_ids: Collection[str],
    tracked: TrackedNow,
    mono: Callable[[], float],
    *,
    interval: bool,
    recheck: Collection[str] = (),
) -> ServerPoll:
    """Make the requests the watch says are due, feeding it each answer (``mono``: the
    monotonic clock). ``recheck``: prompts whose entry could not be read before, asked
    again at each poll interval."""
    found = _Found()
    now_s = mono()
    changed_at_s = watch.take_change()  # the frames that led to this poll
    plan = watch.plan(now_s, tracked(), interval=interval)
    if plan.probe and (watch.socket_up or not plan.queue):
        found.count("probe")
        remaining = await client.get_queue_remaining()
        watch.probed(remaining, mono())
        if changed_at_s is None:
            changed_at_s = watch.take_change()
        plan = watch.plan(now_s, tracked(), interval=interval)
    if plan.tail is not None:
        await _read_tail(client, watch, prompt_ids, tracked, plan.tail, found)
        plan = watch.plan(now_s, tracked(), interval=interval)
    if interval and recheck:
        await _fetch_each(client, [p for p in recheck if p not in found.histories], found)
    if not plan.queue:
        return found.poll(None, changed_at_s=changed_at_s, mono=mono)
    found.count("queue")
    try:
        queue = await client.get_queue()
    except ResponseTooLarge:
        watch.queue_read(None, now_s)
        return found.poll(None, too_large=True, changed_at_s=changed_at_s, mono=mono)
    watch.queue_read(len(queue.running | queue.pending), now_s)
    in_queue = queue.running | queue.pending
    absent = [pid for pid in prompt_ids if pid not in in_queue and pid not in found.histories]
    absent = [pid for pid in absent if pid not in found.unreadable]
    if len(absent) <= client.settings.max_history_fetches * PER_ID_FACTOR:
        await _fetch_each(client, absent, found)
    else:
        await _page_history(client, set(absent), found)
    return found.poll(queue, changed_at_s=changed_at_s, mono=mono)


async def _read_tail(
    client: ComfyClient,
    watch: ServerWatch,
    prompt_ids: Collection[str],
    tracked: TrackedNow,
    asked: int,
    found: _Found,
) -> None:
    """Read the newest entries, more each time until they overlap the ones seen before."""
    while True:
        drops = watch.drops
        found.count("tail")
        tail = await client.get_history_tail(asked, wanted=prompt_ids)
        found.histories.update(tail.records)
        found.unreadable |= tail.unreadable
        found.tail, found.tail_whole = tail.ids, len(tail.ids) < asked
        verdict = watch.tail_read(tail.ids, asked, tracked(), drops_asked=drops)
        if verdict.grow_to is None:
            return
        asked = verdict.grow_to


async def _fetch_each(client: ComfyClient, prompt_ids: Sequence[str], found: _Found) -> None:
    """``GET /history/{id}`` for each (at most ``max_history_fetches`` at a time)."""
    limit = asyncio.Semaphore(client.settings.max_history_fetches)

    async def fetch(prompt_id: str) -> HistoryRecord | BadResponse | None:
        async with limit:
            try:
                return await client.get_history(prompt_id)
            except BadResponse as exc:
                return exc  # one bad entry must not stall the rest of the server

    fetched = await _gather_or_cancel([fetch(pid) for pid in prompt_ids])
    found.count("history", len(prompt_ids))
    for prompt_id, history in zip(prompt_ids, fetched, strict=True):
        if isinstance(history, BadResponse):
            found.unreadable.add(prompt_id)
        else:
            found.histories[prompt_id] = history


async def _page_history(client: ComfyClient, wanted: set[str], found: _Found) -> None:
    """Page through the whole history, oldest first, until every wanted prompt is found."""
    missing = set(wanted)
    offset = 0
    while missing:
        found.count("page")
        page = await client.get_history_tail(HISTORY_PAGE, offset=offset, wanted=wanted)
        found.histories.update(page.records)
        found.unreadable |= page.unreadable
        missing -= page.records.keys() | page.unreadable
        if len(page.ids) < HISTORY_PAGE:
            break
        offset += len(page.ids)
    for prompt_id in missing:
        found.histories[prompt_id] = None


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
