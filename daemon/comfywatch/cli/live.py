"""``watch``: a live terminal view of the servers and of running and recent jobs.

It reads two things only, and changes neither: the database (read-only, as ``jobs`` does)
and the running daemon's ``/metrics`` (each server's up, queue length and last poll, which
only the daemon knows). Without the metrics endpoint (not configured, or not answering) it
says so and still shows the jobs. ``q`` quits (stdin is read in cbreak mode when it is a
terminal), and so does Ctrl-C; both exit 0.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from comfywatch.cli.context import settings_of
from comfywatch.cli.jobs import clock_text, duration_text, run_time_text
from comfywatch.cli.output import EX_OK, labels_text, printable
from comfywatch.config import Settings
from comfywatch.errors import StoreError
from comfywatch.states import ACTIVE_STATES, TERMINAL_STATES, JobState
from comfywatch.store.readonly import read
from comfywatch.store.reads import count_jobs, select_live
from comfywatch.store.values import JobRow

if TYPE_CHECKING:
    from rich.console import RenderableType

#: Rows of running and of waiting jobs shown at most (the rest are counted).
SHOWN_RUNNING = 20
SHOWN_WAITING = 10
#: How long a metrics request may take: the view waits for it.
METRICS_TIMEOUT_S = 2.0
MAX_METRICS_BYTES = 8 * 1024 * 1024
#: Hosts a listener binds to that a client cannot connect to as such.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
_QUIT_KEYS = (b"q", b"Q")


@dataclass(frozen=True, slots=True)
class ServerView:
    """One server as the daemon's metrics show it (``None``: not known)."""

    up: bool | None = None
    queue: int | None = None
    last_poll_s: float | None = None


