"""The fake's worker: runs prompts one at a time, as ComfyUI's ``prompt_worker`` thread.

It takes the lowest pending prompt from the model, sends ``execution_start`` and
``execution_cached``, waits out the prompt's run time (or an interrupt, or a release of a
held prompt) while sending ``progress`` steps, builds its entry, sends the execution
messages, and only then stores the entry, as ComfyUI sends them before ``task_done``.
Nothing is computed.

``progress`` goes where ComfyUI sends it: to the submitter's socket, or to every socket
when the prompt has no client id. Step ``k`` of ``n`` (``value`` k, ``max`` n, on the
graph's first node) is sent once ``(k - 1) / n`` of the run time has passed; a prompt
that ends normally sends all ``n``, an interrupted or held one stops where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Final

from .entries import OutputStore
from .model import Outcome, QueuedPrompt, QueueModel, Running
from .sockets import Broadcaster

__all__ = ["Worker", "progress_steps_due"]

#: How long a finishing prompt waits for its WebSocket messages to go out before its
#: history entry is written (ComfyUI sends them first; a stuck client must not stall us).
_WS_FLUSH_TIMEOUT_S: Final = 1.0


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch, as ComfyUI's message timestamps."""
    return time.time_ns() // 1_000_000


def progress_steps_due(elapsed_s: float, run_time_s: float, steps: int) -> int:
    """How many of ``steps`` progress steps are due ``elapsed_s`` into a run."""
    if steps <= 0:
        return 0
    if run_time_s <= 0:
        return steps
    return max(0, min(steps, math.floor(elapsed_s * steps / run_time_s) + 1))


class Worker:
    """One worker task over a model (``start()`` / ``stop()``); ``kick()`` on any change."""

    def __init__(
        self,
        model: QueueModel,
        outputs: OutputStore,
        sockets: Broadcaster,
        *,
        progress_steps: Callable[[], int] = lambda: 0,
    ) -> None:
        self._model = model
        self._outputs = outputs
        self._sockets = sockets
        self._progress_steps = progress_steps
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is not None:
            raise RuntimeError("the worker is already running")
        self._task = asyncio.create_task(self._work(), name="fake-comfyui-worker")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def kick(self) -> None:
        """Something changed: look at the model again."""
        self._kick.set()

    @staticmethod
    def _now_s() -> float:
        return asyncio.get_running_loop().time()

    async def _work(self) -> None:
        self._model.rerun(self._now_s())  # a prompt running when the worker stopped
        while True:
            while self._model.running is None and self._model.start_next(self._now_s()) is None:
                await self._wait(None)
            await self._execute()

    async def _wait(self, timeout_s: float | None) -> None:
        """Sleep until kicked or ``timeout_s`` (``None``: until kicked)."""
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._kick.wait()

    async def _execute(self) -> None:
        running = self._model.running
        if running is None:
            return
        prompt = running.prompt
        sid = prompt.client_id
        started_ms = now_ms()
        start = {"prompt_id": prompt.prompt_id, "timestamp": started_ms}
        self._sockets.emit("execution_start", start, sid)
        self._sockets.emit("execution_cached", {"nodes": [], **start}, sid)
        await asyncio.sleep(0)  # let the world see it running, however short the run
        outcome = await self._run_out(running)

        conclusion = self._outputs.conclude(prompt, outcome, started_ms, max(now_ms(), started_ms))
        for message in conclusion.messages:
            self._sockets.emit(message.event, message.data, sid, broadcast=message.broadcast)
        # ComfyUI sends execution_* before the history entry exists.
        await self._sockets.flush(_WS_FLUSH_TIMEOUT_S)
        # The move from running to history is one synchronous step: no request can see
        # the prompt in neither place (ComfyUI does it under one lock).
        self._model.finish(conclusion.entry)
        if sid is not None:
            self._sockets.emit("executing", {"node": None, "prompt_id": prompt.prompt_id}, sid)

    async def _run_out(self, running: Running) -> Outcome:
        """Wait until the running prompt is due, sending its progress steps meanwhile."""
        prompt = running.prompt
        steps = max(0, self._progress_steps())
        sent = 0
        while True:
            now_s = self._now_s()
            if not self._model.held and not running.interrupt_requested:
                elapsed_s = now_s - running.started_s
                due = progress_steps_due(elapsed_s, prompt.run_time_s, steps)
                sent = self._send_progress(prompt, sent, due, steps)
            if (outcome := self._model.due(now_s)) is not None:
                break
            await self._wait(self._next_wake_s(now_s, sent, steps))
        if outcome != "interrupted":
            self._send_progress(prompt, sent, steps, steps)
        return outcome

    def _next_wake_s(self, now_s: float, sent: int, steps: int) -> float | None:
        """Seconds until the prompt is due or its next progress step, whichever is first."""
        time_left_s = self._model.time_left_s(now_s)
        running = self._model.running
        if time_left_s is None or running is None or sent >= steps:
            return time_left_s
        next_step_s = running.started_s + running.prompt.run_time_s * sent / steps - now_s
        return max(0.0, min(time_left_s, next_step_s))

    def _send_progress(self, prompt: QueuedPrompt, sent: int, due: int, steps: int) -> int:
        """Send steps ``sent + 1 .. due``; returns how many are sent now."""
        node = next(iter(prompt.graph), None)
        for value in range(sent + 1, due + 1):
            data = {"value": value, "max": steps, "prompt_id": prompt.prompt_id, "node": node}
            self._sockets.emit("progress", data, prompt.client_id, broadcast=True)
        return max(sent, due)
