"""``comfywatch fake-server``: a fake ComfyUI run until told to stop."""

from __future__ import annotations

import asyncio
import sys

from .model import MAXIMUM_HISTORY_SIZE
from .prompts import default_graph, sized_graph
from .routes import COMFYUI_VERSION
from .server import FakeComfyUI

__all__ = ["serve"]


async def serve(
    host: str,
    port: int,
    run_time_s: float,
    stop: asyncio.Event,
    *,
    max_history_size: int = MAXIMUM_HISTORY_SIZE,
    progress_steps: int = 4,
    prefill: int = 0,
    graph_bytes: int | None = None,
) -> None:
    """Run a fake ComfyUI until ``stop`` is set (``comfywatch fake-server``).

    ``prefill`` prompts are queued before it listens, each with a graph of
    ``graph_bytes`` (see :func:`sized_graph`; the default graph when ``None``).
    """
    graph = sized_graph(graph_bytes) if graph_bytes is not None else default_graph()
    server = FakeComfyUI(host=host, port=port, run_time_s=run_time_s, progress_steps=progress_steps)
    server.max_history_size = max_history_size
    server.fill(prefill, graph)
    await server.start()
    try:
        queued = f", {prefill} prompts queued" if prefill else ""
        sys.stderr.write(
            f"fake ComfyUI {COMFYUI_VERSION} listening on {server.url} "
            f"(prompts run {run_time_s:g} s{queued})\n"
        )
        sys.stderr.flush()
        await stop.wait()
    finally:
        await server.stop()
