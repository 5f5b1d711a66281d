"""What a reload changes: the keys whose settings differ between two loads of the config.

**Pure.** :func:`changes` compares two :class:`~comfywatch.config.Settings` and names each
difference by its key path as the file writes it (``daemon.database``, ``servers.gpu.url``,
``hooks.done``), never by its value: header values, webhook secrets and database
passwords are among them. The daemon logs the list with ``config_reloaded`` and refuses a
reload that changes a key of :data:`RESTART_ONLY`.
"""

from __future__ import annotations

from collections.abc import Mapping

from comfywatch.config.schema import Table
from comfywatch.config.settings import Settings

__all__ = ["RESTART_ONLY", "changes", "restart_only"]

#: Keys a running daemon cannot adopt, and why: a reload that changes one is refused as a
#: whole (the daemon keeps running on the configuration it has).
RESTART_ONLY: Mapping[str, str] = {
    "daemon.database": (
        "a reload cannot switch databases: the daemon keeps using the one it opened "
        "(restart it to use the new one)"
    ),
    "daemon.replicas": "a reload cannot turn replicas on or off: restart the daemon",
    "daemon.lease_s": (
        "a reload cannot change the lease time: the other replicas rely on it "
        "(restart the replicas one by one)"
    ),
}

#: Attributes the loader derives from a key of the same table: a change is reported under
#: the first of those keys that is set (a webhook's secret comes from its file or its
#: environment variable).
_DERIVED: Mapping[str, tuple[str, ...]] = {"secret": ("secret_file", "secret_env")}


def changes(old: Settings, new: Settings) -> list[str]:
    """The key paths whose settings differ from ``old`` to ``new``, in the file's order:
    ``[daemon]`` keys, then servers and hooks by name, then ``jobs``.

    A server or hook added or removed is its table (``servers.gpu``); one whose type
    changed too (a webhook made a command). A value the loader derives from another
    (defaults copied from ``[daemon]``, a secret read from a file) counts where it is in
    effect: raising ``daemon.max_history_fetches`` also changes every server that sets
    none. The jobs of the main file count as one key, ``jobs``.
    """
    found = _table("daemon", old.daemon, new.daemon)
    found += _named("servers", old.servers, new.servers)
    found += _named("hooks", old.hooks, new.hooks)
    if old.jobs != new.jobs:
        found.append("jobs")
    return found


def restart_only(changed: list[str]) -> dict[str, str]:
    """The keys among ``changed`` that a reload cannot apply, each with the reason."""
    return {key: RESTART_ONLY[key] for key in changed if key in RESTART_ONLY}


def _named(prefix: str, old: Mapping[str, Table], new: Mapping[str, Table]) -> list[str]:
    found: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None or after is None:
            found.append(f"{prefix}.{name}")
        else:
            found += _table(f"{prefix}.{name}", before, after)
    return found


def _table(prefix: str, old: Table, new: Table) -> list[str]:
    """The keys of one table whose values differ (the whole table if its type does)."""
    if type(old) is not type(new):
        return [prefix]
    found: list[str] = []
    for attr, info in type(old).model_fields.items():
        if getattr(old, attr) == getattr(new, attr):
            continue
        key = info.validation_alias if isinstance(info.validation_alias, str) else attr
        sources = _DERIVED.get(attr)
        if sources is not None:
            given = [s for s in sources if any(getattr(t, s) is not None for t in (new, old))]
            key = given[0] if given else sources[0]
        path = f"{prefix}.{key}"
        if path not in found:
            found.append(path)
    return found
