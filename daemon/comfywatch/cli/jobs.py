"""``jobs`` and ``show``: tracked jobs as a table, as text or as JSON.

Read-only queries: the database is opened for reading, never migrated, and the rows come
back as the store's frozen values, straight to the formatters. ``show`` takes a prompt id
or a unique prefix of one; ``jobs --watch`` redraws the table until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from datetime import UTC, datetime

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import (
    EX_FAILURE,
    EX_OK,
    EX_USAGE,
    err,
    labels_text,
    print_json,
    printable,
    say,
    table,
)
from comfywatch.states import JobState
from comfywatch.store import JobFilter, JobRecord, JobRow
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_jobs, select_jobs_by_prefix
from comfywatch.views import job_json

#: Candidates listed when a prompt id prefix is ambiguous.
CANDIDATES_SHOWN = 10
#: Clears the terminal and puts the cursor at its top left (``jobs --watch``).
CLEAR = "\x1b[H\x1b[2J"

_SHOWN_FIELDS = (
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
    "detail",
)


def list_jobs(args: argparse.Namespace) -> int:
    if args.json and args.watch:
        err("--watch redraws a table: it does not go with --json")
        return EX_USAGE
    settings = settings_of(args)
    flt = JobFilter(
        states=[JobState(s) for s in args.state or ()],
        server=args.server,
        labels=dict(args.label),
        limit=args.limit,
    )

    def fetch() -> list[JobRecord]:
        return read(settings.daemon.database_url, lambda conn: select_jobs(conn, flt))

    if args.json:
        print_json([job_json(r) for r in fetch()])
        return EX_OK
    if not args.watch:
        jobs_table(fetch())
        return EX_OK
    clear = CLEAR if sys.stdout.isatty() else ""
    try:
        while True:
            records = fetch()
            screen = io.StringIO()
            with contextlib.redirect_stdout(screen):
                now = datetime.now(UTC)
                print(f"{clock_text(now)}  every {args.interval:g} s, Ctrl-C to quit")
                print()
                jobs_table(records, now=now)
            sys.stdout.write(clear + screen.getvalue())
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print()
        return EX_OK


def jobs_table(records: list[JobRecord], *, now: datetime | None = None) -> None:
    """The ``jobs`` table: times to the second in UTC, the run time of each job (see
    :func:`run_time_text`)."""
    now = now or datetime.now(UTC)
    rows = [
        [
            r.job.server,
            r.job.prompt_id,
            r.job.state.value,
            progress_text(r.job),
            r.job.reason.value if r.job.reason is not None else "",
            clock_text(r.job.registered_at),
            clock_text(r.job.queued_at),
            clock_text(r.job.started_at),
            clock_text(r.job.finished_at),
            run_time_text(r.job, now),
            str(len(r.outputs)),
            labels_text(r.job.labels),
        ]
        for r in records
    ]
    table(
        [
            "SERVER",
            "PROMPT_ID",
            "STATE",
            "PROGRESS",
            "REASON",
            "REGISTERED",
            "QUEUED",
            "STARTED",
            "FINISHED",
            "DURATION",
            "OUTPUTS",
            "LABELS",
        ],
        rows,
    )


def clock_text(value: datetime | None) -> str:
    """A time to the second, ISO 8601 in UTC (``2026-11-27T04:00:01Z``), or ``""``."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_time_text(job: JobRow, now: datetime) -> str:
    """``finished_at - started_at`` when both come from one clock; for a job still running,
    the time so far with a ``+``; else ``""``.

    Each of the two is ComfyUI's stamp when the history entry had it (``comfy_*_ms`` is
    then set), else when comfywatch saw the change: a difference across the two hosts'
    clocks would be no duration, so none is shown.
    """
    if job.started_at is None:
        return ""
    started_by_comfy = job.comfy_started_at_ms is not None
    if job.finished_at is not None:
        if started_by_comfy != (job.comfy_finished_at_ms is not None):
            return ""
        return duration_text((job.finished_at - job.started_at).total_seconds())
    if job.state is JobState.RUNNING and not started_by_comfy:
        return duration_text((now - job.started_at).total_seconds()) + "+"
    return ""


def duration_text(seconds: float) -> str:
    """``0.4s``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600:02d}h"


def progress_text(job: JobRow) -> str:
    """``3/20`` (the last progress recorded), or empty."""
    if job.progress_value is None or job.progress_max is None:
        return ""
    return f"{job.progress_value}/{job.progress_max}"


def show_job(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    wanted: str = args.prompt_id
    if not wanted:
        err("an empty prompt id matches nothing")
        return EX_USAGE

    found = read(
        settings.daemon.database_url,
        lambda conn: select_jobs_by_prefix(
            conn, wanted, server=args.server, limit=CANDIDATES_SHOWN + 1
        ),
    )
    if found.candidates:
        err(f"prompt id prefix {wanted!r} is ambiguous; candidates:")
        for candidate in found.candidates[:CANDIDATES_SHOWN]:
            print(f"  {printable(candidate)}", file=sys.stderr)
        if len(found.candidates) > CANDIDATES_SHOWN:
            print("  ... (give more of the id)", file=sys.stderr)
        return EX_USAGE
    records = found.jobs
    if not records:
        where = f" on server {args.server!r}" if args.server is not None else ""
        err(f"no job with prompt id {wanted!r} or an id starting with it{where}")
        return EX_FAILURE
    if len(records) > 1:
        servers = ", ".join(r.job.server for r in records)
        prompt_id = records[0].job.prompt_id
        err(f"prompt id {prompt_id!r} is tracked on several servers ({servers}): --server")
        return EX_USAGE
    data = job_json(records[0], deliveries=True)
    data["source"] = records[0].job.source
    if args.json:
        print_json(data)
        return EX_OK
    for key in _SHOWN_FIELDS:
        say(f"{key + ':':15}{'' if data[key] is None else data[key]}")
    say(f"{'labels:':15}{labels_text(data['labels']) or ''}")
    say(f"{'source:':15}{data['source'] or ''}")
    if data["progress"]:
        progress = data["progress"]
        node = f" node {progress['node']}" if progress["node"] is not None else ""
        say(f"{'progress:':15}{progress['value']}/{progress['max']}{node} at {progress['at']}")
    if data["error"]:
        error = data["error"]
        say(f"error:         node {error['node_id']} ({error['node_type']})")
        say(f"               {error['exception_type']}: {error['exception_message']}".rstrip())
    say(f"outputs ({len(data['outputs'])}):")
    for out in data["outputs"]:
        what = (
            "/".join(p for p in (out["subfolder"], out["filename"]) if p)
            if out["filename"] is not None
            else json.dumps(out.get("value"))
        )
        where = f"node {out['node_id']} {out['kind']}[{out['position']}]"
        say(f"  {where} {what} {out['type'] or ''}".rstrip())
    say(f"deliveries ({len(data['deliveries'])}):")
    for dl in data["deliveries"]:
        say(f"  #{dl['id']} {dl['hook']} {dl['state']} attempts={dl['attempts']}")
    return EX_OK
