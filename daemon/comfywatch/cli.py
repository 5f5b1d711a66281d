"""The ``comfywatch`` command line: argument parsing, output formatting, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from comfywatch import __version__
from comfywatch.config import Settings, default_config_path, load_settings, url_origin
from comfywatch.errors import ConfigError, StoreError
from comfywatch.logs import configure_logging
from comfywatch.states import DeliveryState, JobState
from comfywatch.store import JobFilter, Store
from comfywatch.views import delivery_json, iso, job_json

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

T = TypeVar("T")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h or 90m, got {text!r}")
    unit = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _common_options(*, default: object) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=default,
        help="config file (default: $COMFYWATCH_CONFIG, then /etc/comfywatch/comfywatch.toml)",
    )
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default
    )
    common.add_argument("--log-format", choices=["auto", "json", "console"], default=default)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfywatch",
        description="Track ComfyUI prompts to the end; record them in SQLite; fire hooks.",
    )
    parser.add_argument("--version", action="version", version=f"comfywatch {__version__}")
    common = _common_options(default=None)
    # For sub-subcommands (hooks retry): an option given before the action must survive.
    nested = _common_options(default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon until stopped")
    run.add_argument(
        "--until-done",
        action="store_true",
        help="exit 0 once every job is terminal and every hook delivered or dead",
    )
    sub.add_parser("check-config", parents=[common], help="validate the config and list jobs")
    sub.add_parser("migrate", parents=[common], help="create or upgrade the database schema")
    sub.add_parser(
        "healthcheck",
        parents=[common],
        help="exit 0 if the running daemon is healthy (its /healthz, else the database)",
    )

    jobs = sub.add_parser("jobs", parents=[common], help="list tracked jobs")
    jobs.add_argument("--state", action="append", choices=[s.value for s in JobState])
    jobs.add_argument("--server")
    jobs.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    jobs.add_argument("--limit", type=int, default=None)
    jobs.add_argument("--json", action="store_true", help="print a JSON array")

    show = sub.add_parser("show", parents=[common], help="show one job in full")
    show.add_argument("prompt_id")
    show.add_argument("--server")
    show.add_argument("--json", action="store_true")

    hooks = sub.add_parser("hooks", parents=[common], help="list or retry hook deliveries")
    hooks_sub = hooks.add_subparsers(dest="hooks_command", metavar="ACTION")
    hooks.add_argument("--state", choices=[s.value for s in DeliveryState])
    hooks.add_argument("--limit", type=int, default=None)
    hooks.add_argument("--json", action="store_true")
    retry = hooks_sub.add_parser("retry", parents=[nested], help="send dead deliveries again")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--all-dead", action="store_true")

    register = sub.add_parser(
        "register", parents=[common], help="register jobs: write a file into jobs_dir"
    )
    register.add_argument("--server", required=True)
    register.add_argument("prompt_ids", nargs="+", metavar="PROMPT_ID")
    register.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    register.add_argument(
        "--hooks",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="A,B",
        help='hooks for these jobs ("" for none; default: default_hooks)',
    )
    register.add_argument("--wait", action="store_true", help="wait for the daemon's verdict")
    register.add_argument("--timeout", type=float, default=60.0, metavar="S", help="for --wait")

    prune = sub.add_parser("prune", parents=[common], help="delete old terminal jobs")
    prune.add_argument("--older-than", type=_duration_s, required=True, metavar="AGE")
    prune.add_argument("--dry-run", action="store_true")

    fake = sub.add_parser("fake-server", help="run a fake ComfyUI for trying comfywatch")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8188)
    fake.add_argument("--run-time", type=float, default=2.0, help="seconds each prompt 'runs'")
    return parser


def _err(message: str) -> None:
    print(f"comfywatch: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return EX_CONFIG
    except StoreError as exc:
        _err(str(exc))
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or default_config_path(os.environ)
    return load_settings(path)


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await coro()

    return asyncio.run(wrapper())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "fake-server":
        return _fake_server(args)
    settings = _settings(args)
    configure_logging(
        args.log_level or settings.daemon.log_level,
        args.log_format or settings.daemon.log_format,
        # The daemon logs to stdout (journald, containers); queries keep stdout for data.
        stream=sys.stdout if args.command == "run" else sys.stderr,
    )
    if args.command == "run":
        from comfywatch.service import run_daemon

        return _run(lambda: run_daemon(settings, until_done=args.until_done))
    if args.command == "check-config":
        return _check_config(settings)
    if args.command == "migrate":
        return _run(lambda: _migrate(settings))
    if args.command == "healthcheck":
        return _run(lambda: _healthcheck(settings))
    if args.command == "register":
        return _register(settings, args)
    handlers: dict[str, Callable[[Store, argparse.Namespace], Awaitable[int]]] = {
        "jobs": _jobs,
        "show": _show,
        "hooks": _hooks,
        "prune": lambda store, args: _prune(store, args, settings),
    }
    readonly = args.command in ("jobs", "show") or (
        args.command == "hooks" and args.hooks_command is None
    )
    return _run(lambda: _with_store(settings, handlers[args.command], args, readonly=readonly))


async def _with_store(
    settings: Settings,
    handler: Callable[[Store, argparse.Namespace], Awaitable[int]],
    args: argparse.Namespace,
    *,
    readonly: bool,
) -> int:
    store = Store.open(settings.daemon.database_url, create=False, readonly=readonly)
    try:
        current, head = await store.schema_revision()
        if current != head:
            if readonly:
                raise StoreError(
                    f"database schema is at {current or 'nothing'}, this version needs {head}: "
                    "run `comfywatch migrate` (or start the daemon)"
                )
            await store.migrate()
        return await handler(store, args)
    finally:
        await store.close()


async def _migrate(settings: Settings) -> int:
    store = Store.open(settings.daemon.database_url)
    try:
        before, head = await store.schema_revision()
        await store.migrate()
        print(f"database schema: {before or 'empty'} -> {head}")
        return EX_OK
    finally:
        await store.close()


async def _healthcheck(settings: Settings) -> int:
    d = settings.daemon
    if d.http_host is not None and d.http_port is not None:
        import aiohttp

        host = f"[{d.http_host}]" if ":" in d.http_host else d.http_host
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://{host}:{d.http_port}/healthz") as response,
            ):
                body = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            _err(f"unhealthy: {type(exc).__name__}")
            return EX_FAILURE
        print(body)
        return EX_OK if response.status == 200 else EX_FAILURE
    store = Store.open(d.database_url, create=False, readonly=True)
    try:
        current, head = await store.schema_revision()
    finally:
        await store.close()
    if current != head:
        _err(f"database schema at {current}, expected {head}")
        return EX_FAILURE
    print("database ok")
    return EX_OK


def _check_config(settings: Settings) -> int:
    d = settings.daemon
    print(f"config: {settings.path}")
    print(f"database: {_safe_url(d.database_url)}")
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
        [j.server, j.prompt_id, _labels(j.labels), ",".join(j.hooks) or "-", j.source]
        for j in settings.jobs
    ]
    _table(["SERVER", "PROMPT_ID", "LABELS", "HOOKS", "SOURCE"], rows, indent="  ")
    return EX_OK


def _register(settings: Settings, args: argparse.Namespace) -> int:
    from comfywatch.spool.register import Outcome, jobs_file_text, submit, wait_for_verdict

    try:
        text = jobs_file_text(
            args.server, args.prompt_ids, labels=dict(args.label), hooks=args.hooks
        )
        path = submit(settings, text)
    except ValueError as exc:  # InvalidJobs: what the daemon would reject
        _err(f"register: {exc}")
        return EX_USAGE
    except OSError as exc:
        _err(f"register: cannot write into {settings.daemon.jobs_dir}: {exc.strerror or exc}")
        return EX_CANTCREAT
    if not args.wait:
        print(path)
        return EX_OK
    verdict = wait_for_verdict(path, args.timeout)
    if verdict.outcome is Outcome.ACCEPTED:
        print(f"registered: {verdict.path or 'the file was deleted'}")
        return EX_OK
    if verdict.outcome is Outcome.REJECTED:
        _err(f"register: rejected, set aside as {verdict.path}:\n{verdict.error}")
        return EX_FAILURE
    _err(f"register: {path} is still waiting after {args.timeout:g} s (is the daemon running?)")
    return EX_TEMPFAIL


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def _jobs(store: Store, args: argparse.Namespace) -> int:
    records = await store.jobs(
        JobFilter(
            states=[JobState(s) for s in args.state or ()],
            server=args.server,
            labels=dict(args.label),
            limit=args.limit,
        )
    )
    if args.json:
        _print_json([job_json(r) for r in records])
        return EX_OK
    rows = [
        [
            r.job.server,
            r.job.prompt_id,
            r.job.state.value,
            r.job.reason.value if r.job.reason is not None else "",
            iso(r.job.registered_at) or "",
            iso(r.job.finished_at) or "",
            str(len(r.outputs)),
            _labels(r.job.labels),
        ]
        for r in records
    ]
    _table(
        ["SERVER", "PROMPT_ID", "STATE", "REASON", "REGISTERED", "FINISHED", "OUTPUTS", "LABELS"],
        rows,
    )
    return EX_OK


async def _show(store: Store, args: argparse.Namespace) -> int:
    records = await store.jobs(
        JobFilter(prompt_id=args.prompt_id, server=args.server), with_deliveries=True
    )
    if not records:
        _err(f"no job with prompt id {args.prompt_id!r}")
        return EX_FAILURE
    if len(records) > 1:
        servers = ", ".join(r.job.server for r in records)
        _err(f"prompt id {args.prompt_id!r} is tracked on several servers ({servers}): --server")
        return EX_USAGE
    data = job_json(records[0], deliveries=True)
    if args.json:
        _print_json(data)
        return EX_OK
    for key in (
        "server",
        "prompt_id",
        "state",
        "reason",
        "status_str",
        "completed",
        "number",
        "registered_at",
        "queued_at",
        "started_at",
        "finished_at",
        "detected_at",
    ):
        _say(f"{key + ':':15}{'' if data[key] is None else data[key]}")
    _say(f"{'labels:':15}{_labels(data['labels']) or ''}")
    if data["error"]:
        err = data["error"]
        _say(f"error:         node {err['node_id']} ({err['node_type']})")
        _say(f"               {err['exception_type']}: {err['exception_message']}".rstrip())
    _say(f"outputs ({len(data['outputs'])}):")
    for out in data["outputs"]:
        what = (
            "/".join(p for p in (out["subfolder"], out["filename"]) if p)
            if out["filename"] is not None
            else json.dumps(out.get("value"))
        )
        where = f"node {out['node_id']} {out['kind']}[{out['position']}]"
        _say(f"  {where} {what} {out['type'] or ''}".rstrip())
    _say(f"deliveries ({len(data['deliveries'])}):")
    for dl in data["deliveries"]:
        _say(f"  #{dl['id']} {dl['hook']} {dl['state']} attempts={dl['attempts']}")
    return EX_OK


async def _hooks(store: Store, args: argparse.Namespace) -> int:
    if args.hooks_command == "retry":
        if not args.ids and not args.all_dead:
            _err("hooks retry: give delivery ids or --all-dead")
            return EX_USAGE
        count = await store.revive_deliveries(args.ids, all_dead=args.all_dead, now_s=time.time())
        print(f"{count} deliver{'y' if count == 1 else 'ies'} queued again")
        return EX_OK if count or args.all_dead else EX_FAILURE
    states = [DeliveryState(args.state)] if args.state else []
    items = [
        delivery_json(d, j) for d, j in await store.deliveries(states=states, limit=args.limit)
    ]
    if args.json:
        _print_json(items)
        return EX_OK
    _table(
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


async def _prune(store: Store, args: argparse.Namespace, settings: Settings) -> int:
    from comfywatch.service import configured

    cutoff = time.time() - args.older_than
    # Jobs still in the config stay: the daemon would register them again as new ones.
    count = await store.prune(cutoff, dry_run=args.dry_run, keep=configured(settings))
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {count} job{'s' if count != 1 else ''} finished before {iso_s(cutoff)}")
    return EX_OK


def iso_s(ts: float) -> str:
    from datetime import UTC, datetime

    return iso(datetime.fromtimestamp(ts, tz=UTC)) or ""


def _fake_server(args: argparse.Namespace) -> int:
    from comfywatch.testing import serve

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.run_time, stop)

    asyncio.run(main())
    return EX_OK


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels or {}).items()))


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def _say(text: str) -> None:
    """Print text that may come from a remote server: control characters (terminal escape
    sequences) are shown escaped, never sent to the terminal."""
    print(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _table(header: list[str], rows: list[list[str]], *, indent: str = "") -> None:
    rows = [[_CONTROL.sub("?", c) for c in row] for row in rows]
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [header, *rows]:
        _say(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
