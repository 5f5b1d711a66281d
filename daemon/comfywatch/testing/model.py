"""The queue and history of one ComfyUI "process", as a pure state machine.

ComfyUI's ``PromptQueue`` (execution.py) without threads, sockets or clocks: the numbers
``POST /prompt`` hands out, the pending heap, the running prompt, the history with its cap
and insertion order, deletes and wipes, and what a restart forgets. Time is passed in
(``now_s``, on any monotonic clock). Two callbacks report changes: ``on_queue_updated``
exactly where ComfyUI calls ``server.queue_updated()`` (its WebSocket ``status``
broadcast), with the new ``queue_remaining``; ``on_change`` after every change.

The pending heap deletes lazily and the history is an ordered dict, so 100,000 pending
prompts and a full history cost O(log n) per put, start and delete, O(1) per finish.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

__all__ = [
    "MAXIMUM_HISTORY_SIZE",
    "OUTCOMES",
    "Outcome",
    "QueueModel",
    "QueuedPrompt",
    "Running",
]

JSON = Any

#: How a fake prompt ends.
Outcome = Literal["success", "error", "interrupted"]
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

#: ComfyUI's MAXIMUM_HISTORY_SIZE: the oldest entry goes when a new one finds more than this.
MAXIMUM_HISTORY_SIZE: Final = 10_000


@dataclass(slots=True)
class QueuedPrompt:
    """One accepted prompt, as ComfyUI queues it, plus how the fake is to run it."""

    number: float  # ComfyUI numbers are ints, or the float a client gave as "number"
    prompt_id: str
    graph: dict[str, JSON]
    extra_data: dict[str, JSON]
    outputs_to_execute: list[str]
    outcome: Outcome = "success"
    run_time_s: float = 0.0

    @property
    def client_id(self) -> str | None:
        """The submitter's WebSocket client id, if it gave one."""
        value = self.extra_data.get("client_id")
        return value if isinstance(value, str) and value else None

    def queue_item(self) -> list[JSON]:
        """``[number, prompt_id, graph, extra_data, outputs_to_execute]`` (not a copy)."""
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs_to_execute]


@dataclass(slots=True)
class Running:
    """The prompt the worker runs, since when, and whether an interrupt is waiting."""

    prompt: QueuedPrompt
    started_s: float
    interrupt_requested: bool = False


def _ignore(*_: object) -> None:
    return None


