"""A fake ComfyUI server on a real port: for tests, and for trying comfywatch without a GPU.

:class:`FakeComfyUI` answers the routes a tracker uses the way ComfyUI 0.3.64 does (the
recorded answers in the ``comfyui-fixtures`` captures are the reference): the same
status codes, the same single-line JSON bodies and content types, ``/api`` aliases,
``{}`` from ``GET /history/{id}`` for anything unfinished or unknown, history entries
built from real recorded entries, queue numbers that restart at 0 with the "process",
and the WebSocket ``status`` broadcast on every queue change.

Prompts do not compute anything. One worker task runs them one at a time, in ``number``
order, each for its run time, and ends it with a scripted outcome. Tests script it from
Python (:meth:`FakeComfyUI.submit`, :meth:`~FakeComfyUI.pause`,
:meth:`~FakeComfyUI.hold_running`, :meth:`~FakeComfyUI.restart`,
:meth:`~FakeComfyUI.inject`, ...), from the event loop that runs the server. Users of
``comfywatch fake-server`` script it over HTTP with an extra key in ``extra_data``::

    curl -s localhost:8188/prompt -d '{"prompt": {"1": {"class_type": "SaveImage",
        "inputs": {}}}, "extra_data": {"comfywatch_fake": {"outcome": "error",
        "run_time_s": 2.5}}}'

``outcome`` is ``success`` (the default), ``error`` or ``interrupted``; the key stays in
the stored ``extra_data``, as any other key would.

``GET /queue`` lists ``queue_pending`` in heap order, as ComfyUI does (its queue is a
``heapq``): sort by ``number`` (item ``[0]``) for submission order.

What a fake cannot be: nodes are not validated beyond "has a ``class_type``" and "the
graph has an output node" (a ``class_type`` starting or ending with ``Save`` or
``Preview``, or a node with ``"_output": true``); there are no ``progress`` /
``progress_state`` messages, and each prompt's ``executing`` / ``executed`` messages are
sent together when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import heapq
import ipaddress
import itertools
import json
import logging
import math
import secrets
import socket
import string
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any, Final, Literal, get_args

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "COMFYUI_VERSION",
    "FAULTS",
    "MAXIMUM_HISTORY_SIZE",
    "OUTCOMES",
    "ROUTES",
    "FakeComfyUI",
    "Fault",
    "Outcome",
    "PromptRejected",
    "default_graph",
    "serve",
]

log = logging.getLogger(__name__)

JSON = Any

#: How a fake prompt ends.
Outcome = Literal["success", "error", "interrupted"]
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

#: What :meth:`FakeComfyUI.inject` can do to a request (see the method for each one).
Fault = Literal[
    "http_500",
    "html",
    "wrong_shape",
    "truncated_json",
    "auth_401",
    "auth_403",
    "redirect_loop",
    "slow_drip",
    "hang",
    "reset",
    "oversize",
]
FAULTS: Final[tuple[Fault, ...]] = get_args(Fault)

#: The ComfyUI version this fake imitates (``system.comfyui_version``).
COMFYUI_VERSION: Final = "0.3.64"
#: ComfyUI's MAXIMUM_HISTORY_SIZE: the oldest entry goes when a new one finds more than this.
MAXIMUM_HISTORY_SIZE: Final = 10_000

#: Route kinds, as counted in :attr:`FakeComfyUI.requests` and named in ``inject(route=)``.
#: Each route also answers under ``/api`` (``/api/queue`` counts as ``GET /queue``).
ROUTES: Final[tuple[str, ...]] = (
    "GET /queue",
    "POST /queue",
    "GET /history",
    "GET /history/{id}",
    "POST /history",
    "GET /prompt",
    "POST /prompt",
    "POST /interrupt",
    "GET /system_stats",
    "GET /features",
    "GET /view",
    "GET /ws",
)

_JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_MAX_UPLOAD_SIZE: Final = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size
#: How long a finishing prompt waits for its WebSocket messages to go out before its
#: history entry is written (ComfyUI sends them first; a stuck client must not stall us).
_WS_FLUSH_TIMEOUT_S: Final = 1.0
#: Backstop for handlers that ignore the shutdown signal (they should not exist).
_SHUTDOWN_TIMEOUT_S: Final = 2.0
_OVERSIZE_CHUNK: Final = b"x" * 65_536
_TERMINAL_MESSAGES: Final = ("execution_success", "execution_error", "execution_interrupted")
_TEMPLATE_FILES: Final[Mapping[Outcome, str]] = {
    "success": "history_success.json",
    "error": "history_error.json",
    "interrupted": "history_interrupted.json",
}

#: ``GET /system_stats`` of the recorded server (``argv`` is rewritten per instance).
_SYSTEM_STATS: Final[Mapping[str, JSON]] = {
    "system": {
        "os": "posix",
        "ram_total": 25276510208,
        "ram_free": 24431091712,
        "comfyui_version": COMFYUI_VERSION,
        "required_frontend_version": "1.27.10",
        "installed_templates_version": "0.1.95",
        "required_templates_version": "0.1.95",
        "python_version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]",
        "pytorch_version": "2.13.0+cpu",
        "embedded_python": False,
        "argv": [],  # filled in per instance
    },
    "devices": [
        {
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": 25276510208,
            "vram_free": 24431091712,
            "torch_vram_total": 25276510208,
            "torch_vram_free": 24431091712,
        }
    ],
}
_FEATURES: Final[Mapping[str, JSON]] = {
    "supports_preview_metadata": True,
    "max_upload_size": _MAX_UPLOAD_SIZE,
}


class PromptRejected(ValueError):
    """A graph refused the way ``POST /prompt`` refuses it (HTTP 400, nothing queued)."""

    def __init__(self, error: dict[str, JSON]) -> None:
        self.error = error
        self.node_errors: dict[str, JSON] = {}
        super().__init__(f"{error['type']}: {error['message']}")


def default_graph(filename_prefix: str = "ComfyUI") -> dict[str, JSON]:
    """A small model-free graph (EmptyImage → SaveImage), like the recorded success case."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": filename_prefix},
        },
    }


