"""The deliveries the dispatcher holds, in one lane per hook: those claimed from the outbox
and waiting for a slot, and the attempts running. Each hook has ``per_hook`` slots of its
own, so a slow receiver only ever holds its own slots and never delays another hook.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any

import structlog

from comfywatch.hooks.attempt import Outcome
from comfywatch.store import DueDelivery

Attempt = Callable[[DueDelivery], Coroutine[Any, Any, Outcome]]

log = structlog.get_logger("comfywatch.hooks")


class Lanes:
    """Claimed deliveries waiting, per hook, and the attempt tasks running."""

    def __init__(self, per_hook: int, *, on_done: Callable[[], None]) -> None:
        if per_hook < 1:
            raise ValueError("per_hook must be at least 1")
        #: The slots of each hook; a reload may change it at any time (attempts beyond a
        #: lowered bound run to their end, and no other starts until they have).
        self.per_hook = per_hook
        self._on_done = on_done
        self._waiting: dict[str, deque[DueDelivery]] = {}
        self._running: Counter[str] = Counter()
        self._tasks: dict[int, tuple[str, asyncio.Task[Outcome]]] = {}

    @property
    def running(self) -> int:
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        return sum(len(lane) for lane in self._waiting.values())

    def add(self, batch: Iterable[DueDelivery]) -> None:
        """Claimed deliveries, to start when their hooks have free slots."""
        for due in batch:
            self._waiting.setdefault(due.delivery.hook, deque()).append(due)

    def full_hooks(self) -> set[str]:
        """Hooks with enough deliveries waiting to fill all their slots again: the outbox
        need not be asked for more of theirs yet."""
        return {hook for hook, lane in self._waiting.items() if len(lane) >= self.per_hook}

    def held_ids(self, *, except_hooks: Collection[str] = ()) -> list[int]:
        """The deliveries waiting or running (but for those of ``except_hooks``)."""
        ids = [
            due.delivery.id
            for hook, lane in self._waiting.items()
            if hook not in except_hooks
            for due in lane
        ]
        ids.extend(i for i, (hook, _) in self._tasks.items() if hook not in except_hooks)
        return ids

    def start(self, attempt: Attempt) -> int:
        """Start waiting deliveries in the free slots of their hooks; how many started."""
        started = 0
        for hook, lane in list(self._waiting.items()):
            while lane and self._running[hook] < self.per_hook:
                due = lane.popleft()
                task = asyncio.create_task(attempt(due), name=f"hook-delivery-{due.delivery.id}")
                task.add_done_callback(lambda _: self._on_done())
                self._tasks[due.delivery.id] = (hook, task)
                self._running[hook] += 1
                started += 1
            if not lane:
                del self._waiting[hook]
        return started

    def reap(self) -> list[Outcome]:
        """The outcomes of finished attempts; an unexpected exception in one (a bug) is
        raised here."""
        finished = [(i, hook, t) for i, (hook, t) in self._tasks.items() if t.done()]
        for delivery_id, hook, _ in finished:
            del self._tasks[delivery_id]
            self._running[hook] -= 1
            if not self._running[hook]:
                del self._running[hook]
        failed = [t for _, _, t in finished if not t.cancelled() and t.exception() is not None]
        for task in failed[1:]:
            log.error("hook_attempt_failed", exc_info=task.exception())
        if failed:
            failed[0].result()  # raises (the other outcomes are made again after a restart)
        return [task.result() for _, _, task in finished]

    def drop_waiting(self) -> list[int]:
        """Forget the deliveries not started (they stay pending in the outbox); their ids."""
        dropped = [due.delivery.id for lane in self._waiting.values() for due in lane]
        self._waiting.clear()
        return dropped

    async def cancel(self) -> None:
        """Cancel the running attempts and wait for their clean-up (their deliveries stay
        pending: they are made again later). No task outlives this."""
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks.clear()
        self._running.clear()
        for task in tasks:  # one that had failed already (a bug, met while stopping)
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("hook_attempt_failed", exc_info=exc)