class QueueModel:
    """Pending heap, running prompt and history of one ComfyUI process.

    ``paused`` (start nothing new) and ``held`` (the running prompt never ends) are the
    fake's test controls; a restart releases ``held`` and keeps ``paused``.
    """

    def __init__(
        self,
        *,
        max_history_size: int = MAXIMUM_HISTORY_SIZE,
        on_queue_updated: Callable[[int], object] = _ignore,
        on_change: Callable[[], object] = _ignore,
    ) -> None:
        #: History cap; like ComfyUI, the oldest entry goes when a new one finds more.
        self.max_history_size = max_history_size
        self._on_queue_updated = on_queue_updated
        self._on_change = on_change
        self._paused = False
        self._held = False
        self._number = 0
        self._seq = itertools.count()
        # The heap holds (number, prompt_id, seq); an entry whose seq is no longer in
        # _pending was deleted and is skipped when it comes up.
        self._heap: list[tuple[float, str, int]] = []
        self._pending: dict[int, QueuedPrompt] = {}
        self._pending_by_id: dict[str, list[int]] = {}
        self._running: Running | None = None
        self._history: OrderedDict[str, dict[str, JSON]] = OrderedDict()

    # ------------------------------------------------------------------ reading

    @property
    def running(self) -> Running | None:
        return self._running

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def held(self) -> bool:
        return self._held

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def queue_remaining(self) -> int:
        """Pending plus running, as ComfyUI's ``get_tasks_remaining()``."""
        return len(self._pending) + (1 if self._running is not None else 0)

    @property
    def next_number(self) -> int:
        """The number the next prompt will take."""
        return self._number

    def pending(self) -> Iterator[QueuedPrompt]:
        """Pending prompts in heap order, as ``GET /queue`` lists them (sort by number)."""
        for _, _, seq in self._heap:
            prompt = self._pending.get(seq)
            if prompt is not None:
                yield prompt

    def is_pending(self, prompt_id: str) -> bool:
        return prompt_id in self._pending_by_id

    def is_running(self, prompt_id: str) -> bool:
        return self._running is not None and self._running.prompt.prompt_id == prompt_id

    def history_entry(self, prompt_id: str) -> dict[str, JSON] | None:
        """The stored entry (not a copy), or ``None``."""
        return self._history.get(prompt_id)

    def history_ids(self) -> list[str]:
        """Finished prompt ids, oldest first."""
        return list(self._history)

    def history_page(self, max_items: int | None, offset: int = -1) -> dict[str, JSON]:
        """ComfyUI's ``get_history(max_items=, offset=)``, edge cases included.

        A negative offset with ``max_items`` means the newest ``max_items``; entries come
        oldest first; a ``max_items`` below 1 still gives one entry when any is in range.
        """
        size = len(self._history)
        if offset < 0 and max_items is not None:
            offset = size - max_items
        start = max(offset, 0)
        stop = size if max_items is None else min(size, start + max(max_items, 1))
        if start >= stop:
            return {}
        if start > size // 2:  # the newest: walk from the end
            items = list(
                itertools.islice(reversed(self._history.items()), size - stop, size - start)
            )
            items.reverse()
        else:
            items = list(itertools.islice(self._history.items(), start, stop))
        return dict(items)

    # ------------------------------------------------------------------ the queue

    def take_number(self, *, front: bool = False) -> int:
        """Use up the next number (``POST /prompt`` does so before it validates)."""
        number = self._number
        self._number += 1
        return -number if front else number

    def put(self, prompt: QueuedPrompt) -> None:
        """Queue a prompt whose number is already taken (``PromptQueue.put``)."""
        seq = next(self._seq)
        heapq.heappush(self._heap, (prompt.number, prompt.prompt_id, seq))
        self._pending[seq] = prompt
        self._pending_by_id.setdefault(prompt.prompt_id, []).append(seq)
        self._queue_updated()
        self._on_change()

    def start_next(self, now_s: float) -> QueuedPrompt | None:
        """Move the lowest pending prompt to running (``PromptQueue.get``).

        Nothing starts while paused, while a prompt runs, or with nothing pending.
        """
        if self._paused or self._running is not None or not self._pending:
            return None
        while True:
            _, prompt_id, seq = heapq.heappop(self._heap)
            prompt = self._pending.pop(seq, None)
            if prompt is not None:
                break
        self._forget_pending_id(prompt_id, seq)
        self._running = Running(prompt=prompt, started_s=now_s)
        self._queue_updated()
        self._on_change()
        return prompt

    def rerun(self, now_s: float) -> QueuedPrompt | None:
        """The running prompt starts again from its beginning (the worker was stopped)."""
        running = self._running
        if running is None:
            return None
        running.started_s = now_s
        running.interrupt_requested = False
        self._on_change()
        return running.prompt

    def request_interrupt(self, prompt_id: str | None = None) -> bool:
        """``POST /interrupt``: whether the running prompt (or the one named) is hit."""
        running = self._running
        if running is None or (prompt_id is not None and prompt_id != running.prompt.prompt_id):
            return False
        running.interrupt_requested = True
        self._on_change()
        return True

    def due(self, now_s: float) -> Outcome | None:
        """How the running prompt ends if it ends at ``now_s``, or ``None`` if not yet.

        An interrupt ends it at once; otherwise its run time must have passed. A held
        prompt never ends (an interrupt waits for the release).
        """
        running = self._running
        if running is None or self._held:
            return None
        if running.interrupt_requested:
            return "interrupted"
        if now_s - running.started_s >= running.prompt.run_time_s:
            return running.prompt.outcome
        return None

    def time_left_s(self, now_s: float) -> float | None:
        """Seconds until the running prompt is due; ``None`` when only a change can end it."""
        running = self._running
        if running is None or self._held:
            return None
        if running.interrupt_requested:
            return 0.0
        return max(0.0, running.started_s + running.prompt.run_time_s - now_s)

    def finish(self, entry: dict[str, JSON]) -> QueuedPrompt:
        """Move the running prompt to history with its entry (``PromptQueue.task_done``).

        One step: no reader sees the prompt in neither place. Eviction happens first,
        when the history holds more than ``max_history_size``.
        """
        running = self._running
        if running is None:
            raise RuntimeError("no prompt is running")
        self._running = None
        while len(self._history) > self.max_history_size:
            self._history.popitem(last=False)
        # A reused id keeps its old place, as in ComfyUI's dict.
        self._history[running.prompt.prompt_id] = entry
        self._queue_updated()
        self._on_change()
        return running.prompt

    def delete_pending(self, prompt_id: str) -> bool:
        """Remove one pending item with this id (``delete_queue_item``); never the running one.

        With duplicate ids, the earliest submitted goes. Deleting the only pending item
        sends two ``status`` updates, as ComfyUI does (it wipes the queue, which sends one,
        then sends its own).
        """
        seqs = self._pending_by_id.get(prompt_id)
        if not seqs:
            return False
        if len(self._pending) == 1:
            self.wipe_pending()
        else:
            seq = seqs[0]
            del self._pending[seq]
            self._forget_pending_id(prompt_id, seq)
            self._compact()
        self._queue_updated()
        self._on_change()
        return True

    def wipe_pending(self) -> None:
        """Remove every pending item (``wipe_queue``)."""
        self._heap.clear()
        self._pending.clear()
        self._pending_by_id.clear()
        self._queue_updated()
        self._on_change()

    # ------------------------------------------------------------------ history

    def delete_history(self, prompt_id: str) -> bool:
        """Forget one finished entry; ComfyUI sends no ``status`` for it."""
        removed = self._history.pop(prompt_id, None) is not None
        self._on_change()
        return removed

    def clear_history(self) -> None:
        self._history.clear()
        self._on_change()

    # ------------------------------------------------------------------ controls

    def pause(self) -> None:
        self._paused = True
        self._on_change()

    def resume(self) -> None:
        self._paused = False
        self._on_change()

    def hold(self) -> None:
        self._held = True
        self._on_change()

    def release(self) -> None:
        self._held = False
        self._on_change()

    def restart(self) -> None:
        """What a new process starts with: no queue, no history, numbers from 0, not held."""
        self._heap.clear()
        self._pending.clear()
        self._pending_by_id.clear()
        self._running = None
        self._history.clear()
        self._number = 0
        self._held = False
        self._on_change()

    # ------------------------------------------------------------------ internals

    def _queue_updated(self) -> None:
        self._on_queue_updated(self.queue_remaining)

    def _forget_pending_id(self, prompt_id: str, seq: int) -> None:
        seqs = self._pending_by_id[prompt_id]
        seqs.remove(seq)
        if not seqs:
            del self._pending_by_id[prompt_id]

    def _compact(self) -> None:
        """Rebuild the heap once deleted entries outnumber live ones (amortised O(1))."""
        if len(self._heap) > 2 * len(self._pending) + 64:
            self._heap = [entry for entry in self._heap if entry[2] in self._pending]
            heapq.heapify(self._heap)