@dataclass(slots=True)
class _Prompt:
    """One accepted prompt, queued or running."""

    number: float  # ComfyUI numbers are ints, or the float a client gave as "number"
    prompt_id: str
    graph: dict[str, JSON]
    extra_data: dict[str, JSON]
    outputs_to_execute: list[str]
    outcome: Outcome
    run_time_s: float
    interrupt_requested: bool = False

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return value if isinstance(value, str) and value else None

    def queue_item(self) -> list[JSON]:
        """``[number, prompt_id, graph, extra_data, outputs_to_execute]`` (a deep copy)."""
        return copy.deepcopy(
            [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs_to_execute]
        )


@dataclass(slots=True)
class _Injection:
    fault: Fault
    route: str | None
    remaining: int | None


@dataclass(slots=True)
class _Listener:
    """One listening period, from start()/come_up() to stop()/go_down()."""

    runner: web.AppRunner | None = None
    closing: bool = False
    transports: set[asyncio.BaseTransport] = field(default_factory=set)


class FakeComfyUI:
    """A ComfyUI 0.3.64 look-alike served by aiohttp on a real TCP port.

    Every method is meant to be called from the event loop that runs the server. State
    changes made by the synchronous methods are atomic with respect to HTTP requests.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        run_time_s: float = 0.05,
        required_headers: Mapping[str, str] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {port}")
        self._host = host
        self._requested_port = port
        self._bound_port: int | None = None
        self.run_time_s = _check_run_time(run_time_s)
        self._required_headers = dict(required_headers or {})

        #: Requests received per route kind (see :data:`ROUTES`), kept across restarts.
        self.requests: collections.Counter[str] = collections.Counter()
        #: Size of the body the ``oversize`` fault sends.
        self.oversize_bytes = 80 * 1024 * 1024
        #: Send the ``oversize`` body chunked instead of with a Content-Length.
        self.oversize_chunked = False
        #: ``slow_drip``: bytes per write and pause between writes.
        self.drip_bytes = 1
        self.drip_interval_s = 0.5
        #: Status of the ``html`` fault's page (a login page on 200, a proxy page otherwise).
        self.html_status = 200
        #: What the ``wrong_shape`` fault answers (valid JSON, not what the route returns).
        self.wrong_shape_body: JSON = ["wrong", "shape"]
        #: History cap; like ComfyUI, the oldest entry goes when a new one finds more.
        self.max_history_size = MAXIMUM_HISTORY_SIZE

        # Server state, forgotten by restart().
        self._pending: list[tuple[float, str, int, _Prompt]] = []  # a heap, as in ComfyUI
        self._running: _Prompt | None = None
        self._history: dict[str, dict[str, JSON]] = {}
        self._number = 0
        self._temp_prefix = _random_letters(5)
        self._temp_counter = 0
        # Files "on disk" (type, subfolder, filename): output files survive restarts.
        self._files: set[tuple[str, str, str]] = set()
        self._file_counters: dict[tuple[str, str], int] = {}
        #: Outputs of graphs that ran successfully, as ComfyUI's execution cache keeps them:
        #: the same graph again is "fully cached" and repeats them (no new files).
        self._cache: dict[str, dict[str, JSON]] = {}

        # Test controls.
        self._paused = False
        self._held = False
        self._faults: list[_Injection] = []
        self._fault_generation = 0

        # Tasks and signals.
        self._seq = itertools.count()
        self._kick = asyncio.Event()  # wakes the worker
        self._changed = asyncio.Event()  # replaced on every change: wakes wait_*()
        self._fault_wake = asyncio.Event()  # replaced on clear_faults()/shutdown
        self._listener: _Listener | None = None
        self._worker: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The TCP port (the one picked at the first start when constructed with 0)."""
        if self._bound_port is not None:
            return self._bound_port
        if self._requested_port:
            return self._requested_port
        raise RuntimeError("FakeComfyUI has no port yet: call start() first")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8188`` (loopback when bound to all addresses)."""
        host = self._host or "127.0.0.1"
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                host = "127.0.0.1" if address.version == 4 else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def is_up(self) -> bool:
        """Whether the server is listening."""
        return self._listener is not None

    async def start(self) -> None:
        """Start the worker and listen (port 0 picks a free port, reused on every restart)."""
        if self._listener is not None:
            raise RuntimeError("FakeComfyUI is already listening")
        started_process = self._start_process()
        try:
            await self._listen()
        except BaseException:
            if started_process:
                await self._stop_process()
            raise

    async def stop(self) -> None:
        """Close every connection and stop the worker. State is kept for inspection.

        A prompt running at stop() stays in ``queue_running``; a later start() runs it
        again from its beginning.
        """
        await self._stop_listening()
        await self._stop_process()
        self._notify()

    async def restart(self) -> None:
        """Like killing the process and starting it again on the same port.

        The queue, the running prompt and the history are forgotten, ``number`` restarts
        at 0, temp files are gone and a held worker is released; output files stay.
        pause(), injected faults and request counts are test controls and stay too.
        """
        await self.go_down(forget=True)
        await self.come_up()

    async def go_down(self, *, forget: bool = False) -> None:
        """Stop listening (connections are dropped, new ones refused).

        With ``forget=False`` the "process" lives on: prompts keep running and finishing
        while nobody can ask. With ``forget=True`` it dies: see :meth:`restart`.
        """
        await self._stop_listening()
        if forget:
            await self._stop_process()
            self._forget()

    async def come_up(self) -> None:
        """Listen again on the same port (and start the worker if it is not running)."""
        await self.start()

    def _start_process(self) -> bool:
        if self._worker is not None:
            return False
        self._failure = None
        self._outbox = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name="fake-comfyui-worker")
        self._worker.add_done_callback(self._on_task_done)
        self._sender = asyncio.create_task(self._send_loop(), name="fake-comfyui-ws-sender")
        self._sender.add_done_callback(self._on_task_done)
        return True

    async def _stop_process(self) -> None:
        tasks = [task for task in (self._worker, self._sender) if task is not None]
        self._worker = self._sender = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("fake ComfyUI task %s died", task.get_name(), exc_info=error)
            self._failure = error
            self._notify()

    def _forget(self) -> None:
        self._pending.clear()
        self._running = None
        self._history.clear()
        self._number = 0
        self._held = False
        self._cache.clear()
        self._temp_prefix = _random_letters(5)
        self._temp_counter = 0
        self._files = {f for f in self._files if f[0] != "temp"}
        self._notify()

    async def _listen(self) -> None:
        sock = await self._bind()
        listener = _Listener()
        runner = web.AppRunner(self._make_app(listener), shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        listener.runner = runner
        self._listener = listener
        log.debug("fake ComfyUI listening on %s", self.url)

    async def _bind(self) -> socket.socket:
        port = self._bound_port if self._bound_port is not None else self._requested_port
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve {self._host!r}")
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._bound_port = sock.getsockname()[1]
        return sock

    async def _stop_listening(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        listener.closing = True
        self._wake_fault_waiters()
        self._sockets.clear()
        # A dying server sends nothing more: drop in-flight requests and WebSockets.
        for transport in list(listener.transports):
            transport.close()
        listener.transports.clear()
        if listener.runner is not None:
            await listener.runner.cleanup()
        log.debug("fake ComfyUI stopped listening")

    # ------------------------------------------------------------------ scripting

    def submit(
        self,
        graph: Mapping[str, JSON] | None = None,
        *,
        prompt_id: str | None = None,
        outcome: Outcome = "success",
        run_time_s: float | None = None,
        extra_data: Mapping[str, JSON] | None = None,
    ) -> str:
        """Queue a prompt as ``POST /prompt`` does and return its id.

        ``graph`` defaults to :func:`default_graph`; ``run_time_s`` to the server's.
        A graph without an output node raises :class:`PromptRejected` (and, as in
        ComfyUI, still uses up a ``number``). ``extra_data["comfywatch_fake"]`` is not
        read here: the keyword arguments script the prompt.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        run_time = self.run_time_s if run_time_s is None else _check_run_time(run_time_s)
        # A JSON round trip: a private copy, with keys and values as a client would send.
        graph_json = json.loads(json.dumps(graph if graph is not None else default_graph()))
        extra_json = json.loads(json.dumps(extra_data if extra_data is not None else {}))
        number = self._next_number(front=False)
        new_id = prompt_id if prompt_id is not None else str(uuid.uuid4())
        self._accept(
            number=number,
            prompt_id=new_id,
            graph=graph_json,
            outputs=_validate(graph_json),
            extra_data=extra_json,
            outcome=outcome,
            run_time_s=run_time,
        )
        return new_id

    def pause(self) -> None:
        """The worker starts no new prompt (a running one still runs to its end)."""
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._paused = False
        self._kick.set()

    def hold_running(self) -> None:
        """A stuck worker: the running prompt (or the next to start) never ends.

        It ends only after :meth:`release` or :meth:`restart`. An interrupt that arrives
        meanwhile takes effect at release, like ComfyUI's at the next node boundary.
        """
        self._held = True

    def release(self) -> None:
        """Undo :meth:`hold_running`; an overdue prompt ends at once."""
        self._held = False
        self._kick.set()

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: the running prompt ends as interrupted at once.

        With a ``prompt_id`` that is not the running one, nothing happens (as in
        ComfyUI); with none and nothing running, nothing happens either.
        """
        running = self._running
        if running is None or (prompt_id is not None and prompt_id != running.prompt_id):
            return
        running.interrupt_requested = True
        self._kick.set()

    def delete_from_queue(self, prompt_ids: str | Iterable[str]) -> int:
        """Remove pending prompts (never the running one); they never get history.

        Returns how many were removed. As in ComfyUI, each id removes one queue item.
        """
        removed = 0
        for prompt_id in _ids(prompt_ids):
            for index, (_, item_id, _, _) in enumerate(self._pending):
                if item_id == prompt_id:
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    removed += 1
                    self._queue_changed()
                    break
        return removed

    def clear_queue(self) -> None:
        """Remove every pending prompt (``POST /queue {"clear": true}``)."""
        self._pending.clear()
        self._queue_changed()

    def delete_history(self, prompt_ids: str | Iterable[str]) -> int:
        """Forget finished entries (``POST /history {"delete": [...]}``); returns how many."""
        removed = 0
        for prompt_id in _ids(prompt_ids):
            if self._history.pop(prompt_id, None) is not None:
                removed += 1
        self._notify()
        return removed

    def clear_history(self) -> None:
        """Forget every finished entry (``POST /history {"clear": true}``)."""
        self._history.clear()
        self._notify()

    def history_entry(self, prompt_id: str) -> dict[str, JSON] | None:
        """The history entry of a finished prompt (a copy), or ``None``."""
        entry = self._history.get(prompt_id)
        return copy.deepcopy(entry) if entry is not None else None

    def queue_snapshot(self) -> dict[str, list[list[JSON]]]:
        """What ``GET /queue`` would answer now (a copy)."""
        return {
            "queue_running": [self._running.queue_item()] if self._running else [],
            "queue_pending": [entry[3].queue_item() for entry in self._pending],
        }

    async def wait_running(self, prompt_id: str, timeout_s: float = 10) -> None:
        """Wait until the prompt runs (or has already finished)."""

        def started() -> bool:
            running = self._running
            return (
                running is not None and running.prompt_id == prompt_id
            ) or prompt_id in self._history

        await self._wait_for(started, timeout_s, f"prompt {prompt_id} did not start")

    async def wait_finished(self, prompt_id: str, timeout_s: float = 10) -> dict[str, JSON]:
        """Wait for the prompt's history entry and return it (a copy)."""
        await self._wait_for(
            lambda: prompt_id in self._history,
            timeout_s,
            f"prompt {prompt_id} did not finish",
        )
        return copy.deepcopy(self._history[prompt_id])

    async def wait_requests(self, route: str, count: int = 1, timeout_s: float = 10) -> None:
        """Wait until ``requests[route]`` reaches ``count`` (counted when a request arrives)."""
        kind = _normalize_route(route)
        await self._wait_for(
            lambda: self.requests[kind] >= count,
            timeout_s,
            f"fewer than {count} {kind} requests arrived",
        )

    def inject(self, fault: Fault, *, route: str | None = None, times: int | None = None) -> None:
        """Make requests misbehave, for resilience tests.

        ``route`` is a kind from :data:`ROUTES` (``"GET /queue"``; an ``/api`` path is
        the same kind), ``None`` for every route. ``times`` limits how many requests the
        fault hits (``None``: until :meth:`clear_faults`). Injections are tried in the
        order they were made; the first matching one applies.

        - ``http_500``: ``500`` text/plain, as ComfyUI answers an unhandled exception.
        - ``html``: an HTML page (text/html) with status :attr:`html_status`.
        - ``wrong_shape``: ``200`` with :attr:`wrong_shape_body` as JSON.
        - ``truncated_json``: the real answer, cut in half (Content-Length matches).
        - ``auth_401`` / ``auth_403``: what an authenticating proxy answers.
        - ``redirect_loop``: ``302`` to the same URL, forever.
        - ``slow_drip``: the real answer, :attr:`drip_bytes` every
          :attr:`drip_interval_s`; the rest goes at once when faults are cleared.
        - ``hang``: no answer until faults are cleared (then the real one) or the server
          goes down (then the connection is dropped).
        - ``reset``: the real answer's headers and half its body, then the connection
          is closed.
        - ``oversize``: a valid JSON object of :attr:`oversize_bytes` bytes, streamed.

        ``truncated_json``, ``slow_drip`` and ``reset`` run the real handler (so a
        ``POST /prompt`` is queued although the client cannot read the answer); the
        others answer without it (nothing is queued, deleted or interrupted).
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        kind = _normalize_route(route) if route is not None else None
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        self._faults.append(_Injection(fault=fault, route=kind, remaining=times))

    def clear_faults(self) -> None:
        """Remove every injected fault; hanging and dripping requests answer normally."""
        self._faults.clear()
        self._fault_generation += 1
        self._wake_fault_waiters()

    # ------------------------------------------------------------------ queue and worker

    def _next_number(self, *, front: bool) -> int:
        number = self._number
        self._number += 1
        return -number if front else number

    def _accept(
        self,
        *,
        number: float,
        prompt_id: str,
        graph: dict[str, JSON],
        outputs: list[str],
        extra_data: dict[str, JSON],
        outcome: Outcome,
        run_time_s: float,
    ) -> None:
        """Queue a validated prompt (its number is already used up)."""
        item = _Prompt(
            number=number,
            prompt_id=prompt_id,
            graph=graph,
            extra_data=extra_data,
            outputs_to_execute=outputs,
            outcome=outcome,
            run_time_s=run_time_s,
        )
        heapq.heappush(self._pending, (number, prompt_id, next(self._seq), item))
        self._queue_changed()
        self._kick.set()

    def _queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running is not None else 0)

    def _queue_info(self) -> dict[str, JSON]:
        return {"exec_info": {"queue_remaining": self._queue_remaining()}}

    def _queue_changed(self) -> None:
        self._emit("status", {"status": self._queue_info()}, None, broadcast=True)
        self._notify()

    def _notify(self) -> None:
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

    async def _work(self) -> None:
        while True:
            item = self._running  # a prompt interrupted by stop() runs again
            if item is None:
                item = await self._take_next()
            await self._execute(item)

    async def _take_next(self) -> _Prompt:
        while self._paused or not self._pending:
            self._kick.clear()
            await self._kick.wait()
        item = heapq.heappop(self._pending)[3]
        self._running = item
        self._queue_changed()
        return item

    async def _execute(self, item: _Prompt) -> None:
        loop = asyncio.get_running_loop()
        item.interrupt_requested = False  # ComfyUI resets the flag when a prompt starts
        started_ms = _now_ms()
        sid = item.client_id
        self._emit("execution_start", {"prompt_id": item.prompt_id, "timestamp": started_ms}, sid)
        self._emit(
            "execution_cached",
            {"nodes": [], "prompt_id": item.prompt_id, "timestamp": started_ms},
            sid,
        )
        deadline = loop.time() + item.run_time_s
        await asyncio.sleep(0)  # let the world see it running, however short the run
        while True:
            remaining: float | None = None
            if not self._held:
                if item.interrupt_requested:
                    outcome: Outcome = "interrupted"
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    outcome = item.outcome
                    break
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._kick.wait()

        entry = self._conclude(item, outcome, started_ms, max(_now_ms(), started_ms))
        if self._sockets:
            # ComfyUI sends execution_* before the history entry exists.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), _WS_FLUSH_TIMEOUT_S)
        # The move from running to history is one synchronous step: no request can see
        # the prompt in neither place (ComfyUI does it under one lock).
        self._running = None
        while len(self._history) > self.max_history_size:
            self._history.pop(next(iter(self._history)))
        self._history[item.prompt_id] = entry
        self._queue_changed()
        if sid is not None:
            self._emit("executing", {"node": None, "prompt_id": item.prompt_id}, sid)

    def _conclude(
        self, item: _Prompt, outcome: Outcome, started_ms: int, finished_ms: int
    ) -> dict[str, JSON]:
        """Build the history entry and send the prompt's execution messages."""
        graph = item.graph
        nodes = list(graph)
        failed: str | None = None
        ran = nodes
        if outcome != "success":
            failed = item.outputs_to_execute[-1]
            ran = nodes[: nodes.index(failed)]
        wanted = set(item.outputs_to_execute)
        cache_key = json.dumps(graph, sort_keys=True, default=str)
        cached = outcome == "success" and cache_key in self._cache
        if cached:
            outputs = copy.deepcopy(self._cache[cache_key])
        else:
            outputs = {
                node_id: {"images": [self._write_image(graph[node_id])]}
                for node_id in ran
                if node_id in wanted
            }
            if outcome == "success":
                self._cache[cache_key] = copy.deepcopy(outputs)

        sid = item.client_id
        for node_id in ran:
            self._emit(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": item.prompt_id},
                sid,
            )
            if node_id in outputs:
                self._emit(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": outputs[node_id],
                        "prompt_id": item.prompt_id,
                    },
                    sid,
                )

        values: dict[str, JSON] = {"prompt_id": item.prompt_id, "timestamp": finished_ms}
        if failed is not None:
            node = graph[failed]
            node_type = node.get("class_type")
            values.update(node_id=failed, node_type=node_type, executed=list(ran))
            self._emit(
                "executing",
                {"node": failed, "display_node": failed, "prompt_id": item.prompt_id},
                sid,
            )
        template = _template(outcome)
        terminal_name = _terminal_name(template)
        if outcome == "error" and failed is not None:
            values.update(_error_fields(template, failed, graph[failed], nodes))

        entry = copy.deepcopy(template)
        entry["prompt"] = item.queue_item()
        entry["outputs"] = outputs
        entry["meta"] = {
            node_id: {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            for node_id in outputs
        }
        status = entry["status"]
        status["status_str"] = "success" if outcome == "success" else "error"
        status["completed"] = outcome == "success"
        messages: list[JSON] = []
        for name, data in status["messages"]:
            if name == terminal_name:
                new = {key: values.get(key, value) for key, value in data.items()}
            else:
                new = dict(data, timestamp=started_ms)
                if "prompt_id" in new:
                    new["prompt_id"] = item.prompt_id
                if name == "execution_cached":
                    new["nodes"] = list(nodes) if cached else []
            messages.append([name, new])
        status["messages"] = messages
        terminal = copy.deepcopy(messages[-1][1])
        # execution_interrupted reaches everyone when the prompt has no client id.
        self._emit(terminal_name, terminal, sid, broadcast=outcome == "interrupted")
        return entry

    def _write_image(self, node: Mapping[str, JSON]) -> dict[str, JSON]:
        """One output record, named the way SaveImage / PreviewImage name their files."""
        class_type = node.get("class_type")
        if isinstance(class_type, str) and class_type.startswith("Preview"):
            self._temp_counter += 1
            record = {
                "filename": f"ComfyUI_temp_{self._temp_prefix}_{self._temp_counter:05}_.png",
                "subfolder": "",
                "type": "temp",
            }
        else:
            inputs = node.get("inputs")
            prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
            subfolder, name = _split_prefix(prefix)
            counter = self._file_counters.get((subfolder, name), 0) + 1
            self._file_counters[(subfolder, name)] = counter
            record = {
                "filename": f"{name}_{counter:05}_.png",
                "subfolder": subfolder,
                "type": "output",
            }
        self._files.add((record["type"], record["subfolder"], record["filename"]))
        return record

    # ------------------------------------------------------------------ WebSocket

    def _emit(self, event: str, data: JSON, sid: str | None, *, broadcast: bool = False) -> None:
        """Queue a WebSocket message: to ``sid``, or to everyone if none and ``broadcast``."""
        if self._sender is None or not self._sockets or (sid is None and not broadcast):
            return
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    async def _send_loop(self) -> None:
        while True:
            text, sid = await self._outbox.get()
            try:
                if sid is None:
                    targets = list(self._sockets.values())
                else:
                    target = self._sockets.get(sid)
                    targets = [target] if target is not None else []
                for ws in targets:
                    if not ws.closed:
                        with contextlib.suppress(ConnectionError):  # it is going away
                            await ws.send_str(text)
            finally:
                self._outbox.task_done()

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        # Reusing a live clientId silently takes delivery away from the older socket.
        self._sockets[sid] = ws
        status = {"status": self._queue_info(), "sid": sid}
        with contextlib.suppress(ConnectionError):
            await ws.send_str(json.dumps({"type": "status", "data": status}))
            async for _message in ws:
                pass  # ComfyUI reads only feature flags from clients
        if self._sockets.get(sid) is ws:
            del self._sockets[sid]
        return ws

    # ------------------------------------------------------------------ HTTP

    def _make_app(self, listener: _Listener) -> web.Application:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            kind = _route_kind(request)
            self.requests[kind] += 1
            self._notify()
            transport = request.transport
            if transport is not None:
                listener.transports.add(transport)
            try:
                if listener.closing:
                    _drop(request)
                    return web.Response(status=503)
                if not self._authorized(request):
                    return web.Response(status=401, text="Unauthorized")
                fault = self._take_fault(kind)
                if fault is None:
                    return await handler(request)
                return await self._apply_fault(fault, kind, request, handler, listener)
            finally:
                if transport is not None:
                    listener.transports.discard(transport)

        app = web.Application(middlewares=[middleware], client_max_size=_MAX_UPLOAD_SIZE)
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
            ("GET", "/view", self._get_view),
            ("GET", "/ws", self._handle_ws),
        ]
        for method, path, handler in routes:
            for prefix in ("", "/api"):
                app.router.add_route(method, prefix + path, handler)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return all(request.headers.get(k) == v for k, v in self._required_headers.items())

    async def _get_queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue_snapshot())

    async def _get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"exec_info": {"queue_remaining": self._queue_remaining()}})

    async def _get_history_item(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _get_history(self, request: web.Request) -> web.StreamResponse:
        try:
            raw_max = request.query.get("max_items")
            raw_offset = request.query.get("offset")
            max_items = int(raw_max) if raw_max is not None else None
            offset = int(raw_offset) if raw_offset is not None else -1
        except ValueError:
            return _internal_error()
        # ComfyUI's PromptQueue.get_history, including its edge cases.
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out: dict[str, JSON] = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index >= offset:
                out[prompt_id] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return web.json_response(out)

    async def _post_prompt(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        if not isinstance(body, dict):
            return _internal_error()
        try:
            if "number" in body:
                number: float = float(body["number"])
            else:
                number = self._next_number(front=bool(body.get("front")))
        except (TypeError, ValueError):
            return _internal_error()
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return _internal_error()
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        try:
            outputs = _validate(body["prompt"])
            outcome, run_time_s = _script(extra_data, self.run_time_s)
            self._accept(
                number=number,
                prompt_id=prompt_id,
                graph=body["prompt"],
                outputs=outputs,
                extra_data=extra_data,
                outcome=outcome,
                run_time_s=run_time_s,
            )
        except PromptRejected as exc:
            return web.json_response(
                {"error": exc.error, "node_errors": exc.node_errors}, status=400
            )
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _post_queue(self, request: web.Request) -> web.StreamResponse:
        return await _clear_or_delete(request, self.clear_queue, self.delete_from_queue)

    async def _post_history(self, request: web.Request) -> web.StreamResponse:
        return await _clear_or_delete(request, self.clear_history, self.delete_history)

    async def _post_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.text())
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            return _internal_error()
        prompt_id = body.get("prompt_id")
        if prompt_id:
            running = self._running
            if running is not None and running.prompt_id == prompt_id:
                self.interrupt(running.prompt_id)
        else:
            self.interrupt()
        return web.Response(status=200)

    async def _get_system_stats(self, request: web.Request) -> web.StreamResponse:
        stats = copy.deepcopy(dict(_SYSTEM_STATS))
        stats["system"]["argv"] = [
            "main.py",
            "--cpu",
            "--listen",
            self._host,
            "--port",
            str(self.port),
            "--disable-auto-launch",
        ]
        return web.json_response(stats)

    async def _get_features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(dict(_FEATURES))

    async def _get_view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename = query.get("filename")
        if filename is None:
            return web.Response(status=404)
        if not filename or filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        file_type = query.get("type", "output")
        if file_type not in ("output", "temp", "input"):
            return web.Response(status=400)
        subfolder = query.get("subfolder", "")
        if subfolder.startswith("/") or ".." in subfolder.split("/"):
            return web.Response(status=403)
        name = filename.rsplit("/", 1)[-1]
        if (file_type, subfolder.strip("/"), name) not in self._files:
            return web.Response(status=404)
        return web.Response(
            body=_PNG_1X1,
            content_type="image/png",
            headers={"Content-Disposition": f'filename="{name}"'},
        )

    # ------------------------------------------------------------------ faults

    def _take_fault(self, kind: str) -> Fault | None:
        for injection in self._faults:
            if injection.route is None or injection.route == kind:
                if injection.remaining is not None:
                    injection.remaining -= 1
                    if injection.remaining <= 0:
                        self._faults.remove(injection)
                return injection.fault
        return None

    def _wake_fault_waiters(self) -> None:
        self._fault_wake.set()
        self._fault_wake = asyncio.Event()

    async def _fault_pause(self, timeout_s: float | None) -> None:
        """Sleep until faults are cleared, the server goes down, or ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._fault_wake.wait()

    async def _apply_fault(
        self,
        fault: Fault,
        kind: str,
        request: web.Request,
        handler: Handler,
        listener: _Listener,
    ) -> web.StreamResponse:
        if fault == "http_500":
            return _internal_error()
        if fault == "html":
            return web.Response(
                status=self.html_status, text=_html_page(self.html_status), content_type="text/html"
            )
        if fault == "wrong_shape":
            return web.json_response(self.wrong_shape_body)
        if fault == "auth_401":
            return web.Response(status=401, text="Unauthorized")
        if fault == "auth_403":
            return web.Response(status=403, text="Forbidden")
        if fault == "redirect_loop":
            return web.Response(
                status=302, text="302: Found", headers={"Location": str(request.rel_url)}
            )
        if fault == "hang":
            generation = self._fault_generation
            while generation == self._fault_generation:
                if listener.closing:
                    _drop(request)
                    return web.Response(status=503)
                await self._fault_pause(None)
            return await handler(request)
        if fault == "oversize":
            return await self._send_oversize(request, listener)
        status, content_type, body = await self._render(kind, request, handler)
        if fault == "truncated_json":
            return web.Response(
                status=status,
                body=body[: len(body) // 2] or b"{",
                headers={"Content-Type": content_type},
            )
        if fault == "reset":
            return await self._send_reset(request, status, content_type, body or b"{}")
        return await self._send_drip(request, status, content_type, body, listener)

    async def _render(
        self, kind: str, request: web.Request, handler: Handler
    ) -> tuple[int, str, bytes]:
        """Status, content type and body of the real answer (the handler runs)."""
        if kind == "GET /ws":
            return 200, _JSON_CONTENT_TYPE, b"{}"  # a mangled answer is no upgrade anyway
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            return exc.status, exc.content_type, (exc.text or "").encode()
        body = response.body if isinstance(response, web.Response) else None
        content_type = response.headers.get("Content-Type", _JSON_CONTENT_TYPE)
        return response.status, content_type, body if isinstance(body, bytes) else b""

    async def _send_reset(
        self, request: web.Request, status: int, content_type: str, body: bytes
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        response.content_length = len(body)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
        _drop(request)
        return response

    async def _send_drip(
        self,
        request: web.Request,
        status: int,
        content_type: str,
        body: bytes,
        listener: _Listener,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        response.content_length = len(body)
        generation = self._fault_generation
        step = max(1, self.drip_bytes)
        with contextlib.suppress(ConnectionError):  # the client gave up
            await response.prepare(request)
            sent = 0
            while sent < len(body):
                if listener.closing:
                    _drop(request)
                    return response
                if generation != self._fault_generation:
                    step = len(body)  # faults cleared: the rest at once
                await response.write(body[sent : sent + step])
                sent += step
                if sent < len(body) and generation == self._fault_generation:
                    await self._fault_pause(self.drip_interval_s)
            await response.write_eof()
        return response

    async def _send_oversize(self, request: web.Request, listener: _Listener) -> web.StreamResponse:
        head, tail = b'{"padding": "', b'"}'
        size = max(self.oversize_bytes, len(head) + len(tail))
        response = web.StreamResponse(status=200, headers={"Content-Type": _JSON_CONTENT_TYPE})
        if self.oversize_chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        with contextlib.suppress(ConnectionError):  # the client gave up, as it should
            await response.prepare(request)
            await response.write(head)
            remaining = size - len(head) - len(tail)
            while remaining > 0:
                if listener.closing:
                    _drop(request)
                    return response
                chunk = _OVERSIZE_CHUNK[: min(remaining, len(_OVERSIZE_CHUNK))]
                await response.write(chunk)
                remaining -= len(chunk)
            await response.write(tail)
            await response.write_eof()
        return response


async def serve(host: str, port: int, run_time_s: float, stop: asyncio.Event) -> None:
    """Run a fake ComfyUI until ``stop`` is set (``comfywatch fake-server``)."""
    server = FakeComfyUI(host=host, port=port, run_time_s=run_time_s)
    await server.start()
    try:
        sys.stderr.write(
            f"fake ComfyUI {COMFYUI_VERSION} listening on {server.url} "
            f"(prompts run {run_time_s:g} s)\n"
        )
        sys.stderr.flush()
        await stop.wait()
    finally:
        await server.stop()


# ---------------------------------------------------------------------- helpers


def _check_run_time(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"run_time_s must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"run_time_s must be a finite number >= 0, got {value}")
    return float(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _random_letters(count: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(count))


def _ids(prompt_ids: str | Iterable[str]) -> list[str]:
    return [prompt_ids] if isinstance(prompt_ids, str) else list(prompt_ids)


def _normalize_route(route: str) -> str:
    method, _, path = route.strip().partition(" ")
    path = path.strip()
    if path.startswith("/api/"):
        path = path[len("/api") :]
    kind = f"{method.upper()} {path}"
    if kind not in ROUTES:
        raise ValueError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
    return kind


def _route_kind(request: web.Request) -> str:
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    if path.startswith("/api/"):
        path = path[len("/api") :]
    return f"{request.method} {path}"


def _drop(request: web.Request) -> None:
    """Close the connection under a request, as a dying server would."""
    if request.transport is not None:
        request.transport.close()


async def _clear_or_delete(
    request: web.Request, clear: Callable[[], object], delete: Callable[[list[str]], object]
) -> web.StreamResponse:
    """``POST /queue`` and ``POST /history``: ``{"clear": true}`` and/or ``{"delete": [ids]}``,
    answered 200 with an empty body (500 for a body that is not such an object)."""
    body = await _read_json(request)
    if not isinstance(body, dict):
        return _internal_error()
    to_delete = body.get("delete", [])
    if not isinstance(to_delete, list | str):
        return _internal_error()
    if body.get("clear"):
        clear()
    delete([p for p in to_delete if isinstance(p, str)])
    return web.Response(status=200)


def _internal_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (e.g. on a body that is not JSON)."""
    return web.Response(
        status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
    )


async def _read_json(request: web.Request) -> JSON:
    """The parsed body, or ``None`` when it is not JSON (ComfyUI then answers 500)."""
    try:
        return json.loads(await request.text())
    except ValueError:
        return None


def _error(kind: str, message: str, details: str = "") -> dict[str, JSON]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _is_output_node(node: Mapping[str, JSON]) -> bool:
    if node.get("_output") is True:
        return True
    class_type = node.get("class_type")
    return isinstance(class_type, str) and (
        class_type.startswith(("Save", "Preview")) or class_type.endswith(("Save", "Preview"))
    )


def _validate(graph: JSON) -> list[str]:
    """The output node ids of a graph, or PromptRejected as ComfyUI's validate_prompt."""
    if not isinstance(graph, dict):
        raise PromptRejected(
            _error("invalid_prompt", "Cannot execute because the prompt is not an object.")
        )
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise PromptRejected(
                _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            )
        if not isinstance(node["class_type"], str):
            raise PromptRejected(
                _error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            )
    outputs = [str(node_id) for node_id, node in graph.items() if _is_output_node(node)]
    if not outputs:
        raise PromptRejected(_error("prompt_no_outputs", "Prompt has no outputs"))
    return outputs


def _script(extra_data: Mapping[str, JSON], default_run_time_s: float) -> tuple[Outcome, float]:
    """Read ``extra_data["comfywatch_fake"]``: the outcome and run time a user asked for."""
    spec = extra_data.get("comfywatch_fake")
    if spec is None:
        return "success", default_run_time_s

    def rejected(message: str) -> PromptRejected:
        return PromptRejected(_error("invalid_comfywatch_fake", message, "extra_data"))

    if not isinstance(spec, dict):
        raise rejected("extra_data.comfywatch_fake must be an object")
    unknown = sorted(set(spec) - {"outcome", "run_time_s"})
    if unknown:
        raise rejected(f"unknown comfywatch_fake keys: {', '.join(map(str, unknown))}")
    outcome = spec.get("outcome", "success")
    if outcome not in OUTCOMES:
        raise rejected(f"comfywatch_fake.outcome must be one of {', '.join(OUTCOMES)}")
    run_time_s = spec.get("run_time_s", default_run_time_s)
    try:
        run_time_s = _check_run_time(run_time_s)
    except (TypeError, ValueError) as exc:
        raise rejected(f"comfywatch_fake.run_time_s: {exc}") from None
    return outcome, run_time_s


def _split_prefix(prefix: JSON) -> tuple[str, str]:
    """SaveImage's ``filename_prefix`` as (subfolder, name), kept inside the output folder."""
    if not isinstance(prefix, str):
        return "", "ComfyUI"
    parts = [p for p in prefix.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "", "ComfyUI"
    return "/".join(parts[:-1]), parts[-1]


@functools.cache
def _template(outcome: Outcome) -> dict[str, JSON]:
    """A real recorded history entry for the outcome (package data; do not mutate)."""
    name = _TEMPLATE_FILES[outcome]
    text = resources.files("comfywatch").joinpath("fixtures", name).read_text(encoding="utf-8")
    body = json.loads(text)
    if not isinstance(body, dict) or len(body) != 1:
        raise RuntimeError(f"fixtures/{name} does not hold exactly one history entry")
    (entry,) = body.values()
    if not isinstance(entry, dict):
        raise RuntimeError(f"fixtures/{name}: the history entry is not an object")
    return entry


def _terminal_name(template: Mapping[str, JSON]) -> str:
    name = template["status"]["messages"][-1][0]
    if name not in _TERMINAL_MESSAGES:
        raise RuntimeError(f"history template ends with {name!r}, not a terminal message")
    return str(name)


def _error_fields(
    template: Mapping[str, JSON], node_id: str, node: Mapping[str, JSON], nodes: list[str]
) -> dict[str, JSON]:
    """execution_error's exception fields for a scripted failure of ``node_id``."""
    node_type = node.get("class_type")
    real_frames = template["status"]["messages"][-1][1].get("traceback", [])
    frames = [f for f in real_frames if isinstance(f, str) and "/execution.py" in f]
    frames.append(
        '  File "/opt/ComfyUI/comfywatch_fake.py", line 1, in execute\n'
        "    raise Exception(message)\n"
    )
    inputs = node.get("inputs")
    current_inputs = {
        str(name): [value if isinstance(value, str | int | float | bool | None) else str(value)]
        for name, value in (inputs.items() if isinstance(inputs, dict) else ())
    }
    return {
        "exception_message": (
            f"comfywatch fake server: node {node_id} ({node_type}) failed, as scripted\n"
        ),
        "exception_type": "Exception",
        "traceback": frames,
        "current_inputs": current_inputs,
        "current_outputs": list(nodes),
    }


def _html_page(status: int) -> str:
    if status == 200:
        return (
            "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n"
            '<body><form method="post" action="/login"><h1>Please sign in</h1>'
            '<input name="user"><input name="password" type="password"></form></body></html>\n'
        )
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


def _png_1x1() -> bytes:
    """A valid 1x1 black PNG, served by GET /view for every file the fake "wrote"."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit greyscale
    pixels = zlib.compress(b"\x00\x00")  # filter byte, one black pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


_PNG_1X1: Final = _png_1x1()
