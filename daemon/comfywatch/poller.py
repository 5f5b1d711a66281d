"""One polling pass over every server: queue first, then history for prompts that left it.

``Poller.tick()`` does one round and hands every change to the store in one transaction;
the service calls it in a loop, and hands it new settings with ``Poller.apply()``. The
pieces: :mod:`~comfywatch.server_poll` reads one server, :mod:`~comfywatch.server_health`
backs failing servers off and keeps the restart evidence, :func:`~comfywatch.tracking.decide`
decides each job, :mod:`~comfywatch.recording` writes and logs the changes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from comfywatch.comfy import ComfyClient
from comfywatch.config import HookSettings, ServerSettings
from comfywatch.errors import ServerError
from comfywatch.metrics import Metrics
from comfywatch.recording import Recorder
from comfywatch.server_health import MAX_BACKOFF_S, ServerHealth, ServerHealthBook
from comfywatch.server_poll import ServerPoll, poll_server
from comfywatch.states import JobState
from comfywatch.store import ActiveJob, Store
from comfywatch.tracking import Decision, JobView, Policy, Seen, decide

log = structlog.get_logger("comfywatch.poller")

#: One server's poll: each of its jobs with its decision (``None``: the server failed).
Decisions = list[tuple[ActiveJob, Decision]]


@dataclass
class JobMemory:
    """Per-job facts that need not survive a restart (re-learnt within two polls)."""

    last_seen_at_s: float | None = None
    absent_count: int = 0


@dataclass(frozen=True)
class TickReport:
    active: int
    changed: int
    finished: int
    servers_polled: int
    servers_failed: int


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class Poller:
    """Polls every configured server once per ``tick()``."""

    def __init__(
        self,
        *,
        store: Store,
        servers: Mapping[str, ServerSettings],
        hooks: Mapping[str, HookSettings],
        not_found_after_s: float,
        poll_interval_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_poll_done: Callable[[str], None] | None = None,
    ) -> None:
        """``on_poll_done`` is called with a server's name when a poll that outlived its
        tick's budget finishes (so that its result is recorded soon)."""
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._on_poll_done = on_poll_done
        self._health = ServerHealthBook(metrics=metrics, max_backoff_s=max_backoff_s)
        self._recorder = Recorder(store=store, metrics=metrics)
        self._clients: dict[str, ComfyClient] = {}
        self._memory: dict[int, JobMemory] = {}
        self._warned_unknown: set[str] = set()
        self._inflight: dict[str, asyncio.Task[Decisions | None]] = {}
        self._late: set[str] = set()
        self._servers: Mapping[str, ServerSettings] = {}
        self._hook_states: Mapping[str, Collection[JobState]] = {}
        self._not_found_after_s = not_found_after_s
        self._poll_interval_s = poll_interval_s
        self.apply(
            servers=servers,
            hooks=hooks,
            not_found_after_s=not_found_after_s,
            poll_interval_s=poll_interval_s,
        )

    def apply(
        self,
        *,
        servers: Mapping[str, ServerSettings],
        hooks: Mapping[str, HookSettings],
        not_found_after_s: float,
        poll_interval_s: float,
    ) -> list[ComfyClient]:
        """Adopt new settings; returns the clients to close (server removed or changed)."""
        stale: list[ComfyClient] = []
        for name, client in list(self._clients.items()):
            if servers.get(name) != client.settings:
                stale.append(self._clients.pop(name))
        for name, settings in servers.items():
            if name not in self._clients:
                self._clients[name] = ComfyClient(settings)
        self._servers = dict(servers)
        self._hook_states = {name: hook.on for name, hook in hooks.items()}
        self._not_found_after_s = not_found_after_s
        self._poll_interval_s = poll_interval_s
        return stale

    def clients(self) -> Mapping[str, ComfyClient]:
        return dict(self._clients)

    def health(self) -> Mapping[str, ServerHealth]:
        return self._health.of_all(self._servers)

    async def close(self) -> None:
        inflight = list(self._inflight.values())
        if inflight:
            log.warning("polls_cancelled_on_stop", servers=sorted(self._inflight))
        self._inflight.clear()
        for task in inflight:
            task.cancel()  # only network reads: nothing is half-written
        if inflight:
            await asyncio.wait(inflight)
        await self._recorder.wait()
        for client in self._clients.values():
            await client.close()

    async def tick(
        self, only: Collection[str] | None = None, *, budget_s: float | None = None
    ) -> TickReport:
        """One round over every server that is due (or only those named); all writes in
        one transaction.

        With ``budget_s``, the tick waits that long at most: a server slower than that
        (a hung host, a slow drip) keeps its poll running in the background, and its
        result is recorded by a later tick, so it never holds the other servers back.
        Without it (tests, ``--once`` style use) every poll is awaited.
        """
        now_s = self._clock()
        jobs = await self._store.active_jobs()
        self._start_polls(jobs, now_s, only)
        if self._inflight:
            await asyncio.wait(set(self._inflight.values()), timeout=budget_s)
        decisions, polled, failed = self._collect_polls()
        recorded = await self._recorder.record(decisions, now_s, self._hook_states)
        self._remember(decisions, live={job.id for job in jobs})
        return TickReport(
            active=len(jobs) - recorded.finished,
            changed=recorded.changed,
            finished=recorded.finished,
            servers_polled=polled,
            servers_failed=failed,
        )

    def _start_polls(
        self, jobs: Sequence[ActiveJob], now_s: float, only: Collection[str] | None
    ) -> None:
        """Start a poll of each server that has jobs, is due and is not being polled."""
        by_server: dict[str, list[ActiveJob]] = defaultdict(list)
        for job in jobs:
            by_server[job.server].append(job)
        for server, server_jobs in by_server.items():
            if server not in self._clients:
                if server not in self._warned_unknown:
                    self._warned_unknown.add(server)
                    log.warning("server_not_configured", server=server, jobs=len(server_jobs))
                continue
            if (
                server in self._inflight
                or not self._health.due(server, now_s)
                or (only is not None and server not in only)
            ):
                continue
            task = asyncio.create_task(
                self._poll_server(server, server_jobs, now_s), name=f"poll-{server}"
            )
            task.add_done_callback(functools.partial(self._poll_done, server))
            self._inflight[server] = task

    def _collect_polls(self) -> tuple[Decisions, int, int]:
        """The decisions of every finished poll, how many polls finished and how many of
        them failed; polls still running are left for a later tick."""
        decisions: Decisions = []
        polled = failed = 0
        for server, task in list(self._inflight.items()):
            if not task.done():
                self._late.add(server)  # a slow server: a later tick records its result
                continue
            del self._inflight[server]
            self._late.discard(server)
            polled += 1
            result = task.result()
            if result is None:
                failed += 1
                continue
            decisions.extend(result)
        return decisions, polled, failed

    def _remember(self, decisions: Decisions, live: Collection[int]) -> None:
        """Keep what the decisions learnt about jobs still active; forget the rest."""
        for job, decision in decisions:
            if decision.state.terminal:
                self._memory.pop(job.id, None)
            else:
                self._memory[job.id] = JobMemory(decision.last_seen_at_s, decision.absent_count)
        for job_id in [k for k in self._memory if k not in live]:
            del self._memory[job_id]

    def _poll_done(self, server: str, task: asyncio.Task[Decisions | None]) -> None:
        if server in self._late and not task.cancelled() and self._on_poll_done is not None:
            self._on_poll_done(server)

    async def _poll_server(
        self, server: str, jobs: Sequence[ActiveJob], now_s: float
    ) -> Decisions | None:
        """Poll one server and decide each of its jobs; ``None`` if the server failed."""
        client = self._clients[server]
        started = time.monotonic()
        try:
            polled = await poll_server(client, [job.prompt_id for job in jobs])
        except ServerError as exc:
            self._health.failed(server, exc, now_s, poll_interval_s=self._poll_interval_s)
            return None
        except Exception as exc:
            # A bug met on this server's data must not stop tracking everywhere else.
            if self._health.of(server).error_kind != "error":  # the traceback once per episode
                log.exception("poll_failed_unexpectedly", server=server)
            error = ServerError(server, repr(exc)[:300])
            self._health.failed(server, error, now_s, poll_interval_s=self._poll_interval_s)
            return None
        finally:
            if self._metrics is not None:
                self._metrics.poll_latency(server, time.monotonic() - started)
        self._health.succeeded(server, polled.queue, now_s)
        self._report_unreadable(server, polled)
        return self._decide_jobs(server, client.settings, jobs, polled, now_s)

    def _report_unreadable(self, server: str, polled: ServerPoll) -> None:
        if not polled.unreadable:
            return
        for prompt_id in sorted(polled.unreadable):
            log.debug("history_unreadable", server=server, prompt_id=prompt_id)
        log.warning("history_unreadable", server=server, count=len(polled.unreadable))
        if self._metrics is not None:
            self._metrics.poll(server, "bad_response")

    def _decide_jobs(
        self,
        server: str,
        settings: ServerSettings,
        jobs: Sequence[ActiveJob],
        polled: ServerPoll,
        now_s: float,
    ) -> Decisions:
        """Each job's decision from what the poll showed."""
        policy = Policy(
            not_found_after_s=self._not_found_after_s,
            queue_timeout_s=settings.queue_timeout_s,
            run_timeout_s=settings.run_timeout_s,
        )
        suspected_at_s = self._health.of(server).restart.suspected_at_s
        decisions: Decisions = []
        for job in jobs:
            seen = Seen(
                running=job.prompt_id in polled.queue.running,
                pending=job.prompt_id in polled.queue.pending,
                history=polled.histories.get(job.prompt_id),
                restart_suspected_at_s=suspected_at_s,
                unreadable=job.prompt_id in polled.unreadable,
            )
            decisions.append((job, decide(self._view(job), seen, now_s, policy)))
        return decisions

    def _view(self, job: ActiveJob) -> JobView:
        """What the tracker knows of a job: the database's facts and this process's."""
        memory = self._memory.get(job.id, JobMemory())
        return JobView(
            state=job.state,
            registered_at_s=job.registered_at.timestamp(),
            queued_at_s=_ts(job.queued_at),
            started_at_s=_ts(job.started_at),
            last_seen_at_s=memory.last_seen_at_s,
            absent_count=memory.absent_count,
        )
