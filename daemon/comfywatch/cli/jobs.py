"""``jobs`` and ``show``: tracked jobs as a table, as text or as JSON.

Read-only queries: the database is opened for reading, never migrated, and the rows come
back as the store's frozen values, straight to the formatters.
"""

from __future__ import annotations

import argparse
import json

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import (
    EX_FAILURE,
    EX_OK,
    EX_USAGE,
    err,
    labels_text,
    print_json,
    say,
    table,
)
from comfywatch.states import JobState
from comfywatch.store import JobFilter, JobRow
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_jobs
from comfywatch.views import iso, job_json

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
    settings = settings_of(args)
    flt = JobFilter(
        states=[JobState(s) for s in args.state or ()],
        server=args.server,
        labels=dict(args.label),
        limit=args.limit,
    )
    records = read(settings.daemon.database_url, lambda conn: select_jobs(conn, flt))
    if args.json:
        print_json([job_json(r) for r in records])
        return EX_OK
    rows = [
        [
            r.job.server,
            r.job.prompt_id,
            r.job.state.value,
            progress_text(r.job),
            r.job.reason.value if r.job.reason is not None else "",
            iso(r.job.registered_at) or "",
            iso(r.job.finished_at) or "",
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
            "FINISHED",
            "OUTPUTS",
            "LABELS",
        ],
        rows,
    )
    return EX_OK


def progress_text(job: JobRow) -> str:
    """``3/20`` (the last progress recorded), or empty."""
    if job.progress_value is None or job.progress_max is None:
        return ""
    return f"{job.progress_value}/{job.progress_max}"


def show_job(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    flt = JobFilter(prompt_id=args.prompt_id, server=args.server)
    records = read(
        settings.daemon.database_url, lambda conn: select_jobs(conn, flt, with_deliveries=True)
    )
    if not records:
        err(f"no job with prompt id {args.prompt_id!r}")
        return EX_FAILURE
    if len(records) > 1:
        servers = ", ".join(r.job.server for r in records)
        err(f"prompt id {args.prompt_id!r} is tracked on several servers ({servers}): --server")
        return EX_USAGE
    data = job_json(records[0], deliveries=True)
    if args.json:
        print_json(data)
        return EX_OK
    for key in _SHOWN_FIELDS:
        say(f"{key + ':':15}{'' if data[key] is None else data[key]}")
    say(f"{'labels:':15}{labels_text(data['labels']) or ''}")
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
