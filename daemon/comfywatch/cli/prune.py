"""``prune``: delete old terminal jobs, never migrating; ``--dry-run`` lists what would go
and what is kept, and why (read-only)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import EX_OK, table
from comfywatch.store.values import PruneCandidate
from comfywatch.views import iso


def prune(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    cutoff = time.time() - args.older_than
    # Jobs still in the config stay: the daemon would register them again as new ones.
    keep = {(job.server, job.prompt_id) for job in settings.jobs}
    if args.dry_run:
        return _dry_run(settings.daemon.database_url, settings.path, cutoff, keep)
    count = asyncio.run(_prune(settings.daemon.database_url, cutoff, keep))
    print(f"deleted {_jobs(count)} finished before {iso_s(cutoff)}")
    return EX_OK


async def _prune(database_url: str, cutoff_s: float, keep: Collection[tuple[str, str]]) -> int:
    from comfywatch.store import Store

    store = Store.open(database_url, create=False)
    try:
        await store.check_schema()
        return await store.prune(cutoff_s, dry_run=False, keep=keep)
    finally:
        await store.close()


def _dry_run(
    database_url: str, config: Path, cutoff_s: float, keep: Collection[tuple[str, str]]
) -> int:
    """What ``prune`` would delete, and each job it would keep with the reason."""
    from comfywatch.store.readonly import read
    from comfywatch.store.reads import select_prunable

    candidates = read(database_url, lambda conn: select_prunable(conn, cutoff_s))
    listed = [c for c in candidates if (c.server, c.prompt_id) in keep]
    owing = [c for c in candidates if c.owes_delivery and (c.server, c.prompt_id) not in keep]
    doomed = [c for c in candidates if not c.owes_delivery and (c.server, c.prompt_id) not in keep]
    _section(f"would delete {_jobs(len(doomed))} finished before {iso_s(cutoff_s)}", doomed)
    if listed:
        _section(
            f"kept {_jobs(len(listed))} listed in the [[jobs]] of {config}",
            listed,
            why="every load of the config registers these again: pruned, each would come "
            "back as a new job and could fire its hooks again. Remove them from the config "
            "first.",
        )
    if owing:
        _section(
            f"kept {_jobs(len(owing))} still owing a hook delivery",
            owing,
            why="pruned once the delivery is delivered or dead.",
        )
    return EX_OK


def _section(title: str, jobs: list[PruneCandidate], *, why: str = "") -> None:
    """``title``, why (if said), then the jobs as a table."""
    print(f"{title}:" if jobs else title)
    if why:
        print(f"  ({why})")
    rows = [[c.server, c.prompt_id, c.state.value, iso(c.ended_at) or ""] for c in jobs]
    if rows:
        table(["SERVER", "PROMPT_ID", "STATE", "FINISHED"], rows, indent="  ")


def _jobs(count: int) -> str:
    return f"{count} job{'s' if count != 1 else ''}"


def iso_s(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts, tz=UTC)) or ""
