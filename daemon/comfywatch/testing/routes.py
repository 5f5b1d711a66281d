"""The HTTP API of the fake ComfyUI: one aiohttp handler per route a tracker uses.

Answers are those of ComfyUI 0.3.64 (the ``comfyui-fixtures`` captures are the reference):
the same status codes, single-line JSON bodies and content types; ``{}`` from
``GET /history/{id}`` for anything unfinished or unknown; 500 with aiohttp's text for a
body that is not what the handler expects. Handlers only read and change the
:class:`~.model.QueueModel` and the :class:`~.entries.OutputStore`; every route also
answers under ``/api`` (mounted by the listener).
"""

from __future__ import annotations

import copy
import json
import struct
import uuid
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from .entries import OutputStore
from .faults import internal_error
from .model import QueuedPrompt, QueueModel
from .prompts import PromptRejected, check_graph, error_body, read_script

__all__ = [
    "COMFYUI_VERSION",
    "MAX_UPLOAD_SIZE",
    "ROUTES",
    "ComfyRoutes",
    "normalize_route",
    "route_kind",
]

JSON = Any

#: The ComfyUI version this fake imitates (``system.comfyui_version``).
COMFYUI_VERSION: Final = "0.3.64"
MAX_UPLOAD_SIZE: Final = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size

#: Route kinds, as counted in ``FakeComfyUI.requests`` and named in ``inject(route=)``.
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
    "max_upload_size": MAX_UPLOAD_SIZE,
}


def normalize_route(route: str) -> str:
    """``"get /api/queue"`` → ``"GET /queue"``; ValueError for a route not in ROUTES."""
    method, _, path = route.strip().partition(" ")
    path = path.strip()
    if path.startswith("/api/"):
        path = path[len("/api") :]
    kind = f"{method.upper()} {path}"
    if kind not in ROUTES:
        raise ValueError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
    return kind


def route_kind(request: web.Request) -> str:
    """The route kind of a request (``GET /history/{id}``), ``/api`` taken off."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    if path.startswith("/api/"):
        path = path[len("/api") :]
    return f"{request.method} {path}"


class ComfyRoutes:
    """Handlers over one model; ``run_time_s()`` and ``argv()`` are read per request."""

    def __init__(
        self,
        model: QueueModel,
        outputs: OutputStore,
        *,
        run_time_s: Callable[[], float],
        argv: Callable[[], list[str]],
    ) -> None:
        self._model = model
        self._outputs = outputs
        self._run_time_s = run_time_s
        self._argv = argv

    def table(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of every HTTP route but ``/ws``."""
        return [
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/prompt", self.get_prompt),
            ("POST", "/prompt", self.post_prompt),
            ("POST", "/interrupt", self.post_interrupt),
            ("GET", "/system_stats", self.get_system_stats),
            ("GET", "/features", self.get_features),
            ("GET", "/view", self.get_view),
        ]

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        running = self._model.running
        return web.json_response(
            {
                "queue_running": [running.prompt.queue_item()] if running else [],
                "queue_pending": [prompt.queue_item() for prompt in self._model.pending()],
            }
        )

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"exec_info": {"queue_remaining": self._model.queue_remaining}})

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["id"]
        entry = self._model.history_entry(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        try:
            raw_max = request.query.get("max_items")
            raw_offset = request.query.get("offset")
            max_items = int(raw_max) if raw_max is not None else None
            offset = int(raw_offset) if raw_offset is not None else -1
        except ValueError:
            return internal_error()
        return web.json_response(self._model.history_page(max_items, offset))

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if not isinstance(body, dict):
            return internal_error()
        try:
            number = self._number(body)
        except (TypeError, ValueError):
            return internal_error()
        if "prompt" not in body:
            error = error_body("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return internal_error()
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        try:
            outputs, node_errors = check_graph(body["prompt"])
            outcome, run_time_s = read_script(extra_data, self._run_time_s())
        except PromptRejected as exc:
            return web.json_response(
                {"error": exc.error, "node_errors": exc.node_errors}, status=400
            )
        prompt = QueuedPrompt(
            number=number,
            prompt_id=prompt_id,
            graph=body["prompt"],
            extra_data=extra_data,
            outputs_to_execute=outputs,
            outcome=outcome,
            run_time_s=run_time_s,
        )
        self._model.put(prompt)
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        )

    def _number(self, body: Mapping[str, JSON]) -> float:
        """The client's ``number``, or the next one (negative with ``front``), used up now."""
        if "number" in body:
            return float(body["number"])
        return self._model.take_number(front=bool(body.get("front")))

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        return await _clear_or_delete(request, self._model.wipe_pending, self._model.delete_pending)

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        return await _clear_or_delete(
            request, self._model.clear_history, self._model.delete_history
        )

    async def post_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.text())
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            return internal_error()
        self._model.request_interrupt(body.get("prompt_id") or None)
        return web.Response(status=200)

    async def get_system_stats(self, request: web.Request) -> web.StreamResponse:
        stats = copy.deepcopy(dict(_SYSTEM_STATS))
        stats["system"]["argv"] = self._argv()
        return web.json_response(stats)

    async def get_features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(dict(_FEATURES))

    async def get_view(self, request: web.Request) -> web.StreamResponse:
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
        if not self._outputs.has_file(file_type, subfolder.strip("/"), name):
            return web.Response(status=404)
        return web.Response(
            body=_PNG_1X1,
            content_type="image/png",
            headers={"Content-Disposition": f'filename="{name}"'},
        )


async def read_json(request: web.Request) -> JSON:
    """The parsed body, or ``None`` when it is not JSON (ComfyUI then answers 500)."""
    try:
        return json.loads(await request.text())
    except ValueError:
        return None


async def _clear_or_delete(
    request: web.Request, clear: Callable[[], object], delete: Callable[[str], object]
) -> web.StreamResponse:
    """``POST /queue`` and ``POST /history``: ``{"clear": true}`` and/or ``{"delete": [ids]}``,
    answered 200 with an empty body (500 for a body that is not such an object)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        return internal_error()
    to_delete = body.get("delete", [])
    if not isinstance(to_delete, list | str):
        return internal_error()
    if body.get("clear"):
        clear()
    for prompt_id in to_delete:
        if isinstance(prompt_id, str):
            delete(prompt_id)
    return web.Response(status=200)


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
