"""Likely mistakes in a valid configuration: warnings, never errors.

A config can load and still be wrong: no server to watch, a ``jobs_dir`` that does not
exist, files in it the daemon will never read (``batch.json``, ``batch.TOML``), or (read
from the database by ``check-config``) jobs whose labels or hooks the database holds
otherwise. ``check-config`` prints each :class:`Advice` on stderr; the daemon logs them at
start (``config_warning``). Only blocking file-system calls here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from comfywatch.config import KeyPath, Settings, format_key, key_lines, line_of_key
from comfywatch.config.document import os_reason
from comfywatch.spool.inbox import DONE, REJECTED, is_spool_name
from comfywatch.store.values import JobRow

__all__ = ["MAX_NAMES", "Advice", "config_advice", "registered_advice"]

#: Ignored files named one by one; the rest are counted.
MAX_NAMES = 10


@dataclass(frozen=True, slots=True)
class Advice:
    """One warning, placed like a config error: ``file:line: key: message``."""

    code: str  # stable, for logs: no_servers, jobs_dir_missing, ...
    message: str
    file: str
    key: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class _Placer:
    """Turns key paths of the main file into :class:`Advice` with their lines."""

    def __init__(self, settings: Settings) -> None:
        self.file = str(settings.path)
        try:
            self._lines = key_lines(settings.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            self._lines = {}

    def __call__(self, code: str, loc: KeyPath, message: str) -> Advice:
        line = line_of_key(self._lines, loc) if loc else None
        return Advice(code, message, self.file, format_key(loc) or None, line)


def config_advice(settings: Settings) -> list[Advice]:
    """What looks wrong in ``settings`` and around it on disk (``jobs_dir``)."""
    place = _Placer(settings)
    found: list[Advice] = []
    if not settings.servers:
        found.append(place("no_servers", (), "no [servers.NAME] table: there is nothing to watch"))
    inbox = settings.daemon.jobs_dir
    if inbox is not None:
        found.extend(_inbox_advice(place, inbox))
    return found


def _inbox_advice(place: _Placer, inbox: Path) -> list[Advice]:
    loc: KeyPath = ("daemon", "jobs_dir")
    try:
        ignored = _ignored_names(inbox)
    except FileNotFoundError:
        return [
            place(
                "jobs_dir_missing",
                loc,
                f"{inbox} does not exist: nothing is registered through the spool, and "
                "`comfywatch register` cannot write there, until it is made",
            )
        ]
    except NotADirectoryError:
        return [place("jobs_dir_missing", loc, f"{inbox} is not a directory")]
    except OSError as exc:
        return [place("jobs_dir_unreadable", loc, f"cannot list {inbox}: {os_reason(exc)}")]
    if not ignored:
        return []
    shown = ", ".join(ignored[:MAX_NAMES])
    more = f" and {len(ignored) - MAX_NAMES} more" if len(ignored) > MAX_NAMES else ""
    return [
        place(
            "jobs_dir_ignored_files",
            loc,
            f"the daemon never reads {shown}{more} in {inbox}: it reads only files named "
            "*.toml (lower case), each holding [[jobs]] tables",
        )
    ]


def _ignored_names(inbox: Path) -> list[str]:
    """Files in ``inbox`` that the spool never reads, sorted: not ``*.toml``, and not
    dotfiles (the names producers write under before the rename). Raises OSError."""
    with os.scandir(inbox) as entries:
        return sorted(
            entry.name
            for entry in entries
            if not is_spool_name(entry.name)
            and not entry.name.startswith(".")
            and not (entry.name in (DONE, REJECTED) and entry.is_dir())
        )


def registered_advice(settings: Settings, known: Mapping[tuple[str, str], JobRow]) -> list[Advice]:
    """The main file's jobs whose labels or hooks differ from what the database holds
    (``known``: their rows, by (server, prompt_id), for those registered)."""
    place = _Placer(settings)
    found: list[Advice] = []
    for index, job in enumerate(settings.jobs):
        row = known.get((job.server, job.prompt_id))
        if row is None:
            continue
        if dict(job.labels) != dict(row.labels):
            found.append(
                place(
                    "labels_differ",
                    ("jobs", index, "labels"),
                    f"the database holds labels {_labels(row.labels)} for this job, the "
                    f"config {_labels(job.labels)}: the daemon's next load (start, reload) "
                    "writes the config's",
                )
            )
        if tuple(job.hooks) != tuple(row.hooks):
            found.append(_hooks_advice(place, index, job.hooks, row))
    return found


def _hooks_advice(place: _Placer, index: int, hooks: tuple[str, ...], row: JobRow) -> Advice:
    held = f"the database holds hooks {_names(row.hooks)} for this job, the config {_names(hooks)}"
    if not row.state.terminal:
        then = "the daemon's next load (start, reload) writes the config's"
    else:
        then = (
            f"the job is already {row.state.value}, so its hooks stay as they were "
            "(the config's are never applied to it)"
        )
    return place("hooks_differ", ("jobs", index, "hooks"), f"{held}: {then}")


def _labels(labels: Mapping[str, object]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _names(hooks: tuple[str, ...]) -> str:
    return "[" + ", ".join(hooks) + "]"
