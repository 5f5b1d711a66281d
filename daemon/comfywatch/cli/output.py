"""What the command line says: exit statuses, tables and JSON on stdout, messages on
stderr. Text that may come from a remote server never reaches the terminal raw."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def err(message: str) -> None:
    print(f"comfywatch: {message}", file=sys.stderr)


def labels_text(labels: Mapping[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels or {}).items()))


def print_json(data: Any) -> None:
    """``data`` as indented JSON, written at once (``json.dump`` writes token by token)."""
    import json  # not for --version and --help

    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False))
    sys.stdout.write("\n")


def printable(text: str) -> str:
    """Text that may come from a remote server, its control characters (terminal escape
    sequences) shown escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def say(text: str) -> None:
    """Print text that may come from a remote server: control characters (terminal escape
    sequences) are shown escaped, never sent to the terminal."""
    print(printable(text))


def table(header: list[str], rows: list[list[str]], *, indent: str = "") -> None:
    rows = [[_CONTROL.sub("?", c) for c in row] for row in rows]
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [header, *rows]:
        say(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
