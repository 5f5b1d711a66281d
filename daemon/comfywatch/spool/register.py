"""Writing a spool file for ``comfywatch register``, and waiting for the daemon's verdict.

The file is checked with the daemon's own rules against the main config first (so a
wrong server name is refused before anything is written), then written the maildir way:
a dotfile ``.NAME.tmp`` in the inbox, flushed to disk, renamed to a fresh ``NAME.toml``.
The daemon moves it to ``done/`` (or deletes it) once its jobs are committed, or sets it
aside in ``rejected/`` with the reason in ``NAME.error``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from comfywatch.config import Settings
from comfywatch.errors import ConfigError
from comfywatch.spool.inbox import DONE, ERROR_SUFFIX, REJECTED, SPOOL_SUFFIX
from comfywatch.spool.parse import parse_spool_bytes

__all__ = [
    "InvalidJobs",
    "Outcome",
    "Verdict",
    "check",
    "inbox_of",
    "jobs_file_text",
    "submit",
    "wait_for_verdict",
]

#: Mode of a written spool file: the daemon reads it through its group.
FILE_MODE = 0o640
#: How often ``wait_for_verdict`` looks whether the file has left the inbox.
POLL_S = 0.1


class InvalidJobs(ValueError):
    """The jobs asked for are ones the daemon would reject (unknown server, bad id, ...)."""


class Outcome(Enum):
    ACCEPTED = "accepted"  # committed: moved to done/ or deleted
    REJECTED = "rejected"  # moved to rejected/, with a .error beside it
    WAITING = "waiting"  # still in the inbox when the time was up


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    path: Path | None  # where the file is now; None once deleted
    error: str | None = None  # the .error text of a rejected file


def inbox_of(settings: Settings) -> Path:
    """The configured ``jobs_dir``; a ConfigError if it is unset or not a directory."""
    inbox = settings.daemon.jobs_dir
    key = "daemon.jobs_dir"
    if inbox is None:
        raise ConfigError(
            "not set: there is no spool to register jobs in", file=str(settings.path), key=key
        )
    if not inbox.is_dir():
        raise ConfigError(f"{inbox} is not a directory", file=str(settings.path), key=key)
    return inbox


def jobs_file_text(
    server: str,
    prompt_ids: Sequence[str],
    *,
    labels: Mapping[str, str],
    hooks: Sequence[str] | None,
) -> str:
    """``[[jobs]]`` tables for ``prompt_ids`` on ``server``; ``hooks=None`` leaves the daemon's
    ``default_hooks``. Raises ValueError for text that cannot be written as UTF-8."""
    fields: list[str] = []
    if labels:
        pairs = ", ".join(f"{_string(k)} = {_string(v)}" for k, v in labels.items())
        fields.append(f"labels = {{ {pairs} }}")
    if hooks is not None:
        fields.append(f"hooks = [{', '.join(_string(h) for h in hooks)}]")
    tables = [
        "\n".join(["[[jobs]]", f"server = {_string(server)}", f"prompt_id = {_string(p)}", *fields])
        for p in dict.fromkeys(prompt_ids)  # the same id twice is one job
    ]
    return "# Written by comfywatch register.\n\n" + "\n\n".join(tables) + "\n"


def submit(settings: Settings, text: str) -> Path:
    """Checks ``text`` as the daemon will, then renames it into the inbox; returns its path.

    Raises InvalidJobs for what the daemon would reject, ConfigError if the config has no
    usable ``jobs_dir``, OSError if the file cannot be written.
    """
    inbox = inbox_of(settings)
    raw = text.encode("utf-8")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{stamp}-{secrets.token_hex(6)}"
    path = inbox / f"{name}{SPOOL_SUFFIX}"
    check(settings, text, path)
    temporary = inbox / f".{name}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask: the daemon's group must read it
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        temporary.rename(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(inbox)
    return path


def check(settings: Settings, text: str, path: Path | None = None) -> None:
    """Raises InvalidJobs if the daemon would reject ``text`` (read as the file ``path``),
    ConfigError if the config has no usable ``jobs_dir``."""
    if path is None:
        path = inbox_of(settings) / f"check{SPOOL_SUFFIX}"
    try:
        parse_spool_bytes(path, text.encode("utf-8"), settings)
    except ConfigError as exc:
        # "jobs[0].server" is the command's --server: say "server".
        key = (exc.key or "").partition(".")[2]
        message = f"{key}: {exc.message}" if key else exc.message
    else:
        return
    raise InvalidJobs(message)


def wait_for_verdict(path: Path, timeout_s: float) -> Verdict:
    """Waits until the daemon has moved ``path`` out of its inbox, at most ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while os.path.lexists(path):
        if time.monotonic() >= deadline_s:
            return Verdict(Outcome.WAITING, path)
        time.sleep(POLL_S)
    stem = path.name.removesuffix(SPOOL_SUFFIX)
    rejected = path.parent / REJECTED
    error_path = rejected / f"{stem}{ERROR_SUFFIX}"
    # The daemon writes the .error before the file leaves the inbox.
    if error_path.exists():
        error = error_path.read_text(encoding="utf-8", errors="replace").strip()
        return Verdict(Outcome.REJECTED, rejected / path.name, error)
    done = path.parent / DONE / path.name
    return Verdict(Outcome.ACCEPTED, done if done.exists() else None)


def _string(value: str) -> str:
    """``value`` as a TOML basic string."""
    out = ['"']
    for char in value:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError("arguments must be valid UTF-8 text")
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _fsync_directory(folder: Path) -> None:
    """Makes the rename durable (where the file system allows a directory to be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
