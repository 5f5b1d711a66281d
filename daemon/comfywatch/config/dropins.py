"""Job drop-ins: the ``*.toml`` files of ``daemon.jobs_dir``, each holding ``[[jobs]]`` only.

Owns which files count (visible ``*.toml``, in name order: editors' temp files and
``.sample`` files do not), listing the directory and reading one drop-in. The loader turns
a drop-in's tables into jobs exactly as it does the main file's.
"""

from __future__ import annotations

from pathlib import Path

from comfywatch.config.document import Document, check_top_level, os_reason, read_document
from comfywatch.config.keylines import KeyPath

__all__ = ["drop_in_names", "list_drop_ins", "read_drop_in"]

_DROP_IN_KEYS = ("jobs",)


def _is_drop_in(name: str) -> bool:
    return name.endswith(".toml") and not name.startswith(".")


def drop_in_names(directory: Path) -> list[str] | None:
    """Sorted drop-in names in ``directory``; None if it does not exist. Raises OSError."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return None
    return sorted(entry.name for entry in entries if _is_drop_in(entry.name))


def list_drop_ins(doc: Document, directory: Path) -> list[Path] | None:
    """The drop-ins to read, in order; None while ``directory`` does not exist.

    ``doc`` is the main file: a directory that cannot be listed is an error at its
    ``daemon.jobs_dir``.
    """
    loc: KeyPath = ("daemon", "jobs_dir")
    try:
        names = drop_in_names(directory)
    except NotADirectoryError:
        raise doc.error(loc, f"{directory} is not a directory") from None
    except OSError as exc:
        raise doc.error(loc, f"cannot list {directory}: {os_reason(exc)}") from None
    if names is None:
        return None
    return [directory / name for name in names]


def read_drop_in(path: Path) -> Document:
    """Reads one drop-in and checks that it holds nothing but ``[[jobs]]`` tables."""
    doc = read_document(path, kind="jobs drop-in file")
    check_top_level(doc, _DROP_IN_KEYS, hint="; drop-in files may only hold [[jobs]] tables")
    return doc
