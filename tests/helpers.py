"""Shared test helpers: fixture loading (the recorded ComfyUI answers live in tests/fixtures)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def only_entry(name: str) -> tuple[str, dict[str, Any]]:
    """The single (prompt_id, entry) pair of a recorded ``GET /history/{id}`` answer."""
    body = fixture(name)
    assert len(body) == 1
    return next(iter(body.items()))


async def comfywatch(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m comfywatch ARGS`` to the end without blocking this event loop (so a
    fake server in it keeps serving); returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfywatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
