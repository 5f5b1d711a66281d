"""A cheap fingerprint of the files settings came from, so the daemon knows when to reload.

Only ``os.stat`` calls: the main file, the ``jobs_dir`` listing (name, inode, size, mtime,
ctime of each drop-in) and the webhook secret files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

from comfywatch.config.dropins import drop_in_names
from comfywatch.config.settings import Settings, WebhookHookSettings

__all__ = ["Listing", "StatKey", "config_fingerprint", "listing_key", "stat_key"]

StatKey: TypeAlias = tuple[int, int, int, int, int] | None
Listing: TypeAlias = tuple[tuple[str, StatKey], ...]


def stat_key(path: Path) -> StatKey:
    """(device, inode, size, mtime, ctime) of ``path``; None if it cannot be stat'ed."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def listing_key(paths: Iterable[Path]) -> Listing:
    """The name and :func:`stat_key` of each drop-in."""
    return tuple((path.name, stat_key(path)) for path in paths)


def _drop_ins_key(directory: Path | None) -> Listing | None:
    if directory is None:
        return None
    try:
        names = drop_in_names(directory)
    except (OSError, ValueError):
        return None
    if names is None:
        return None
    return listing_key(directory / name for name in names)


def config_fingerprint(settings: Settings) -> tuple[object, ...]:
    """Cheap (``os.stat`` only) fingerprint of the files ``settings`` came from.

    Covers the main file, the ``jobs_dir`` listing (name, inode, size, mtime, ctime of
    each drop-in) and the webhook secret files. Compare with ``settings.fingerprint``
    (taken just before the files were read) to know whether a reload is due.
    """
    secret_keys = tuple(
        stat_key(hook.secret_file)
        for hook in settings.hooks.values()
        if isinstance(hook, WebhookHookSettings) and hook.secret_file is not None
    )
    return (
        stat_key(settings.path),
        _drop_ins_key(settings.daemon.jobs_dir),
        secret_keys,
    )
