"""``prune``: delete old terminal jobs (``--dry-run``: count them), never migrating."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Collection
from datetime import UTC, datetime

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import EX_OK
from comfywatch.views import iso


def prune(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    cutoff = time.time() - args.older_than
    # Jobs still in the config stay: the daemon would register them again as new ones.
    keep = {(job.server, job.prompt_id) for job in settings.jobs}
    count = asyncio.run(_prune(settings.daemon.database_url, cutoff, args.dry_run, keep))
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {count} job{'s' if count != 1 else ''} finished before {iso_s(cutoff)}")
    return EX_OK


async def _prune(
    database_url: str, cutoff_s: float, dry_run: bool, keep: Collection[tuple[str, str]]
) -> int:
    from comfywatch.store import Store

    store = Store.open(database_url, create=False, readonly=dry_run)
    try:
        await store.check_schema()
        return await store.prune(cutoff_s, dry_run=dry_run, keep=keep)
    finally:
        await store.close()


def iso_s(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts, tz=UTC)) or ""