@dataclass(frozen=True, slots=True)
class MetricsView:
    """What ``/metrics`` said, or why nothing (``problem``)."""

    servers: Mapping[str, ServerView] = field(default_factory=dict)
    last_tick_s: float | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class JobsView:
    running: list[JobRow]
    waiting: list[JobRow]
    recent: list[JobRow]
    counts: Mapping[tuple[str, JobState], int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one frame shows."""

    at: datetime
    metrics: MetricsView
    jobs: JobsView | None
    #: Why the database could not be read this time (the last jobs read stay shown).
    db_problem: str | None = None


def watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    settings = settings_of(args)
    url = metrics_url(args.metrics_url, settings)
    console = Console()
    try:
        # The first read fails like the other queries (a missing database: exit 69).
        jobs = _read_jobs(settings, args.recent)
        snapshot = Snapshot(datetime.now(UTC), fetch_metrics(url), jobs)
        with (
            _keys() as quit_pressed,
            Live(
                render(snapshot, settings, url, args.interval),
                console=console,
                screen=console.is_terminal,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            while not quit_pressed(args.interval):
                snapshot = _next(snapshot, settings, url, args.recent)
                live.update(render(snapshot, settings, url, args.interval), refresh=True)
    except KeyboardInterrupt:
        pass
    return EX_OK


def _next(previous: Snapshot, settings: Settings, url: str | None, recent: int) -> Snapshot:
    try:
        jobs = _read_jobs(settings, recent)
    except StoreError as exc:
        return Snapshot(datetime.now(UTC), fetch_metrics(url), previous.jobs, str(exc))
    return Snapshot(datetime.now(UTC), fetch_metrics(url), jobs)


def _read_jobs(settings: Settings, recent: int) -> JobsView:
    active = sorted(ACTIVE_STATES - {JobState.RUNNING})
    terminal = sorted(TERMINAL_STATES)
    return read(
        settings.daemon.database_url,
        lambda conn: JobsView(
            running=select_live(conn, [JobState.RUNNING], limit=SHOWN_RUNNING),
            waiting=select_live(conn, active, limit=SHOWN_WAITING),
            recent=select_live(conn, terminal, limit=recent, recent=True) if recent else [],
            counts=count_jobs(conn, sorted(ACTIVE_STATES)),
        ),
    )


# -- the metrics endpoint --------------------------------------------------------------------


def metrics_url(given: str | None, settings: Settings) -> str | None:
    """``--metrics-url`` (``""``: none), else the ``[daemon] http`` listener's ``/metrics``
    (a wildcard address as the loopback one), else ``None``."""
    if given is not None:
        return given or None
    host, port = settings.daemon.http_host, settings.daemon.http_port
    if host is None or port is None:
        return None
    host = _ANY_ADDRESS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def fetch_metrics(url: str | None) -> MetricsView:
    """The per-server gauges of ``url``, or why they could not be read."""
    if url is None:
        return MetricsView(problem="no metrics endpoint: [daemon] http is not set")
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith(("http://", "https://")):
        return MetricsView(problem=f"metrics URL {url!r} is not http:// or https://")
    # No proxy: the endpoint is the daemon's, usually on this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=METRICS_TIMEOUT_S) as response:
            text = response.read(MAX_METRICS_BYTES).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return MetricsView(problem=f"metrics at {url} unreachable: HTTP {exc.code}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return MetricsView(problem=f"metrics at {url} unreachable: {reason}")
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return MetricsView(problem=f"metrics at {url} unreadable: {exc}")
    up: dict[str, bool] = {}
    queue: dict[str, int] = {}
    polled: dict[str, float] = {}
    last_tick: float | None = None
    for family in families:
        for sample in family.samples:
            server = sample.labels.get("server")
            if sample.name == "comfywatch_last_tick_timestamp_seconds":
                last_tick = sample.value
            elif server is None:
                continue
            elif sample.name == "comfywatch_server_up":
                up[server] = sample.value == 1
            elif sample.name == "comfywatch_server_queue_remaining":
                queue[server] = int(sample.value)
            elif sample.name == "comfywatch_server_last_poll_timestamp_seconds":
                polled[server] = sample.value
    servers = {
        name: ServerView(up.get(name), queue.get(name), polled.get(name))
        for name in up.keys() | queue.keys() | polled.keys()
    }
    return MetricsView(servers, last_tick)


# -- the keyboard ----------------------------------------------------------------------------


@contextmanager
def _keys() -> Iterator[Callable[[float], bool]]:
    """A function that waits up to its argument in seconds and says whether ``q`` was
    pressed. stdin is put in cbreak mode (keys arrive at once, unechoed; Ctrl-C still
    interrupts) while it is a terminal, and restored after; otherwise the keyboard is not
    read (a pipe or /dev/null would read as end of file at once) and it only waits."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:

        def wait(timeout_s: float) -> bool:
            time.sleep(timeout_s)
            return False

        yield wait
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)

    def pressed(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            keys = os.read(fd, 64)
            if not keys or any(key in keys for key in _QUIT_KEYS):
                return True  # end of file: the terminal went away
        return False

    try:
        tty.setcbreak(fd)
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the frame -------------------------------------------------------------------------------


def render(snapshot: Snapshot, settings: Settings, url: str | None, interval: float) -> Any:
    """One frame: a header, the servers, the running, waiting and recent jobs."""
    from rich.console import Group
    from rich.text import Text

    now_s = snapshot.at.timestamp()
    header = Text()
    header.append("comfywatch watch", style="bold")
    header.append(f"  {clock_text(snapshot.at)}  every {interval:g} s  q quits")
    parts: list[RenderableType] = [header]
    metrics = snapshot.metrics
    if metrics.problem is not None:
        parts.append(Text(printable(metrics.problem), style="yellow"))
    elif metrics.last_tick_s is not None:
        parts.append(Text(f"daemon: last pass {_ago(now_s - metrics.last_tick_s)}"))
    if snapshot.db_problem is not None:
        parts.append(Text(f"database: {printable(snapshot.db_problem)}", style="red"))
    jobs = snapshot.jobs
    counts = jobs.counts if jobs is not None else {}
    parts.append(_servers_table(settings, metrics, counts, now_s))
    if jobs is not None:
        parts.extend(_jobs_tables(jobs, snapshot.at))
    return Group(*parts)


def _servers_table(
    settings: Settings,
    metrics: MetricsView,
    counts: Mapping[tuple[str, JobState], int],
    now_s: float,
) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    names = list(settings.servers)
    extra = (metrics.servers.keys() | {server for server, _ in counts}) - set(names)
    table = Table(title="servers", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("SERVER", "STATUS", "QUEUE", "LAST POLL", "RUNNING", "WAITING"):
        table.add_column(column, no_wrap=True)
    for name in [*names, *sorted(extra)]:
        view = metrics.servers.get(name, ServerView())
        if metrics.problem is not None:
            status = Text("?", style="dim")
        elif view.up is None:
            status = Text("not polled", style="dim")
        else:
            status = Text("up", style="green") if view.up else Text("down", style="bold red")
        waiting = counts.get((name, JobState.QUEUED), 0) + counts.get(
            (name, JobState.REGISTERED), 0
        )
        table.add_row(
            Text(printable(name)),
            status,
            "" if view.queue is None else str(view.queue),
            "" if view.last_poll_s is None else _ago(now_s - view.last_poll_s),
            str(counts.get((name, JobState.RUNNING), 0)),
            str(waiting),
        )
    return table


def _jobs_tables(jobs: JobsView, now: datetime) -> list[Any]:
    from rich import box
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    now_s = now.timestamp()
    running_total = sum(n for (_, state), n in jobs.counts.items() if state is JobState.RUNNING)
    waiting_total = sum(n for (_, state), n in jobs.counts.items() if state is not JobState.RUNNING)

    running = Table(
        title=_title("running", len(jobs.running), running_total),
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("SERVER", "PROMPT_ID", "PROGRESS", "", "NODE", "RUNNING FOR", "LABELS"):
        running.add_column(column, overflow="fold")
    for job in jobs.running:
        bar: Any = ""
        steps = ""
        if job.progress_max and job.progress_value is not None:
            bar = ProgressBar(total=job.progress_max, completed=job.progress_value, width=20)
            steps = f"{job.progress_value}/{job.progress_max}"
            if job.progress_at is not None:
                steps += f" ({_ago(now_s - job.progress_at.timestamp())})"
        running.add_row(
            Text(printable(job.server)),
            Text(printable(job.prompt_id)),
            bar,
            steps,
            Text(printable(job.progress_node or "")),
            run_time_text(job, now),
            Text(printable(labels_text(job.labels))),
        )

    waiting = Table(
        title=_title("waiting", len(jobs.waiting), waiting_total),
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("SERVER", "PROMPT_ID", "STATE", "REGISTERED", "LABELS"):
        waiting.add_column(column, overflow="fold")
    for job in jobs.waiting:
        waiting.add_row(
            Text(printable(job.server)),
            Text(printable(job.prompt_id)),
            job.state.value,
            _ago(now_s - job.registered_at.timestamp()),
            Text(printable(labels_text(job.labels))),
        )

    recent = Table(title="recently finished", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("SERVER", "PROMPT_ID", "STATE", "REASON", "FINISHED", "DURATION", "LABELS"):
        recent.add_column(column, overflow="fold")
    for job in jobs.recent:
        recent.add_row(
            Text(printable(job.server)),
            Text(printable(job.prompt_id)),
            Text(job.state.value, style="green" if job.state is JobState.SUCCESS else "red"),
            job.reason.value if job.reason is not None else "",
            _ago(now_s - job.finished_at.timestamp()) if job.finished_at is not None else "",
            run_time_text(job, now),
            Text(printable(labels_text(job.labels))),
        )
    return [running, waiting, recent]


def _title(name: str, shown: int, total: int) -> str:
    return f"{name} ({total})" if shown >= total else f"{name} ({shown} of {total} shown)"


def _ago(seconds: float) -> str:
    return f"{duration_text(max(0.0, seconds))} ago"
