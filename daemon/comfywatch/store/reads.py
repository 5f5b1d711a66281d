"""Listing queries in SQLAlchemy Core: the columns wanted, each row turned straight into a
frozen value (no ORM object per row).

Plain functions of a synchronous ``Connection``: the async store runs them with
``run_sync``, the command line on a read-only connection (:mod:`comfywatch.store.readonly`).
:func:`prunable` and :func:`owes_delivery` are the conditions of ``prune``, shared by
:meth:`Store.prune` and the dry run (:func:`select_prunable`).

Each walks an index: jobs newest first (``ix_jobs_registered_at_id``) or by prompt id
(``ix_jobs_prompt_id``), outputs and deliveries by job (their unique constraints' indexes),
deliveries newest first (the primary key).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import fields
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, Select, and_, func, select

from comfywatch.history import OutputRecord
from comfywatch.states import ACTIVE_STATES, DeliveryState, JobState
from comfywatch.store.rows import chunks, utc
from comfywatch.store.tables import hook_deliveries, job_outputs, jobs, replicas, server_leases
from comfywatch.store.values import (
    OUTPUT_FIELDS,
    DeliveryRecord,
    DeliveryRow,
    JobFilter,
    JobRecord,
    JobRow,
    PruneCandidate,
    ReplicaRow,
)

_JOBS = jobs
_OUTPUTS = job_outputs
_DELIVERIES = hook_deliveries

#: The ``jobs`` columns of a :class:`JobRow`, in its field order; ``history`` (up to 1 MB)
#: only when asked for.
_JOB_FIELDS = tuple(f.name for f in fields(JobRow) if f.name != "history")
_DELIVERY_FIELDS = tuple(f.name for f in fields(DeliveryRow))


def select_jobs(
    conn: Connection,
    flt: JobFilter,
    *,
    with_deliveries: bool = False,
    with_history: bool = False,
) -> list[JobRecord]:
    """Jobs matching ``flt``, newest registration first, with their outputs (and their
    deliveries and stored history entries when asked)."""
    names = (*_JOB_FIELDS, "history") if with_history else _JOB_FIELDS
    jobs = [_job_row(names, row) for row in conn.execute(_job_query(flt, names))]
    return _records(conn, jobs, with_deliveries=with_deliveries)


def select_known(
    conn: Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], JobRow]:
    """The rows of the jobs among ``keys`` (server, prompt_id) that are registered."""
    c = _JOBS.c
    by_server: dict[str, list[str]] = {}
    for server, prompt_id in keys:
        by_server.setdefault(server, []).append(prompt_id)
    known: dict[tuple[str, str], JobRow] = {}
    for server, prompt_ids in by_server.items():
        for chunk in chunks(prompt_ids):
            query = select(*(c[name] for name in _JOB_FIELDS)).where(
                c.server == server, c.prompt_id.in_(chunk)
            )
            for row in conn.execute(query):
                job = _job_row(_JOB_FIELDS, row)
                known[(job.server, job.prompt_id)] = job
    return known


def select_job(conn: Connection, job_id: int) -> JobRecord | None:
    """One job with its outputs, by database id."""
    query = select(*(_JOBS.c[name] for name in _JOB_FIELDS)).where(_JOBS.c.id == job_id)
    jobs = [_job_row(_JOB_FIELDS, row) for row in conn.execute(query)]
    return next(iter(_records(conn, jobs, with_deliveries=False)), None)


def select_job_rows(
    conn: Connection, prompt_ids: Sequence[str], *, server: str | None = None
) -> list[JobRow]:
    """The jobs of ``prompt_ids`` (on ``server``, or on any), without their outputs."""
    c = _JOBS.c
    rows: list[JobRow] = []
    for chunk in chunks(list(dict.fromkeys(prompt_ids))):
        query = select(*(c[name] for name in _JOB_FIELDS)).where(c.prompt_id.in_(chunk))
        if server is not None:
            query = query.where(c.server == server)
        rows.extend(_job_row(_JOB_FIELDS, row) for row in conn.execute(query))
    return rows


def match_prompt_ids(
    conn: Connection, prefix: str, *, server: str | None = None, limit: int | None = None
) -> list[str]:
    """The prompt ids that start with ``prefix`` (case sensitive), each once, in order:
    the candidates of an abbreviated id."""
    c = _JOBS.c
    query = (
        select(c.prompt_id)
        .distinct()
        .where(func.substr(c.prompt_id, 1, len(prefix)) == prefix)
        .order_by(c.prompt_id)
    )
    if conn.dialect.name == "sqlite" and prefix:
        # SQLite compares text byte by byte (UTF-8 keeps code point order), so the ids
        # starting with the prefix are one range of ix_jobs_prompt_id. Other databases
        # may sort by a locale: there the substring test alone decides.
        query = query.where(c.prompt_id >= prefix)
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            after = last + 1 if not 0xD800 <= last + 1 <= 0xDFFF else 0xE000
            query = query.where(c.prompt_id < prefix[:-1] + chr(after))
    if server is not None:
        query = query.where(c.server == server)
    if limit is not None:
        query = query.limit(limit)
    return list(conn.execute(query).scalars())


class PrefixMatch(NamedTuple):
    """What :func:`select_jobs_by_prefix` found."""

    #: The jobs of the one prompt id meant (several: it is tracked on several servers).
    jobs: list[JobRecord]
    #: The prompt ids starting with the prefix when there are several (``jobs`` is then
    #: empty); at most ``limit``.
    candidates: list[str]


def select_jobs_by_prefix(
    conn: Connection, text: str, *, server: str | None = None, limit: int = 10
) -> PrefixMatch:
    """The jobs whose prompt id is ``text``, else those whose prompt id starts with it if
    that is one prompt id (as git takes an abbreviated commit), with outputs and
    deliveries; else the candidates."""
    flt = JobFilter(prompt_id=text, server=server)
    records = select_jobs(conn, flt, with_deliveries=True)
    if records or not text:
        return PrefixMatch(records, [])
    found = match_prompt_ids(conn, text, server=server, limit=limit)
    if len(found) != 1:
        return PrefixMatch([], found)
    flt = JobFilter(prompt_id=found[0], server=server)
    return PrefixMatch(select_jobs(conn, flt, with_deliveries=True), [])


def select_live(
    conn: Connection, states: Sequence[JobState], *, limit: int, recent: bool = False
) -> list[JobRow]:
    """Jobs in ``states`` (their last progress included): oldest registration first, or
    with ``recent`` the latest finished first (for terminal states)."""
    c = _JOBS.c
    query = select(*(c[name] for name in _JOB_FIELDS)).where(c.state.in_(list(states)))
    if recent:
        query = query.where(c.finished_at.is_not(None)).order_by(c.finished_at.desc(), c.id.desc())
    else:
        query = query.order_by(c.registered_at, c.id)
    return [_job_row(_JOB_FIELDS, row) for row in conn.execute(query.limit(limit))]


def count_jobs(conn: Connection, states: Sequence[JobState]) -> dict[tuple[str, JobState], int]:
    """How many jobs each server has in each of ``states``."""
    c = _JOBS.c
    query = (
        select(c.server, c.state, func.count())
        .where(c.state.in_(list(states)))
        .group_by(c.server, c.state)
    )
    return {(server, state): count for server, state, count in conn.execute(query)}


def select_deliveries(
    conn: Connection, *, states: Sequence[DeliveryState] = (), limit: int | None = None
) -> list[DeliveryRecord]:
    """Deliveries in ``states`` (any if empty), newest first, with their jobs."""
    d = _DELIVERIES.c
    query = (
        select(*(d[name] for name in _DELIVERY_FIELDS), *(_JOBS.c[n] for n in _JOB_FIELDS))
        .join_from(_DELIVERIES, _JOBS, d.job_id == _JOBS.c.id)
        .order_by(d.id.desc())
    )
    if states:
        query = query.where(d.state.in_(list(states)))
    if limit is not None:
        query = query.limit(limit)
    split = len(_DELIVERY_FIELDS)
    return [
        DeliveryRecord(DeliveryRow(*row[:split]), _job_row(_JOB_FIELDS, row[split:]))
        for row in conn.execute(query)
    ]


def prunable(cutoff_s: float) -> ColumnElement[bool]:
    """Terminal jobs that ended (by ``detected_at``, else ``updated_at``) before
    ``cutoff_s``: what ``prune`` deletes, but for those that :func:`owes_delivery`."""
    return and_(_JOBS.c.state.not_in(list(ACTIVE_STATES)), _ended_at() < utc(cutoff_s))


def owes_delivery() -> ColumnElement[bool]:
    """Jobs with a pending hook delivery: never pruned (the delivery would be lost)."""
    d = _DELIVERIES.c
    return _JOBS.c.id.in_(select(d.job_id).where(d.state == DeliveryState.PENDING))


def select_prunable(conn: Connection, cutoff_s: float) -> list[PruneCandidate]:
    """Every job :func:`prunable` at ``cutoff_s``, oldest end first, each saying whether
    it still owes a delivery (what ``prune --dry-run`` lists)."""
    c = _JOBS.c
    ended = _ended_at()
    query = (
        select(c.server, c.prompt_id, c.state, ended, owes_delivery())
        .where(prunable(cutoff_s))
        .order_by(ended, c.id)
    )
    return [PruneCandidate(*row) for row in conn.execute(query)]


def _ended_at() -> ColumnElement[Any]:
    return func.coalesce(_JOBS.c.detected_at, _JOBS.c.updated_at)


def _job_query(flt: JobFilter, names: Sequence[str]) -> Select[Any]:
    c = _JOBS.c
    query = select(*(c[name] for name in names)).order_by(c.registered_at.desc(), c.id.desc())
    if flt.states:
        query = query.where(c.state.in_(list(flt.states)))
    if flt.server is not None:
        query = query.where(c.server == flt.server)
    if flt.prompt_id is not None:
        query = query.where(c.prompt_id == flt.prompt_id)
    for key, value in flt.labels.items():
        query = query.where(c.labels[key].as_string() == value)
    if flt.limit is not None:
        query = query.limit(flt.limit)
    return query


def _job_row(names: Sequence[str], row: Sequence[Any]) -> JobRow:
    values = dict(zip(names, row, strict=True))
    values["labels"] = dict(values["labels"] or {})
    values["hooks"] = tuple(str(h) for h in values["hooks"] or ())
    return JobRow(**values)


def _records(conn: Connection, jobs: list[JobRow], *, with_deliveries: bool) -> list[JobRecord]:
    ids = [j.id for j in jobs]
    outputs = outputs_of(conn, ids)
    deliveries = _deliveries(conn, ids) if with_deliveries else {}
    return [
        JobRecord(j, tuple(outputs.get(j.id, ())), tuple(deliveries.get(j.id, ()))) for j in jobs
    ]


def outputs_of(conn: Connection, ids: Sequence[int]) -> dict[int, list[OutputRecord]]:
    """The output records of each job in ``ids``, in the order they were written."""
    c = _OUTPUTS.c
    columns = [c.job_id, *(c[name] for name in OUTPUT_FIELDS)]
    outputs: dict[int, list[OutputRecord]] = {}
    for chunk in chunks(ids):
        query = select(*columns).where(c.job_id.in_(chunk)).order_by(c.job_id, c.id)
        for job_id, *values in conn.execute(query):
            outputs.setdefault(job_id, []).append(OutputRecord(*values))
    return outputs


def _deliveries(conn: Connection, ids: Sequence[int]) -> dict[int, list[DeliveryRow]]:
    """The hook deliveries of each job in ``ids``, oldest first."""
    d = _DELIVERIES.c
    deliveries: dict[int, list[DeliveryRow]] = {}
    for chunk in chunks(ids):
        query = (
            select(*(d[name] for name in _DELIVERY_FIELDS))
            .where(d.job_id.in_(chunk))
            .order_by(d.id)
        )
        for row in conn.execute(query):
            delivery = DeliveryRow(*row)
            deliveries.setdefault(delivery.job_id, []).append(delivery)
    return deliveries


def select_replicas(conn: Connection) -> list[ReplicaRow]:
    """The live replicas (registration not expired), each with its unexpired leases, by id;
    on the database's clock."""
    now = func.current_timestamp()
    rows = conn.execute(
        select(replicas).where(replicas.c.expires_at > now).order_by(replicas.c.id)
    ).all()
    held: dict[str, list[tuple[str, int, Any]]] = {}
    for lease in conn.execute(
        select(server_leases)
        .where(server_leases.c.owner.is_not(None), server_leases.c.expires_at > now)
        .order_by(server_leases.c.server)
    ):
        held.setdefault(lease.owner, []).append((lease.server, lease.epoch, lease.expires_at))
    return [
        ReplicaRow(
            id=r.id,
            host=r.host,
            pid=r.pid,
            version=r.version,
            started_at=r.started_at,
            heartbeat_at=r.heartbeat_at,
            expires_at=r.expires_at,
            leases=tuple(held.get(r.id, ())),
        )
        for r in rows
    ]
