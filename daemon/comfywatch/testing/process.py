"""The fake's "process": the state a restart forgets, its tasks, and what tests script.

:class:`FakeProcess` holds the pure :class:`~.model.QueueModel`, the
:class:`~.entries.OutputStore`, the worker and the WebSocket broadcaster, starts and stops
their tasks, turns the model's ``queue_updated`` into the ``status`` broadcast, and offers
the scripting and waiting methods of ``FakeComfyUI`` (which adds the port on top).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .entries import OutputStore
from .model import OUTCOMES, Outcome, QueuedPrompt, QueueModel
from .prompts import check_run_time, default_graph, validate
from .sockets import Broadcaster
from .stats import ServerStats
from .worker import Worker

__all__ = ["FakeProcess"]

log = logging.getLogger(__name__)

JSON = Any


class FakeProcess:
    """Queue, history, files, worker and sockets of one fake ComfyUI, and their controls."""

    def __init__(self, *, run_time_s: float, progress_steps: int) -> None:
        self.run_time_s = check_run_time(run_time_s)
        #: ``progress`` messages per prompt (0: none), spread over its run time.
        self.progress_steps = progress_steps
        #: Requests received per route kind (see :data:`ROUTES`), kept across restarts.
        self.requests: collections.Counter[str] = collections.Counter()
        #: What each client's requests cost (also at ``GET /_fake/stats``), kept across
        #: restarts like :attr:`requests`.
        self.stats = ServerStats()
        self._changed = asyncio.Event()  # replaced on every change: wakes wait_*()
        self._model = QueueModel(on_queue_updated=self._on_queue_updated, on_change=self._on_change)
        self._outputs = OutputStore()
        self._sockets = Broadcaster(
            lambda: self._model.queue_remaining,
            on_sent=lambda client, size: self.stats.record_sent(client, "GET /ws", size),
        )
        self._worker = Worker(
            self._model, self._outputs, self._sockets, progress_steps=lambda: self.progress_steps
        )
        self._process_running = False
        self._failure: BaseException | None = None

    @property
    def model(self) -> QueueModel:
        """The queue and history (read it; change it through the methods of the fake)."""
        return self._model

    @property
    def max_history_size(self) -> int:
        """History cap; like ComfyUI, the oldest entry goes when a new one finds more."""
        return self._model.max_history_size

    @max_history_size.setter
    def max_history_size(self, value: int) -> None:
        self._model.max_history_size = value

    # ------------------------------------------------------------------ tasks

    def _start_process(self) -> bool:
        if self._process_running:
            return False
        self._process_running = True
        self._failure = None
        for task in (self._worker.start(), self._sockets.start()):
            task.add_done_callback(self._on_task_done)
        return True

    async def _stop_process(self) -> None:
        self._process_running = False
        await self._worker.stop()
        await self._sockets.stop()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("fake ComfyUI task %s died", task.get_name(), exc_info=error)
            self._failure = error
            self._notify()

    def _forget(self) -> None:
        """The process died: see ``FakeComfyUI.restart``."""
        self._model.restart()
        self._outputs.restart()

    # ------------------------------------------------------------------ scripting

    def submit(
        self,
        graph: Mapping[str, JSON] | None = None,
        *,
        prompt_id: str | None = None,
        outcome: Outcome = "success",
        run_time_s: float | None = None,
        extra_data: Mapping[str, JSON] | None = None,
        number: float | None = None,
    ) -> str:
        """Queue a prompt as ``POST /prompt`` does and return its id.

        ``graph`` defaults to :func:`default_graph`; ``run_time_s`` to the server's.
        A graph without an output node raises :class:`PromptRejected` (and, as in
        ComfyUI, still uses up a ``number``). ``extra_data["comfywatch_fake"]`` is not
        read here: the keyword arguments script the prompt. ``number``: one taken
        earlier with :meth:`take_number` (a prompt that validated slowly), or a client's
        own (a float, as ComfyUI stores it); by default the next one is used up.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        run_time = self.run_time_s if run_time_s is None else check_run_time(run_time_s)
        # A JSON round trip: a private copy, with keys and values as a client would send.
        graph_json = json.loads(json.dumps(graph if graph is not None else default_graph()))
        extra_json = json.loads(json.dumps(extra_data if extra_data is not None else {}))
        if number is None:
            number = self._model.take_number()
        new_id = prompt_id if prompt_id is not None else str(uuid.uuid4())
        prompt = QueuedPrompt(
            number=number,
            prompt_id=new_id,
            graph=graph_json,
            extra_data=extra_json,
            outputs_to_execute=validate(graph_json),
            outcome=outcome,
            run_time_s=run_time,
        )
        self._model.put(prompt)
        return new_id

    def take_number(self, *, front: bool = False) -> int:
        """Use up the next ``number`` now, as ``POST /prompt`` does before it validates.

        Queue the prompt later with ``submit(number=...)``: prompts submitted meanwhile
        get higher numbers and reach the queue first (ComfyUI enqueues after validation).
        """
        return self._model.take_number(front=front)

    def fill(
        self,
        count: int,
        graph: Mapping[str, JSON] | None = None,
        *,
        run_time_s: float | None = None,
    ) -> list[str]:
        """Queue ``count`` successful prompts of one graph and return their ids.

        For large queues: the graph is validated and copied once and shared by every
        prompt (nothing changes a queued graph), so 100,000 prompts cost one graph.
        """
        run_time = self.run_time_s if run_time_s is None else check_run_time(run_time_s)
        graph_json = json.loads(json.dumps(graph if graph is not None else default_graph()))
        outputs = validate(graph_json)
        ids = []
        for _ in range(count):
            prompt_id = str(uuid.uuid4())
            number = self._model.take_number()
            extra: dict[str, JSON] = {}
            self._model.put(
                QueuedPrompt(number, prompt_id, graph_json, extra, outputs, "success", run_time)
            )
            ids.append(prompt_id)
        return ids

    def pause(self) -> None:
        """The worker starts no new prompt (a running one still runs to its end)."""
        self._model.pause()

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._model.resume()

    def mute_sockets(self, muted: bool = True) -> None:
        """Keep WebSocket connections open but send no more frames (a stall)."""
        self._sockets.mute(muted)

    def hold_running(self) -> None:
        """A stuck worker: the running prompt (or the next to start) never ends.

        It ends only after :meth:`release` or :meth:`restart`. An interrupt that arrives
        meanwhile takes effect at release, like ComfyUI's at the next node boundary.
        """
        self._model.hold()

    def release(self) -> None:
        """Undo :meth:`hold_running`; an overdue prompt ends at once."""
        self._model.release()

    async def finish_running(
        self, outcome: Outcome = "success", timeout_s: float = 10
    ) -> str | None:
        """End the running prompt now with ``outcome``, held or not; returns its id
        (``None``: nothing runs). A held worker stays held for the next prompt."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        running = self._model.running
        if running is None:
            return None
        prompt = running.prompt
        prompt.outcome = outcome
        prompt.run_time_s = 0.0
        held = self._model.held
        self._model.release()
        await self.wait_finished(prompt.prompt_id, timeout_s)
        if held:
            self._model.hold()
        return prompt.prompt_id

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: the running prompt ends as interrupted at once.

        With a ``prompt_id`` that is not the running one, nothing happens (as in
        ComfyUI); with none and nothing running, nothing happens either.
        """
        self._model.request_interrupt(prompt_id)

    def delete_from_queue(self, prompt_ids: str | Iterable[str]) -> int:
        """Remove pending prompts (never the running one); they never get history.

        Returns how many were removed. As in ComfyUI, each id removes one queue item.
        """
        return sum(self._model.delete_pending(prompt_id) for prompt_id in _ids(prompt_ids))

    def clear_queue(self) -> None:
        """Remove every pending prompt (``POST /queue {"clear": true}``)."""
        self._model.wipe_pending()

    def delete_history(self, prompt_ids: str | Iterable[str]) -> int:
        """Forget finished entries (``POST /history {"delete": [...]}``); returns how many."""
        return sum(self._model.delete_history(prompt_id) for prompt_id in _ids(prompt_ids))

    def clear_history(self) -> None:
        """Forget every finished entry (``POST /history {"clear": true}``)."""
        self._model.clear_history()

    def history_entry(self, prompt_id: str) -> dict[str, JSON] | None:
        """The history entry of a finished prompt (a copy), or ``None``."""
        return copy.deepcopy(self._model.history_entry(prompt_id))

    def queue_snapshot(self) -> dict[str, list[list[JSON]]]:
        """What ``GET /queue`` would answer now (a copy)."""
        running = self._model.running
        return copy.deepcopy(
            {
                "queue_running": [running.prompt.queue_item()] if running else [],
                "queue_pending": [prompt.queue_item() for prompt in self._model.pending()],
            }
        )

    async def wait_running(self, prompt_id: str, timeout_s: float = 10) -> None:
        """Wait until the prompt runs (or has already finished)."""
        model = self._model
        await self._wait_for(
            lambda: model.is_running(prompt_id) or model.history_entry(prompt_id) is not None,
            timeout_s,
            f"prompt {prompt_id} did not start",
        )

    async def wait_finished(self, prompt_id: str, timeout_s: float = 10) -> dict[str, JSON]:
        """Wait for the prompt's history entry and return it (a copy)."""
        await self._wait_for(
            lambda: self._model.history_entry(prompt_id) is not None,
            timeout_s,
            f"prompt {prompt_id} did not finish",
        )
        return copy.deepcopy(self._model.history_entry(prompt_id) or {})

    # ------------------------------------------------------------------ signals

    def _on_queue_updated(self, queue_remaining: int) -> None:
        """ComfyUI's ``queue_updated()``: the ``status`` broadcast."""
        status = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
        self._sockets.emit("status", status, None, broadcast=True)

    def _on_change(self) -> None:
        self._worker.kick()
        self._notify()

    def _notify(self) -> None:
        """Wake every wait_*() to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    if self._failure is not None:
                        raise RuntimeError("the fake ComfyUI worker died") from self._failure
                    await self._changed.wait()
        except TimeoutError as exc:
            raise TimeoutError(f"{what} within {timeout_s} s") from exc


def _ids(prompt_ids: str | Iterable[str]) -> list[str]:
    return [prompt_ids] if isinstance(prompt_ids, str) else list(prompt_ids)
