"""``FakeComfyUI``: the fake server's face for tests, its life cycle and its controls.

It wires the parts together (the pure :class:`~.model.QueueModel`, the
:class:`~.entries.OutputStore`, the worker, the WebSocket broadcaster, the HTTP routes,
the fault injector, the listener) and offers what a test scripts: submit, pause, hold,
interrupt, delete, restart, go down and come up, inject faults, wait for a state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import ipaddress
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .entries import OutputStore
from .faults import Fault, FaultInjector
from .listener import Listener, bind, build_app, close, serve_on
from .model import OUTCOMES, Outcome, QueuedPrompt, QueueModel
from .prompts import check_run_time, default_graph, validate
from .routes import ComfyRoutes, normalize_route
from .sockets import Broadcaster
from .worker import Worker

__all__ = ["FakeComfyUI"]

log = logging.getLogger(__name__)

JSON = Any


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
        progress_steps: int = 4,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {port}")
        self._host = host
        self._requested_port = port
        self._bound_port: int | None = None
        self.run_time_s = check_run_time(run_time_s)
        self._required_headers = dict(required_headers or {})
        #: ``progress`` messages per prompt (0: none), spread over its run time.
        self.progress_steps = progress_steps

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

        self._changed = asyncio.Event()  # replaced on every change: wakes wait_*()
        self._model = QueueModel(on_queue_updated=self._on_queue_updated, on_change=self._on_change)
        self._outputs = OutputStore()
        self._faults = FaultInjector(self)
        self._sockets = Broadcaster(lambda: self._model.queue_remaining)
        self._worker = Worker(
            self._model, self._outputs, self._sockets, progress_steps=lambda: self.progress_steps
        )
        self._routes = ComfyRoutes(
            self._model, self._outputs, run_time_s=lambda: self.run_time_s, argv=self._argv
        )
        self._listener: Listener | None = None
        self._process_running = False
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

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
            self._model.restart()
            self._outputs.restart()

    async def come_up(self) -> None:
        """Listen again on the same port (and start the worker if it is not running)."""
        await self.start()

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

    async def _listen(self) -> None:
        port = self._bound_port if self._bound_port is not None else self._requested_port
        sock = await bind(self._host, port)
        self._bound_port = sock.getsockname()[1]
        listener = Listener()
        routes = [*self._routes.table(), ("GET", "/ws", self._sockets.handle)]
        app = build_app(
            listener,
            routes,
            requests=self.requests,
            on_request=self._notify,
            required_headers=self._required_headers,
            faults=self._faults,
        )
        await serve_on(listener, sock, app)
        self._listener = listener
        log.debug("fake ComfyUI listening on %s", self.url)

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.closing = True
        self._faults.wake()
        self._sockets.forget_sockets()
        await close(listener)

    def _argv(self) -> list[str]:
        """``system.argv`` of ``GET /system_stats``: how this server would have been run."""
        port = str(self.port)
        return ["main.py", "--cpu", "--listen", self._host, "--port", port, "--disable-auto-launch"]

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
        run_time = self.run_time_s if run_time_s is None else check_run_time(run_time_s)
        # A JSON round trip: a private copy, with keys and values as a client would send.
        graph_json = json.loads(json.dumps(graph if graph is not None else default_graph()))
        extra_json = json.loads(json.dumps(extra_data if extra_data is not None else {}))
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

    def pause(self) -> None:
        """The worker starts no new prompt (a running one still runs to its end)."""
        self._model.pause()

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._model.resume()

    def hold_running(self) -> None:
        """A stuck worker: the running prompt (or the next to start) never ends.

        It ends only after :meth:`release` or :meth:`restart`. An interrupt that arrives
        meanwhile takes effect at release, like ComfyUI's at the next node boundary.
        """
        self._model.hold()

    def release(self) -> None:
        """Undo :meth:`hold_running`; an overdue prompt ends at once."""
        self._model.release()

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

    async def wait_requests(self, route: str, count: int = 1, timeout_s: float = 10) -> None:
        """Wait until ``requests[route]`` reaches ``count`` (counted when a request arrives)."""
        kind = normalize_route(route)
        await self._wait_for(
            lambda: self.requests[kind] >= count,
            timeout_s,
            f"fewer than {count} {kind} requests arrived",
        )

    def inject(self, fault: Fault, *, route: str | None = None, times: int | None = None) -> None:
        """Make requests misbehave, for resilience tests (each fault: see :data:`FAULTS`).

        ``route`` is a kind from :data:`ROUTES` (``"GET /queue"``; an ``/api`` path is
        the same kind), ``None`` for every route. ``times`` limits how many requests the
        fault hits (``None``: until :meth:`clear_faults`). Injections are tried in the
        order they were made; the first matching one applies.
        """
        self._faults.inject(fault, normalize_route(route) if route is not None else None, times)

    def clear_faults(self) -> None:
        """Remove every injected fault; hanging and dripping requests answer normally."""
        self._faults.clear()

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
