"""``wait``: block until jobs are terminal, reading what the daemon writes.

Each look reads the spool first (the files waiting in ``jobs_dir`` and the jobs they
name), then the database: the daemon commits a file's jobs before it moves the file out of
the inbox, so a registered job is always in one or the other. The database is read-only
here (never migrated, never written), and a SQLite file that does not exist yet holds no
jobs. ``submit --wait`` follows its job with the same looks (:func:`follow`).

On PostgreSQL, a connection of its own also ``LISTEN``s on ``comfywatch_jobs``: a job
waited for that becomes terminal is looked at as soon as its change commits, and the
database is looked at only every :data:`LISTEN_POLL_S` otherwise (the safety net; while
the connection is down, or a job is still in the spool, every :data:`POLL_S`).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import EX_FAILURE, EX_OK, EX_USAGE, err, say
from comfywatch.config import Settings
from comfywatch.errors import ConfigError, StoreError
from comfywatch.spool.inbox import ERROR_SUFFIX, REJECTED, SPOOL_SUFFIX, waiting_names
from comfywatch.states import JobState
from comfywatch.store import JobRow
from comfywatch.store.drivers import is_sqlite
from comfywatch.store.readonly import read_unless_new
from comfywatch.store.reads import select_job_rows

#: How often the database and the spool are looked at.
POLL_S = 0.5
#: How often, while notifications are heard (PostgreSQL), and how long listening may take
#: to start before the looks go on without it.
LISTEN_POLL_S = 5.0
LISTEN_READY_S = 2.0
#: The exit status of a wait that ran out of time (as timeout(1)).
EX_TIMEOUT = 124


@dataclass(frozen=True, slots=True)
class Look:
    """What one look found of each prompt id waited for."""

    #: The database's jobs of each prompt id (several: one per server).
    jobs: dict[str, list[JobRow]] = field(default_factory=dict)
    #: Registered, but not in the database yet: in the spool or the main config's [[jobs]].
    spooled: frozenset[str] = frozenset()
    #: Set aside by the daemon: why its spool file was rejected.
    rejected: dict[str, str] = field(default_factory=dict)
    #: Nowhere: neither in the database nor in the spool.
    unknown: frozenset[str] = frozenset()

    def ended(self, prompt_id: str) -> bool:
        """Whether the prompt id is done with: all its jobs terminal, or rejected."""
        if prompt_id in self.rejected:
            return True
        rows = self.jobs.get(prompt_id, [])
        return bool(rows) and prompt_id not in self.spooled and all(r.state.terminal for r in rows)

    def succeeded(self, prompt_id: str) -> bool:
        rows = self.jobs.get(prompt_id, [])
        return (
            self.ended(prompt_id)
            and prompt_id not in self.rejected
            and all(r.state is JobState.SUCCESS for r in rows)
        )


class JobWatch:
    """Looks for prompt ids in the spool and the database of one configuration."""

    def __init__(self, settings: Settings, *, server: str | None = None) -> None:
        self._settings = settings
        self._server = server
        self._inbox = settings.daemon.jobs_dir
        #: Spool file name -> the prompt ids it registers (read once: files do not change).
        self._files: dict[str, frozenset[str]] = {}
        #: Prompt id -> the spool file it was last seen in.
        self._seen_in: dict[str, str] = {}
        self._configured = {
            job.prompt_id for job in settings.jobs if server is None or job.server == server
        }

    def look(self, prompt_ids: Collection[str]) -> Look:
        """Where each of ``prompt_ids`` is now. Raises StoreError if the database fails."""
        in_spool = self._spooled(prompt_ids)
        rows = self._rows(prompt_ids)
        jobs: dict[str, list[JobRow]] = {}
        for row in rows:
            jobs.setdefault(row.prompt_id, []).append(row)
        registered = {p for p in prompt_ids if p in in_spool or p in self._configured}
        spooled = {p for p in registered if p not in jobs}
        rejected: dict[str, str] = {}
        for prompt_id in prompt_ids:
            if prompt_id in jobs or prompt_id in spooled or prompt_id not in self._seen_in:
                continue
            why = self._rejection(self._seen_in[prompt_id])
            rejected[prompt_id] = why or "its spool file left the spool without being registered"
        # A job also in a file still waiting is registered again (new hooks, labels): it
        # is done once that file is read too.
        return Look(
            jobs=jobs,
            spooled=frozenset(spooled | (in_spool & jobs.keys())),
            rejected=rejected,
            unknown=frozenset(
                p for p in prompt_ids if p not in jobs and p not in spooled and p not in rejected
            ),
        )

    def listener(self, prompt_ids: Collection[str], heard: Callable[[], None]) -> Any:
        """A :class:`~comfywatch.store.listen.ThreadListener` calling ``heard`` when one of
        ``prompt_ids`` becomes terminal; ``None`` on SQLite. Not started."""
        url = self._settings.daemon.database_url
        if is_sqlite(url):
            return None
        from comfywatch.store.listen import JOBS, ThreadListener, listen_url

        if listen_url(url) is None:
            return None
        wanted = set(prompt_ids)

        def on_job(payload: str) -> None:
            server, _, prompt_id = payload.partition("/")
            if prompt_id in wanted and (self._server is None or server == self._server):
                heard()

        return ThreadListener(url, {JOBS: on_job})

    def _rows(self, prompt_ids: Collection[str]) -> list[JobRow]:
        def rows(conn: Any) -> list[JobRow]:
            return select_job_rows(conn, list(prompt_ids), server=self._server)

        # No database yet, or one no daemon has migrated: no daemon has run yet.
        return read_unless_new(self._settings.daemon.database_url, rows, [])

    def _spooled(self, prompt_ids: Collection[str]) -> set[str]:
        """Those of ``prompt_ids`` named by a file waiting in the spool."""
        if self._inbox is None:
            return set()
        try:
            names = waiting_names(self._inbox) or []
        except OSError:
            return set()
        for name in set(self._files) - set(names):
            del self._files[name]
        found: set[str] = set()
        wanted = set(prompt_ids)
        for name in names:
            ids = self._files.get(name)
            if ids is None:
                ids = self._files[name] = self._read(self._inbox / name)
            for prompt_id in ids & wanted:
                found.add(prompt_id)
                self._seen_in[prompt_id] = name
        return found

    def _read(self, path: Path) -> frozenset[str]:
        """The prompt ids a spool file registers (none if the daemon would reject it)."""
        from comfywatch.spool.parse import read_spool_file

        try:
            specs = read_spool_file(path, self._settings)
        except ConfigError:
            return frozenset()
        return frozenset(
            s.prompt_id for s in specs if self._server is None or s.server == self._server
        )

    def _rejection(self, name: str) -> str | None:
        """Why the daemon set the spool file ``name`` aside, if it did."""
        if self._inbox is None:
            return None
        stem = name.removesuffix(SPOOL_SUFFIX)
        folder = self._inbox / REJECTED
        # A name already taken in rejected/ gets a numbered suffix (inbox.reject).
        for error in [folder / f"{stem}{ERROR_SUFFIX}", *folder.glob(f"{stem}.*{ERROR_SUFFIX}")]:
            try:
                text = error.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
            return f"its spool file was rejected ({folder / error.stem}{SPOOL_SUFFIX}): {text}"
        return None


def follow(
    watch: JobWatch,
    prompt_ids: Sequence[str],
    *,
    timeout_s: float | None,
    on_look: Callable[[Look], None],
    listen_poll_s: float = LISTEN_POLL_S,
) -> tuple[Look, bool]:
    """Look every :data:`POLL_S` (every ``listen_poll_s`` while the database's
    notifications are heard, and whenever one names a prompt id waited for) until every
    prompt id has ended, or none is known, or ``timeout_s`` has passed; ``on_look`` sees
    each look. Returns the last look and whether time ran out."""
    heard = threading.Event()
    listener = watch.listener(prompt_ids, heard.set)
    if listener is not None:
        listener.start(ready_within_s=LISTEN_READY_S)
    try:
        return _follow(watch, prompt_ids, timeout_s, on_look, heard, listener, listen_poll_s)
    finally:
        if listener is not None:
            listener.close()


def _follow(
    watch: JobWatch,
    prompt_ids: Sequence[str],
    timeout_s: float | None,
    on_look: Callable[[Look], None],
    heard: threading.Event,
    listener: Any,
    listen_poll_s: float,
) -> tuple[Look, bool]:
    deadline_m = None if timeout_s is None else time.monotonic() + timeout_s
    failing = False
    look = Look()
    while True:
        heard.clear()  # before the look: a change committed after it wakes the next one
        try:
            look = watch.look(prompt_ids)
        except StoreError as exc:
            if not failing:
                err(f"{exc} (trying again)")
            failing = True
        else:
            failing = False
            on_look(look)
            if all(look.ended(p) or p in look.unknown for p in prompt_ids):
                return look, False
        quiet = listener is not None and listener.listening and not failing and not look.spooled
        poll_s = listen_poll_s if quiet else POLL_S
        if deadline_m is None:
            heard.wait(poll_s)
            continue
        left_s = deadline_m - time.monotonic()
        if left_s <= 0:
            return look, True
        heard.wait(min(poll_s, left_s))


def outcome_line(row: JobRow) -> str:
    """``SERVER PROMPT_ID STATE [REASON]`` of a finished job."""
    reason = f" {row.reason.value}" if row.reason is not None and row.state.terminal else ""
    return f"{row.server} {row.prompt_id} {row.state.value}{reason}"


def exit_status(look: Look, prompt_ids: Sequence[str], *, timed_out: bool) -> int:
    """0 if every job succeeded, 1 if any ended otherwise (or went missing), 124 on
    timeout; the jobs not ended are named on stderr."""
    waiting = [p for p in prompt_ids if not look.ended(p) and p not in look.unknown]
    if timed_out and waiting:
        err(f"wait: timed out; still waiting for {', '.join(waiting)}")
        return EX_TIMEOUT
    for prompt_id in prompt_ids:
        if prompt_id in look.rejected:
            err(f"wait: {prompt_id}: {look.rejected[prompt_id]}")
        elif prompt_id in look.unknown:
            err(f"wait: {prompt_id}: no longer in the spool nor in the database")
    return EX_OK if all(look.succeeded(p) for p in prompt_ids) else EX_FAILURE


def wait(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    prompt_ids: list[str] = list(dict.fromkeys(args.prompt_ids))
    watch = JobWatch(settings, server=args.server)
    first = watch.look(prompt_ids)  # a database that cannot be read: exit 69
    if first.unknown:
        where = f" on {args.server}" if args.server else ""
        for prompt_id in sorted(first.unknown):
            err(f"wait: unknown prompt id {prompt_id!r}{where}: not in the database nor the spool")
        return EX_USAGE
    reported: set[str] = set()

    def report(look: Look) -> None:
        for prompt_id in prompt_ids:
            if prompt_id in reported or not look.ended(prompt_id):
                continue
            reported.add(prompt_id)
            for row in look.jobs.get(prompt_id, []):
                say(outcome_line(row))

    look, timed_out = follow(watch, prompt_ids, timeout_s=args.timeout, on_look=report)
    return exit_status(look, prompt_ids, timed_out=timed_out)
