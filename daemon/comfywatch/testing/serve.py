"""``comfywatch fake-server``: a fake ComfyUI run until told to stop."""

from __future__ import annotations

import asyncio
import sys

from .routes import COMFYUI_VERSION
from .server import FakeComfyUI

__all__ = ["serve"]


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
