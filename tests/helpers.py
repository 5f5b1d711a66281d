"""Shared test helpers: fixture loading (the recorded ComfyUI answers live in tests/fixtures)."""

from __future__ import annotations

import json
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
