"""One polling pass over every server: queue first, then history for prompts that left it.

``Poller.tick()`` does one round and hands every change to the store in one transaction;
the service calls it in a loop. Per server and tick: one ``GET /queue``, then
``GET /history/{id}`` only for tracked prompts not in the queue (bounded concurrency).
A server that fails is backed off (exponential, jittered, capped) and its jobs wait.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from comfywatch.comfy import ComfyClient
from comfywatch.config import HookSettings, ServerSettings
from comfywatch.errors import BadResponse, ServerAuthError, ServerError
from comfywatch.history import HistoryRecord, QueueSnapshot
from comfywatch.metrics import Metrics
from comfywatch.store import ActiveJob, Change, Store
from comfywatch.tracking import Decision, JobView, Policy, Seen, decide

log = structlog.get_logger("comfywatch.poller")

#: Backoff for an unreachable server: poll_interval_s * 2**failures, capped, jittered.
MAX_BACKOFF_S = 60.0


@dataclass
class ServerHealth:
    """What the poller remembers about one server between ticks."""

    up: bool | None = None
    failures: int = 0
    next_poll_at_s: float = 0.0
    error_kind: str | None = None
    down_since_s: float | None = None
    restart_suspected_at_s: float | None = None
    #: The highest queue number seen (ComfyUI counts up from 0 per process) and the ids
    #: of the last queue seen: the evidence for a restart nobody saw as an outage.
    max_number: int | None = None
    known_ids: frozenset[str] = frozenset()


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


@dataclass
class _ServerResult:
    decisions: list[tuple[ActiveJob, Decision]] = field(default_factory=list)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def numbering_restarted(
    snapshot: QueueSnapshot, known_ids: frozenset[str], max_number: int | None
) -> bool:
    """True if a prompt new to us carries a queue number below one seen before.

    ComfyUI gives each accepted prompt the next number of a counter that starts at 0 with
    the process; "queue front" prompts get negative ones. Deleting prompts lowers the
    maximum without any new prompt, so only a new id with a small number is evidence.
    """
    if max_number is None:
        return False
    return any(
        0 <= number < max_number
        for prompt_id, number in snapshot.numbers.items()
        if prompt_id not in known_ids
    )


async def _gather_or_cancel(
    coros: Sequence[Coroutine[Any, Any, HistoryRecord | BadResponse | None]],
) -> list[HistoryRecord | BadResponse | None]:
    """Run the fetches concurrently; if one fails, cancel the rest before re-raising (no
    request keeps hitting a server that is being backed off)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._clients: dict[str, ComfyClient] = {}
        self._health: dict[str, ServerHealth] = defaultdict(ServerHealth)
        self._memory: dict[int, JobMemory] = {}
        self._warned_unknown: set[str] = set()
        self._recording: asyncio.Future[list[int]] | None = None
        self._inflight: dict[str, asyncio.Task[_ServerResult | None]] = {}
        self._late: set[str] = set()
        #: Called with a server's name when its poll finishes (the service polls again
        #: soon to record a result that outlived its tick's budget).
        self.on_poll_done: Callable[[str], None] | None = None
        self.hooks: Mapping[str, HookSettings] = {}
        self.not_found_after_s = not_found_after_s
        self.poll_interval_s = poll_interval_s
        self._servers: Mapping[str, ServerSettings] = {}
        self.configure(servers=servers, hooks=hooks)

    def configure(
        self, *, servers: Mapping[str, ServerSettings], hooks: Mapping[str, HookSettings]
    ) -> list[ComfyClient]:
        """Adopt new server and hook settings; returns clients to close (removed/changed)."""
        stale: list[ComfyClient] = []
        for name, client in list(self._clients.items()):
            if servers.get(name) != client.settings:
                stale.append(self._clients.pop(name))
        for name, settings in servers.items():
            if name not in self._clients:
                self._clients[name] = ComfyClient(settings)
        self._servers = dict(servers)
        self.hooks = dict(hooks)
        return stale

    def clients(self) -> Mapping[str, ComfyClient]:
        return dict(self._clients)

    async def close(self) -> None:
        inflight = list(self._inflight.values())
        if inflight:
            log.warning("polls_cancelled_on_stop", servers=sorted(self._inflight))
        self._inflight.clear()
        for task in inflight:
            task.cancel()  # only network reads: nothing is half-written
        if inflight:
            await asyncio.wait(inflight)
        if self._recording is not None and not self._recording.done():
            log.info("waiting_for_commit")
            await asyncio.wait({self._recording})
        for client in self._clients.values():
            await client.close()

    def health(self) -> Mapping[str, ServerHealth]:
        return {name: self._health[name] for name in self._servers}

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
        now = self._clock()
        jobs = await self._store.active_jobs()
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
                or self._health[server].next_poll_at_s > now
                or (only is not None and server not in only)
            ):
                continue
            task = asyncio.create_task(
                self._poll_server(server, server_jobs, now), name=f"poll-{server}"
            )
            task.add_done_callback(functools.partial(self._poll_done, server))
            self._inflight[server] = task

        if self._inflight:
            await asyncio.wait(set(self._inflight.values()), timeout=budget_s)
        decisions: list[tuple[ActiveJob, Decision]] = []
        failed = 0
        polled = 0
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
            decisions.extend(result.decisions)

        changes = [self._change(job, d, now) for job, d in decisions if d.state is not job.state]
        # Shielded: a stop that cancels the tick never cuts a commit in half; close()
        # waits for it.
        self._recording = asyncio.ensure_future(self._store.record(changes, now))
        applied = set(await asyncio.shield(self._recording))

        finished = 0
        for job, decision in decisions:
            if decision.state.terminal:
                self._memory.pop(job.id, None)
            else:
                self._memory[job.id] = JobMemory(decision.last_seen_at_s, decision.absent_count)
            if job.id in applied:
                finished += self._log_change(job, decision, now)
        live = {job.id for job in jobs}
        for job_id in [k for k in self._memory if k not in live]:
            del self._memory[job_id]
        return TickReport(
            active=len(jobs) - finished,
            changed=len(applied),
            finished=finished,
            servers_polled=polled,
            servers_failed=failed,
        )

    def _poll_done(self, server: str, task: asyncio.Task[_ServerResult | None]) -> None:
        if server in self._late and not task.cancelled() and self.on_poll_done is not None:
            self.on_poll_done(server)

    def _change(self, job: ActiveJob, decision: Decision, now: float) -> Change:
        deliveries: list[str] = []
        if decision.state.terminal:
            for name in job.hooks:
                hook = self.hooks.get(name)
                if hook is None:
                    # Still owed: the dispatcher marks it dead ("hook not configured") and
                    # `comfywatch hooks retry` sends it once the hook is back.
                    log.warning(
                        "hook_not_configured", hook=name, server=job.server, prompt_id=job.prompt_id
                    )
                    deliveries.append(name)
                elif decision.state in hook.on:
                    deliveries.append(name)
        return Change(
            job_id=job.id,
            state=decision.state,
            reason=decision.reason,
            history=decision.history,
            queued_at_s=decision.queued_at_s if job.queued_at is None else None,
            started_at_s=decision.started_at_s if job.started_at is None else None,
            deliveries=deliveries,
        )

    def _log_change(self, job: ActiveJob, decision: Decision, now: float) -> int:
        if not decision.state.terminal:
            log.info(
                "job_state_changed",
                server=job.server,
                prompt_id=job.prompt_id,
                previous=job.state.value,
                state=decision.state.value,
            )
            return 0
        record = decision.history
        duration_s: float | None = None
        if record and record.started_at_ms is not None and record.finished_at_ms is not None:
            duration_s = (record.finished_at_ms - record.started_at_ms) / 1000
        lag_s: float | None = None
        if record and record.finished_at_ms is not None:
            lag_s = max(0.0, now - record.finished_at_ms / 1000)
        log.info(
            "job_finished",
            server=job.server,
            prompt_id=job.prompt_id,
            previous=job.state.value,
            state=decision.state.value,
            reason=decision.reason.value if decision.reason else None,
            duration_s=duration_s,
            outputs=len(record.outputs) if record else 0,
        )
        if self._metrics is not None:
            self._metrics.job_finished(job.server, decision.state, lag_s)
        return 1

    async def _poll_server(
        self, server: str, jobs: Sequence[ActiveJob], now: float
    ) -> _ServerResult | None:
        client = self._clients[server]
        settings = client.settings
        health = self._health[server]
        started = time.monotonic()
        try:
            snapshot = await client.get_queue()
            in_queue = snapshot.running | snapshot.pending
            waiting = [job for job in jobs if job.prompt_id not in in_queue]
            limit = asyncio.Semaphore(settings.max_history_fetches)

            async def fetch(job: ActiveJob) -> HistoryRecord | BadResponse | None:
                async with limit:
                    try:
                        return await client.get_history(job.prompt_id)
                    except BadResponse as exc:
                        return exc  # one bad entry must not stall the rest of the server

            histories = await _gather_or_cancel([fetch(job) for job in waiting])
        except ServerError as exc:
            self._server_failed(server, health, exc, now)
            return None
        except Exception as exc:
            # A bug met on this server's data must not stop tracking everywhere else.
            if health.error_kind != "error":  # the traceback once per episode
                log.exception("poll_failed_unexpectedly", server=server)
            self._server_failed(server, health, ServerError(server, repr(exc)[:300]), now)
            return None
        finally:
            if self._metrics is not None:
                self._metrics.poll_latency(server, time.monotonic() - started)

        self._server_ok(server, health, snapshot, now)
        found: dict[int, HistoryRecord | None] = {}
        bad = 0
        for job, history in zip(waiting, histories, strict=True):
            if isinstance(history, BadResponse):
                bad += 1
                log.debug("history_unreadable", server=server, prompt_id=job.prompt_id)
                continue
            found[job.id] = history
        if bad:
            log.warning("history_unreadable", server=server, count=bad)
            if self._metrics is not None:
                self._metrics.poll(server, "bad_response")
        policy = Policy(
            not_found_after_s=self.not_found_after_s,
            queue_timeout_s=settings.queue_timeout_s,
            run_timeout_s=settings.run_timeout_s,
        )
        result = _ServerResult()
        for job in jobs:
            unreadable = job.prompt_id not in in_queue and job.id not in found
            memory = self._memory.get(job.id, JobMemory())
            view = JobView(
                state=job.state,
                registered_at_s=job.registered_at.timestamp(),
                queued_at_s=_ts(job.queued_at),
                started_at_s=_ts(job.started_at),
                last_seen_at_s=memory.last_seen_at_s,
                absent_count=memory.absent_count,
            )
            seen = Seen(
                running=job.prompt_id in snapshot.running,
                pending=job.prompt_id in snapshot.pending,
                history=found.get(job.id),
                restart_suspected_at_s=health.restart_suspected_at_s,
                unreadable=unreadable,
            )
            result.decisions.append((job, decide(view, seen, now, policy)))
        return result

    def _server_ok(
        self, server: str, health: ServerHealth, snapshot: QueueSnapshot, now: float
    ) -> None:
        if health.up is False:
            log.info(
                "server_recovered",
                server=server,
                down_for_s=round(now - (health.down_since_s or now), 3),
                failures=health.failures,
            )
            # It may have restarted while we could not see it.
            health.restart_suspected_at_s = now
        numbers = [n for n in snapshot.numbers.values() if n >= 0]
        if numbering_restarted(snapshot, health.known_ids, health.max_number):
            log.info("server_restart_detected", server=server, evidence="queue_number_reset")
            health.restart_suspected_at_s = now
            health.max_number = None  # the new process's numbering starts here
        health.known_ids = frozenset(snapshot.numbers)
        if numbers:
            health.max_number = max([*numbers, health.max_number or 0])
        health.up = True
        health.failures = 0
        health.error_kind = None
        health.down_since_s = None
        health.next_poll_at_s = 0.0
        if self._metrics is not None:
            self._metrics.poll(server, "ok")
            self._metrics.server_up(server, True)

    def _server_failed(
        self, server: str, health: ServerHealth, exc: ServerError, now: float
    ) -> None:
        health.failures += 1
        if isinstance(exc, ServerAuthError):
            delay = self._max_backoff_s
        else:
            delay = min(self._max_backoff_s, self.poll_interval_s * 2 ** min(health.failures, 16))
        delay *= random.uniform(0.75, 1.0)  # noqa: S311 - jitter, not cryptography
        health.next_poll_at_s = now + delay
        if health.error_kind != exc.kind:
            # Once per episode (or when the kind of failure changes), not once per tick.
            log.warning(
                "server_unavailable" if health.up is not False else "server_still_unavailable",
                server=server,
                error=exc.kind,
                detail=exc.message,
                retry_in_s=round(delay, 3),
            )
        if health.up is not False:
            health.down_since_s = now
        health.up = False
        health.error_kind = exc.kind
        if self._metrics is not None:
            self._metrics.poll(server, exc.kind)
            self._metrics.server_up(server, False)
