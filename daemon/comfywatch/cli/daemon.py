"""``run``, ``check-config`` and ``migrate``: the daemon, its configuration and its schema."""

from __future__ import annotations

import argparse
import asyncio
import functools

from comfywatch.cli.context import configure_logging, settings_of
from comfywatch.cli.output import EX_OK, EX_SOFTWARE, err, labels_text, table
from comfywatch.config import Settings, url_origin
from comfywatch.errors import ComfywatchError


def run(args: argparse.Namespace) -> int:
    """The daemon. A bug (any exception that is not one of ours) is logged once, with its
    traceback, and the exit status is 70 (EX_SOFTWARE): systemd's restart policy acts,
    rather than a loop retrying what will fail again."""
    settings = settings_of(args)
    configure_logging(args, settings)
    from comfywatch.service import run_daemon

    # Reloads set logging up again the same way: the command line's flags still win.
    log_setup = functools.partial(configure_logging, args)
    try:
        return asyncio.run(run_daemon(settings, until_done=args.until_done, log_setup=log_setup))
    except ComfywatchError:
        raise  # a config or database problem: main() says it, with its exit status
    except Exception:
        import structlog

        structlog.get_logger("comfywatch.service").exception("daemon_crashed")
        return EX_SOFTWARE


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
    _warn(settings)
    return EX_OK


def _warn(settings: Settings) -> None:
    """Likely mistakes, on stderr: the config and its jobs_dir, and the main file's jobs
    against the database (when there is one to read)."""
    from comfywatch.advice import config_advice, registered_advice
    from comfywatch.errors import StoreError
    from comfywatch.store import JobRow
    from comfywatch.store.readonly import read_unless_new
    from comfywatch.store.reads import select_known

    found = config_advice(settings)
    url = settings.daemon.database_url
    keys = [(job.server, job.prompt_id) for job in settings.jobs]
    if keys:
        # No database yet (a SQLite file not there, a PostgreSQL database not migrated):
        # nothing registered to compare with.
        try:
            none: dict[tuple[str, str], JobRow] = {}
            known = read_unless_new(url, lambda conn: select_known(conn, keys), none)
        except StoreError as exc:
            err(f"warning: the jobs were not compared with the database: {exc}")
        else:
            found.extend(registered_advice(settings, known))
    for advice in found:
        err(f"warning: {advice}")
