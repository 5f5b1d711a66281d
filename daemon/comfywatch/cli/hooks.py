"""``hooks``: list hook deliveries (read-only), or ``hooks retry`` dead ones."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import EX_FAILURE, EX_OK, EX_USAGE, err, print_json, table
from comfywatch.states import DeliveryState
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_deliveries
from comfywatch.views import delivery_json


def hooks(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.hooks_command == "retry":
        return _retry(settings.daemon.database_url, args.ids, all_dead=args.all_dead)
    states = [DeliveryState(args.state)] if args.state else []
    records = read(
        settings.daemon.database_url,
        lambda conn: select_deliveries(conn, states=states, limit=args.limit),
    )
    items = [delivery_json(d, j) for d, j in records]
    if args.json:
        print_json(items)
        return EX_OK
    table(
        ["ID", "HOOK", "SERVER", "PROMPT_ID", "STATE", "ATTEMPTS", "NEXT", "LAST_ERROR"],
        [
            [
                str(i["id"]),
                i["hook"],
                i["server"],
                i["prompt_id"],
                i["state"],
                str(i["attempts"]),
                i["next_attempt_at"] or "",
                (i["last_error"] or "")[:60],
            ]
            for i in items
        ],
    )
    return EX_OK


def _retry(database_url: str, ids: Sequence[int], *, all_dead: bool) -> int:
    from comfywatch.store import Store

    async def revive() -> int | None:
        store = Store.open(database_url, create=False)
        try:
            await store.check_schema()
            if not ids and not all_dead:
                return None
            return await store.revive_deliveries(ids, all_dead=all_dead, now_s=time.time())
        finally:
            await store.close()

    count = asyncio.run(revive())
    if count is None:
        err("hooks retry: give delivery ids or --all-dead")
        return EX_USAGE
    print(f"{count} deliver{'y' if count == 1 else 'ies'} queued again")
    return EX_OK if count or all_dead else EX_FAILURE
