"""A cheap fingerprint of the files settings came from, so the daemon knows when to reload.

Only ``os.stat`` calls: the main file and the webhook secret files. The spool of
``jobs_dir`` is not part of it: the daemon ingests spool files as they arrive.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias

from comfywatch.config.settings import Settings, WebhookHookSettings

__all__ = ["StatKey", "config_fingerprint", "stat_key"]

StatKey: TypeAlias = tuple[int, int, int, int, int] | None


def stat_key(path: Path) -> StatKey:
    """(device, inode, size, mtime, ctime) of ``path``; None if it cannot be stat'ed."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def config_fingerprint(settings: Settings) -> tuple[object, ...]:
    """Cheap (``os.stat`` only) fingerprint of the files ``settings`` came from.

    Covers the main file and the webhook secret files. Compare with
    ``settings.fingerprint`` (taken just before the files were read) to know whether a
    reload is due.
    """
    secret_keys = tuple(
        stat_key(hook.secret_file)
        for hook in settings.hooks.values()
        if isinstance(hook, WebhookHookSettings) and hook.secret_file is not None
    )
    return (stat_key(settings.path), secret_keys)
