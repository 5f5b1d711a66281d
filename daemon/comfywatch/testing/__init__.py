"""A fake ComfyUI server on a real port: for tests, and for trying comfywatch without a GPU.

:class:`FakeComfyUI` answers the routes a tracker uses the way ComfyUI 0.3.64 does (the
recorded answers in the ``comfyui-fixtures`` captures are the reference): the same
status codes, the same single-line JSON bodies and content types, ``/api`` aliases,
``{}`` from ``GET /history/{id}`` for anything unfinished or unknown, history entries
built from real recorded entries, queue numbers that restart at 0 with the "process",
and the WebSocket ``status`` broadcast exactly where ComfyUI sends it: on every put,
start, finish, delete and wipe of the queue, with ``queue_remaining`` = pending +
running (deleting the only pending prompt sends two, as ComfyUI's wipe-then-update
does; history deletes send none).

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

What a fake cannot be: nodes are not validated beyond "has a ``class_type``", "the
graph has an output node" (a ``class_type`` starting or ending with ``Save`` or
``Preview``, or a node with ``"_output": true``) and "every link upstream of an output
leads to a node" (an output with a broken link is reported in ``node_errors``, as
ComfyUI does); ``progress`` comes in a few even steps
on the graph's first node (``progress_steps``), there are no ``progress_state`` messages,
and each prompt's ``executing`` / ``executed`` messages are sent together when it ends.

For benchmarks, :attr:`FakeComfyUI.stats` (a :class:`ServerStats`, also served as JSON at
``GET /_fake/stats``, reset by ``DELETE /_fake/stats``; the request log at ``GET
/_fake/polls``) counts per client (``User-Agent``) and route the requests, response body
bytes and handler CPU time, and logs when each client polled. ``/_fake/...`` is not part
of the ComfyUI API: it is neither counted, faulted nor behind ``required_headers``.
:meth:`FakeComfyUI.fill` queues many prompts sharing one graph, and :func:`sized_graph`
makes a graph of a given JSON size.

The parts: ``model`` (the queue and history as a pure state machine), ``entries``
(history entries from the recorded ones), ``prompts`` (graphs and their validation),
``worker``, ``sockets`` (the WebSocket broadcaster), ``process`` (what a restart
forgets, and the scripting methods), ``routes`` (the HTTP API), ``faults``, ``stats``
(costs per client), ``listener`` (the port and the request gate), ``server`` (the
:class:`FakeComfyUI` that ties them together) and ``serve`` (``comfywatch fake-server``).
"""

from __future__ import annotations

from .faults import FAULTS, Fault
from .model import MAXIMUM_HISTORY_SIZE, OUTCOMES, Outcome, QueuedPrompt, QueueModel, Running
from .prompts import PromptRejected, default_graph, sized_graph
from .routes import COMFYUI_VERSION, ROUTES
from .serve import serve
from .server import FakeComfyUI
from .stats import Poll, RouteStats, ServerStats

__all__ = [
    "COMFYUI_VERSION",
    "FAULTS",
    "MAXIMUM_HISTORY_SIZE",
    "OUTCOMES",
    "ROUTES",
    "FakeComfyUI",
    "Fault",
    "Outcome",
    "Poll",
    "PromptRejected",
    "QueueModel",
    "QueuedPrompt",
    "RouteStats",
    "Running",
    "ServerStats",
    "default_graph",
    "serve",
    "sized_graph",
]
