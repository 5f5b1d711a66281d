"""The spool on disk: which files wait in ``jobs_dir``, and moving them out once read.

``jobs_dir`` is an inbox in the manner of a maildir: a producer writes a file under a
name the daemon ignores (a dotfile, or one not ending in ``.toml``) and renames it in. Once
read, a file goes to ``done/`` (or is deleted) or, if it is bad, to ``rejected/`` with a
``NAME.error`` beside it. Nothing already in ``done/`` or ``rejected/`` is overwritten: a
name in use gets a numbered suffix. Only blocking file-system calls here: the daemon runs
them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DONE",
    "ERROR_SUFFIX",
    "REJECTED",
    "SPOOL_SUFFIX",
    "is_spool_name",
    "move_to_done",
    "prune_before",
    "reject",
    "waiting_names",
]

DONE = "done"
REJECTED = "rejected"
SPOOL_SUFFIX = ".toml"
ERROR_SUFFIX = ".error"
#: How much of an ``.error`` file is written (a message names a file, a key and a line).
_ERROR_MAX_CHARS = 8192


def is_spool_name(name: str) -> bool:
    """Whether a file of this name in the inbox is for the daemon to read: ``*.toml``, no
    dotfile (so ``.NAME.tmp`` and editors' hidden files are left alone)."""
    return name.endswith(SPOOL_SUFFIX) and not name.startswith(".")


def waiting_names(inbox: Path) -> list[str] | None:
    """The names waiting in ``inbox``, sorted; None if it does not exist. Raises OSError.

    One ``scandir`` of the inbox: ``done/`` and ``rejected/`` are not looked into.
    """
    try:
        with os.scandir(inbox) as entries:
            return sorted(entry.name for entry in entries if is_spool_name(entry.name))
    except FileNotFoundError:
        return None


def move_to_done(inbox: Path, name: str) -> Path:
    """Moves ``inbox/name`` into ``inbox/done/`` under a free name; returns where it went."""
    folder = _subfolder(inbox, DONE)
    stem = _free_stem(folder, name.removesuffix(SPOOL_SUFFIX), (SPOOL_SUFFIX,))
    target = folder / f"{stem}{SPOOL_SUFFIX}"
    (inbox / name).rename(target)
    return target


def reject(inbox: Path, name: str, message: str) -> Path | None:
    """Moves ``inbox/name`` into ``inbox/rejected/`` with ``message`` in a ``.error`` file
    beside it; returns where it went, or None if the file had gone meanwhile.

    The ``.error`` is written first, so once the file has left the inbox, its reason is
    there to read.
    """
    folder = _subfolder(inbox, REJECTED)
    stem = _free_stem(folder, name.removesuffix(SPOOL_SUFFIX), (SPOOL_SUFFIX, ERROR_SUFFIX))
    error_path = folder / f"{stem}{ERROR_SUFFIX}"
    target = folder / f"{stem}{SPOOL_SUFFIX}"
    fd = os.open(error_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
        out.write(message[:_ERROR_MAX_CHARS] + "\n")
    try:
        (inbox / name).rename(target)
    except FileNotFoundError:
        error_path.unlink(missing_ok=True)  # taken back by its producer: nothing to explain
        return None
    except OSError:
        error_path.unlink(missing_ok=True)
        raise
    return target


def prune_before(inbox: Path, cutoff_s: float) -> int:
    """Deletes the files of ``done/`` and ``rejected/`` that arrived there before
    ``cutoff_s`` (by inode change time, which the move into the folder sets); returns
    how many went."""
    removed = 0
    for sub in (DONE, REJECTED):
        try:
            entries = list(os.scandir(inbox / sub))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode) or info.st_ctime >= cutoff_s:
                    continue
                Path(entry.path).unlink()
                removed += 1
    return removed


def _subfolder(inbox: Path, name: str) -> Path:
    """``inbox/name``, made if missing with the inbox's permission bits (less the umask;
    a setgid inbox passes its group on). The service's install makes both folders."""
    folder = inbox / name
    if not folder.is_dir():
        folder.mkdir(mode=stat.S_IMODE(inbox.stat().st_mode) & 0o1777, exist_ok=True)
    return folder


def _free_stem(folder: Path, stem: str, suffixes: Iterable[str]) -> str:
    """``stem``, or ``stem.N`` for the smallest N, such that no ``stem + suffix`` exists."""
    suffixes = tuple(suffixes)
    candidate, number = stem, 0
    while any(os.path.lexists(folder / f"{candidate}{suffix}") for suffix in suffixes):
        number += 1
        candidate = f"{stem}.{number}"
    return candidate
