"""``hooks``: list hook deliveries (read-only), ``hooks retry`` dead ones, or ``hooks test``
one hook with a sample event (through the daemon's own attempt code, nothing recorded)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import EX_FAILURE, EX_OK, EX_USAGE, err, print_json, say, table
from comfywatch.config import Settings
from comfywatch.states import DeliveryState, JobState
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_deliveries
from comfywatch.views import delivery_json

if TYPE_CHECKING:
    from comfywatch.hooks.policy import AttemptResult


def hooks(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.hooks_command == "retry":
        return _retry(settings.daemon.database_url, args.ids, all_dead=args.all_dead)
    if args.hooks_command == "test":
        return _test(settings, args.name, JobState(args.state))
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


def _test(settings: Settings, name: str, state: JobState) -> int:
    """Send a sample event to the hook ``name`` now; print what the receiver answered."""
    from comfywatch.config import WebhookHookSettings
    from comfywatch.hooks.attempt import Attempts
    from comfywatch.hooks.payload import sample_delivery

    hook = settings.hooks.get(name)
    if hook is None:
        known = ", ".join(sorted(settings.hooks)) or "none is configured"
        err(f"hooks test: unknown hook {name!r} (known: {known})")
        return EX_USAGE
    server = next(iter(settings.servers), "local")
    due = sample_delivery(name, state, server=server, now_s=time.time())

    async def attempt() -> AttemptResult:
        attempts = Attempts(clock=time.time)
        try:
            return (await attempts.make(due, settings.hooks)).result
        finally:
            await attempts.close()

    result = asyncio.run(attempt())
    kind = "webhook" if isinstance(hook, WebhookHookSettings) else "command"
    if result.status_code is not None:
        answer = f"HTTP {result.status_code}"
    elif result.error is not None:
        answer = result.error
    else:
        answer = "exit status 0"
    verdict = "delivered" if result.ok else "failed"
    say(f"{name} ({kind}): {verdict}: {answer} (event {due.delivery.event_id}, type job.test)")
    if result.response:
        say(result.response.rstrip("\n"))
    return EX_OK if result.ok else EX_FAILURE
