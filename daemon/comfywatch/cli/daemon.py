"""``run``, ``check-config`` and ``migrate``: the daemon, its configuration and its schema."""

from __future__ import annotations

import argparse
import asyncio
import functools

from comfywatch.cli.context import configure_logging, settings_of
from comfywatch.cli.output import EX_OK, labels_text, table
from comfywatch.config import Settings, url_origin


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configure_logging(args, settings)
    from comfywatch.service import run_daemon

    # Reloads set logging up again the same way: the command line's flags still win.
    log_setup = functools.partial(configure_logging, args)
    return asyncio.run(run_daemon(settings, until_done=args.until_done, log_setup=log_setup))


def migrate(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configure_logging(args, settings)
    return asyncio.run(_migrate(settings))


async def _migrate(settings: Settings) -> int:
    from comfywatch.store import Store

    store = Store.open(settings.daemon.database_url)
    try:
        before, head = await store.schema_revision()
        await store.migrate()
        print(f"database schema: {before or 'empty'} -> {head}")
        return EX_OK
    finally:
        await store.close()


def check_config(args: argparse.Namespace) -> int:
    from comfywatch.store.drivers import display_url

    settings = settings_of(args)
    configure_logging(args, settings)
    d = settings.daemon
    print(f"config: {settings.path}")
    print(f"database: {display_url(d.database_url)}")
    print(f"poll interval: {d.poll_interval_s}s, not found after: {d.not_found_after_s}s")
    print(f"jobs dir: {d.jobs_dir or '(none)'}")
    print(f"servers ({len(settings.servers)}):")
    for name, server in sorted(settings.servers.items()):
        headers = ", ".join(sorted(server.headers)) or "none"
        print(f"  {name}: {server.url} (headers: {headers})")
    print(f"hooks ({len(settings.hooks)}):")
    for name, hook in sorted(settings.hooks.items()):
        # The origin only: webhook URLs often carry tokens in their path or query.
        target = url_origin(hook.url) if hook.type == "webhook" else hook.argv[0]
        on = ",".join(sorted(s.value for s in hook.on))
        print(f"  {name}: {hook.type} {target} on {on}")
    print(f"jobs ({len(settings.jobs)}):")
    rows = [
        [j.server, j.prompt_id, labels_text(j.labels), ",".join(j.hooks) or "-", j.source]
        for j in settings.jobs
    ]
    table(["SERVER", "PROMPT_ID", "LABELS", "HOOKS", "SOURCE"], rows, indent="  ")
    return EX_OK
