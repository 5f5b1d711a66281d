"""Watch every server and decide the tracked jobs whose observation changed or is due.

The jobs live in memory (:mod:`~comfywatch.open_jobs`: loaded once by :meth:`Poller.load`,
fed by :meth:`Poller.add`). Each server has a :class:`~comfywatch.watch.ServerWatch` that
WebSocket events (:meth:`Poller.socket_event`) and poll answers move on, and that says
which requests are due. ``Poller.tick()`` polls the servers that are due, decides what
they showed (:func:`~comfywatch.tracking.decide`) and hands every change to the store in
one transaction. The other pieces: :mod:`~comfywatch.server_poll` makes one server's
requests, :mod:`~comfywatch.server_health` backs failing servers off and keeps the
restart evidence, :mod:`~comfywatch.recording` writes and logs the changes.

Two clocks (:mod:`~comfywatch.clock`): deadlines are decisions on stored timestamps, so
they and the heap that wakes them are on the wall clock; everything else scheduled here
(backoff, probes, queue reads, detection lag) is on the monotonic clock. A server that
cannot be reached does not hold its jobs' deadlines back: they pass, and the timeout
records in ``detail`` since when the server was unreachable and why.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from comfywatch.clock import SYSTEM_CLOCK, Clock
from comfywatch.comfy import ComfyClient, SocketEvent
from comfywatch.config import HookSettings, ServerSettings
from comfywatch.errors import ServerError, StoreError
from comfywatch.metrics import Metrics
from comfywatch.open_jobs import OpenJob, OpenJobs, deadline_of
from comfywatch.progress import ProgressBook
from comfywatch.recording import Recorder
from comfywatch.restarts import Look, Mark
from comfywatch.server_health import MAX_BACKOFF_S, ServerHealth, ServerHealthBook
from comfywatch.server_poll import ServerPoll, poll_server
from comfywatch.states import JobState
from comfywatch.store import ActiveJob, Fence, Store
from comfywatch.tracking import Decision, Policy, Seen, decide
from comfywatch.watch import ServerWatch

log = structlog.get_logger("comfywatch.poller")

#: One server's poll: each job it showed something about, with its decision.
Decisions = list[tuple[ActiveJob, Decision]]


@dataclass(frozen=True, slots=True)
class _Polled:
    """A successful poll's decisions, and when what it showed became observable
    (monotonic seconds)."""

    decisions: Decisions
    observed_at_s: float


@dataclass(frozen=True)
class TickReport:
    active: int
    changed: int
    finished: int
    servers_polled: int
    servers_failed: int


class Poller:
    """Watches every configured server; ``tick()`` polls those that are due."""

    def __init__(
        self,
        *,
        store: Store,
        servers: Mapping[str, ServerSettings],
        hooks: Mapping[str, HookSettings],
        not_found_after_s: float,
        poll_interval_s: float,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_poll_done: Callable[[str], None] | None = None,
        progress: ProgressBook | None = None,
        replicated: bool = False,
        fence: Callable[[], Fence | None] = lambda: None,
        user_agent: str = "comfywatch",
        may_poll: Callable[[str], bool] = lambda _server: True,
    ) -> None:
        """``on_poll_done`` is called with a server's name when a poll that outlived its
        tick's budget finishes (so that its result is recorded soon). A job's latest
        ``progress`` (from the book) goes with each change of its state.

        ``replicated`` (``[daemon] replicas``): only the servers handed over by
        :meth:`own` are polled and their jobs kept; ``fence`` says what the writes are
        conditional on; ``may_poll(server)`` is asked as each poll starts (the lease still
        counts). ``user_agent`` names this process to the servers."""
        self._may_poll = may_poll
        self._store = store
        self._user_agent = user_agent
        #: The servers this replica holds the lease of (``None``: all, a single daemon).
        self._owned: set[str] | None = set() if replicated else None
        self._clock = clock
        self._metrics = metrics
        self._on_poll_done = on_poll_done
        self._health = ServerHealthBook(metrics=metrics, max_backoff_s=max_backoff_s)
        self._progress = progress
        self._recorder = Recorder(
            store=store, metrics=metrics, mono=clock.mono, progress=progress, fence=fence
        )
        self._clients: dict[str, ComfyClient] = {}
        self._watches: dict[str, ServerWatch] = {}
        self._open = OpenJobs()
        self._loaded = False
        self._due: defaultdict[str, set[int]] = defaultdict(set)
        #: Per server, prompts whose history entry could not be read: asked again.
        self._recheck: defaultdict[str, set[str]] = defaultdict(set)
        self._warned_unknown: set[str] = set()
        self._inflight: dict[str, asyncio.Task[_Polled | None]] = {}
        #: Replaced clients, closing once the polls that use them end.
        self._retiring: set[asyncio.Task[None]] = set()
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
    ) -> None:
        """Adopt new settings. A server removed or changed gets a new client (and is
        looked at afresh); its old client closes once a poll still using it ends."""
        for name, client in list(self._clients.items()):
            settings = servers.get(name)
            if settings != client.settings:
                self._retire(self._clients.pop(name))
                self._watches.pop(name, None)  # a new server: look at everything again
                if settings is None:
                    self._health.forget(name)
                else:
                    self._health.reconfigured(name)  # its new settings are tried at once
        for name, settings in servers.items():
            if name not in self._clients:
                self._clients[name] = ComfyClient(settings, user_agent=self._user_agent)
        self._servers = dict(servers)
        self._hook_states = {name: hook.on for name, hook in hooks.items()}
        self._not_found_after_s = not_found_after_s
        self._poll_interval_s = poll_interval_s
        for name, watch in self._watches.items():
            watch.poll_interval_s = poll_interval_s
            watch.queue_refresh_s = servers[name].queue_refresh_s
        for open_job in self._open:
            self._schedule(open_job, after_decision=False)

    def _retire(self, client: ComfyClient) -> None:
        """Close ``client`` once the poll of its server in flight (if any) has ended: a
        reload never breaks a request under way."""
        poll = self._inflight.get(client.name)
        task = asyncio.create_task(_close_after(client, poll), name=f"close-{client.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def clients(self) -> Mapping[str, ComfyClient]:
        return dict(self._clients)

    def health(self) -> Mapping[str, ServerHealth]:
        return self._health.of_all(self._servers)

    @property
    def tracked_count(self) -> int:
        return len(self._open)

    def tracks(self, job_id: int) -> bool:
        """Whether the job is among the open ones."""
        return self._open.get(job_id) is not None

    def job_id(self, server: str, prompt_id: str) -> int | None:
        """The id of the job tracking ``prompt_id`` on ``server``, if one does."""
        open_job = self._open.on(server).get(prompt_id)
        return open_job.job.id if open_job is not None else None

    # -- jobs in and socket events ------------------------------------------------------

    async def load(self) -> int:
        """Load the non-terminal jobs from the store (once, at start); returns how many."""
        if not self._loaded:
            self._loaded = True
            if self._owned is None:
                self.add(await self._store.active_jobs())
        return len(self._open)

    async def own(self, servers: Collection[str]) -> set[str]:
        """With replicas: poll ``servers`` from now on (the leases held); those new to it
        have their open jobs loaded, those no longer among them are dropped. Returns the
        servers gained. Raises StoreError (nothing gained) if the jobs cannot be read."""
        assert self._owned is not None, "only a replicated poller owns servers"
        self.drop(self._owned - set(servers))
        gained = set(servers) - self._owned
        if not gained:
            return gained
        self._owned |= gained
        try:
            rows = await self._store.active_jobs(servers=sorted(gained))
        except BaseException:
            self._owned -= gained
            raise
        self.add(rows)
        for server in gained:
            if server in self._servers:
                self._watch(server).resync()
        return gained

    async def refresh(self) -> int:
        """With replicas: track the open jobs of the servers held that another replica
        registered (it does not poll them, so it does not hand them over); returns how
        many were new. Raises StoreError."""
        if not self._owned:
            return 0
        rows = await self._store.active_jobs(servers=sorted(self._owned))
        return self.add(rows)

    def drop(self, servers: Collection[str]) -> None:
        """With replicas: stop polling ``servers`` now (their lease is lost or given
        back): a poll under way is cancelled, their jobs leave memory (another replica
        loads them from the database)."""
        if self._owned is None:
            return
        for server in servers:
            self._owned.discard(server)
            task = self._inflight.pop(server, None)
            if task is not None:
                task.cancel()  # network reads only; its result would be refused anyway
            self._late.discard(server)
            for open_job in list(self._open.on(server).values()):
                self._open.remove(open_job.job.id)
                if self._progress is not None:
                    self._progress.forget(server, open_job.job.prompt_id)
            self._due.pop(server, None)
            self._recheck.pop(server, None)
            self._watches.pop(server, None)

    def owns(self, server: str) -> bool:
        """Whether this process polls ``server`` (always, without replicas)."""
        return self._owned is None or server in self._owned

    def add(self, jobs: Sequence[ActiveJob]) -> int:
        """Track jobs the store just registered (those known take their new hooks);
        returns how many were new."""
        added = 0
        now_m = self._clock.mono()
        for job in jobs:
            if not self.owns(job.server):
                continue  # another replica polls it
            had_jobs = bool(self._open.on(job.server))
            if not self._open.add(job):
                continue
            added += 1
            open_job = self._open.get(job.id)
            assert open_job is not None
            self._schedule(open_job, after_decision=False)
            if job.server in self._servers:
                watch = self._watch(job.server)
                if not had_jobs:
                    watch.forget_history()  # nothing was watched here: start afresh
                watch.registered(now_m)
        return added

    def socket_event(self, server: str, kind: SocketEvent, remaining: int | None) -> bool:
        """A WebSocket event of ``server``; True when the server should be polled soon."""
        if server not in self._servers:
            return False
        watch = self._watch(server)
        if kind == "connected":
            watch.socket_connected(self._clock.mono())
            self._health.socket_changed(server, up=True)
        elif kind == "disconnected":
            watch.socket_disconnected(self._clock.mono())
            self._health.socket_changed(server, up=False)
        elif remaining is not None:
            watch.socket_count(remaining, self._clock.mono())
            if self._metrics is not None:
                self._metrics.server_queue(server, remaining)
        if not self._open.on(server):
            return False
        return watch.need_tail or watch.need_queue is not None

    def stalled_sockets(self) -> list[str]:
        """Servers whose socket is open but silent: close and reconnect them."""
        return [name for name, watch in self._watches.items() if watch.stalled]

    def _watch(self, server: str) -> ServerWatch:
        watch = self._watches.get(server)
        if watch is None:
            watch = ServerWatch(
                poll_interval_s=self._poll_interval_s,
                queue_refresh_s=self._servers[server].queue_refresh_s,
            )
            self._watches[server] = watch
        return watch

    def _policy(self, server: str) -> Policy:
        settings = self._servers.get(server)
        return Policy(
            not_found_after_s=self._not_found_after_s,
            queue_timeout_s=settings.queue_timeout_s if settings else None,
            run_timeout_s=settings.run_timeout_s if settings else None,
        )

    def _schedule(self, open_job: OpenJob, *, after_decision: bool) -> None:
        """Put the job's next deadline in the heap. One that already passed but left the
        job waiting (an absence to confirm, an unreadable queue) is tried again later."""
        server = open_job.job.server
        at_s = deadline_of(open_job.view(), self._policy(server))
        now_s = self._clock.wall()
        if at_s is not None and after_decision and at_s <= now_s:
            settings = self._servers.get(server)
            at_s = now_s + (settings.queue_refresh_s if settings else 60.0)
        self._open.schedule(open_job.job.id, at_s)

    # -- the tick -----------------------------------------------------------------------

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
        if self._retiring:
            await asyncio.wait(set(self._retiring))
        for client in self._clients.values():
            await client.close()

    async def tick(
        self, only: Collection[str] | None = None, *, budget_s: float | None = None
    ) -> TickReport:
        """One round over every server that is due (or only those named: a hint, not the
        poll interval); all writes in one transaction.

        With ``budget_s``, the tick waits that long at most: a server slower than that
        (a hung host, a slow drip) keeps its poll running in the background, and its
        result is recorded by a later tick, so it never holds the other servers back.
        Without it (tests, ``--once`` style use) every poll is awaited.
        """
        await self.load()
        now_s = self._clock.wall()
        for server, job_ids in self._open.due(now_s).items():
            self._due[server] |= job_ids
            if server in self._servers:
                self._watch(server).want_queue("deadline")
        self._start_polls(now_s, self._clock.mono(), only)
        if self._inflight:
            await asyncio.wait(set(self._inflight.values()), timeout=budget_s)
        decisions, observed, polled, failed = self._collect_polls()
        decisions += self._deadlines_while_down(now_s)
        try:
            recorded = await self._recorder.record(
                decisions, now_s, self._hook_states, observed_at_s=observed
            )
        except StoreError:
            # Memory stays as it was; what the polls consumed is looked at again.
            for server in {job.server for job, _ in decisions}:
                if (watch := self._watches.get(server)) is not None:  # a reload may drop it
                    watch.resync()
            raise
        self._remember(decisions, recorded.applied)
        return TickReport(
            active=len(self._open),
            changed=recorded.changed,
            finished=recorded.finished,
            servers_polled=polled,
            servers_failed=failed,
        )

    def _start_polls(self, now_s: float, now_m: float, only: Collection[str] | None) -> None:
        """Start a poll of each server that has jobs, is due and is not being polled."""
        for server in self._open.servers():
            if server not in self._clients:
                if server not in self._warned_unknown:
                    self._warned_unknown.add(server)
                    count = len(self._open.on(server))
                    log.warning("server_not_configured", server=server, jobs=count)
                continue
            if (
                not self.owns(server)
                or not self._may_poll(server)
                or server in self._inflight
                or not self._health.due(server, now_m)
                or (only is not None and server not in only)
            ):
                continue
            task = asyncio.create_task(
                self._poll_server(server, now_s, interval=only is None), name=f"poll-{server}"
            )
            task.add_done_callback(functools.partial(self._poll_done, server))
            self._inflight[server] = task

    def _collect_polls(self) -> tuple[Decisions, dict[str, float], int, int]:
        """The decisions of every finished poll, when what each server's poll showed
        became observable (monotonic), how many polls finished and how many of them
        failed; polls still running are left for a later tick."""
        decisions: Decisions = []
        observed: dict[str, float] = {}
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
            decisions.extend(result.decisions)
            observed[server] = result.observed_at_s
        return decisions, observed, polled, failed

    def _deadlines_while_down(self, now_s: float) -> Decisions:
        """Decide the jobs whose deadline passed on a server that cannot be reached (its
        last poll failed, and none is under way): a timeout records since when and why.
        Nothing but a deadline is decided without the server's word."""
        decisions: Decisions = []
        for server in list(self._due):
            health = self._health.of(server)
            if server not in self._servers or server in self._inflight or health.up is not False:
                continue
            seen = Seen(unreachable=_unreachable(health))
            policy = self._policy(server)
            for job_id in self._due.pop(server):
                open_job = self._open.get(job_id)
                if open_job is not None:
                    decisions.append((open_job.job, decide(open_job.view(), seen, now_s, policy)))
        return decisions

    def _remember(self, decisions: Decisions, applied: Collection[int]) -> None:
        """Carry what was committed into memory; terminal jobs leave it."""
        for job, decision in decisions:
            changed = decision.state is not job.state
            if decision.state.terminal or (changed and job.id not in applied):
                self._open.remove(job.id)  # finished (or already so in the database)
                if self._progress is not None:
                    self._progress.forget(job.server, job.prompt_id)
                continue
            open_job = self._open.get(job.id)
            if open_job is None:
                continue
            self._open.update(job.id, decision)
            self._schedule(open_job, after_decision=True)

    def _poll_done(self, server: str, task: asyncio.Task[_Polled | None]) -> None:
        if server in self._late and not task.cancelled() and self._on_poll_done is not None:
            self._on_poll_done(server)

    async def _poll_server(self, server: str, now_s: float, *, interval: bool) -> _Polled | None:
        """Poll one server and decide what it showed; ``None`` if the server failed."""
        client = self._clients[server]
        watch = self._watch(server)
        started = self._clock.mono()
        # What was watched until now: a socket event during the poll may follow its reads.
        before = self._health.of(server).restart.mark
        try:
            polled = await poll_server(
                client,
                watch,
                self._open.on(server).keys(),
                functools.partial(self._open.tracked, server),
                self._clock.mono,
                interval=interval,
                recheck=frozenset(self._recheck[server] & self._open.on(server).keys()),
            )
        except ServerError as exc:
            watch.failed()
            self._health.failed(server, exc, now_s, started, poll_interval_s=self._poll_interval_s)
            return None
        except Exception as exc:
            # A bug met on this server's data must not stop tracking everywhere else.
            watch.failed()
            if self._health.of(server).error_kind != "error":  # the traceback once per episode
                log.exception("poll_failed_unexpectedly", server=server)
            error = ServerError(server, repr(exc)[:300])
            self._health.failed(
                server, error, now_s, started, poll_interval_s=self._poll_interval_s
            )
            return None
        finally:
            if self._metrics is not None:
                self._metrics.poll_latency(server, self._clock.mono() - started)
        self._health.succeeded(server, _look(polled), now_s, started)
        if self._metrics is not None:
            self._metrics.server_queue(server, watch.count)
        self._report_unreadable(server, polled)
        recheck = self._recheck[server]
        recheck.difference_update(polled.histories)
        recheck.update(polled.unreadable)
        return _Polled(
            self._decide_jobs(server, watch, polled, now_s, before), polled.observed_at_s
        )

    def _report_unreadable(self, server: str, polled: ServerPoll) -> None:
        if polled.queue_too_large:
            log.warning("queue_too_large", server=server)
        if not polled.unreadable:
            return
        for prompt_id in sorted(polled.unreadable):
            log.debug("history_unreadable", server=server, prompt_id=prompt_id)
        log.warning("history_unreadable", server=server, count=len(polled.unreadable))
        if self._metrics is not None:
            self._metrics.poll(server, "bad_response")

    def _decide_jobs(
        self, server: str, watch: ServerWatch, polled: ServerPoll, now_s: float, before: Mark
    ) -> Decisions:
        """The decision of each job the poll showed something about, or whose deadline
        passed; ``before``: the server's watch mark when the poll began."""
        policy = self._policy(server)
        mark = self._health.of(server).restart.mark
        # A job seen now was watched as far as the poll's start, and is past every restart
        # this poll showed (those came before its reads).
        sighting = replace(
            mark,
            socket_events=before.socket_events,
            socket_up=before.socket_up,
            websocket=before.websocket,
        )
        jobs = self._open.on(server)
        due = self._due.pop(server, set())
        if polled.queue is not None:
            shown = list(jobs.values())
        else:
            shown = [jobs[p] for p in polled.histories.keys() | polled.unreadable if p in jobs]
            ids = {open_job.job.id for open_job in shown}
            shown += [o for i in due if i not in ids and (o := self._open.get(i)) is not None]
        decisions: Decisions = []
        confirm = False
        for open_job in shown:
            seen = _seen(open_job.job.prompt_id, polled, sighting, mark)
            decision = decide(open_job.view(), seen, now_s, policy)
            decisions.append((open_job.job, decision))
            confirm |= not decision.state.terminal and decision.absent_count == 1
        if confirm:
            watch.want_queue("confirm absence")  # gone only once seen absent twice
        return decisions


async def _close_after(client: ComfyClient, poll: asyncio.Task[_Polled | None] | None) -> None:
    if poll is not None:
        await asyncio.wait({poll})
    await client.close()


def _unreachable(health: ServerHealth) -> str:
    """What a timeout decided while the server is down records in ``detail``."""
    since = "an unknown time"
    if health.down_since_s is not None:
        at = datetime.fromtimestamp(health.down_since_s, UTC)
        since = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"server unreachable since {since}: {health.error or health.error_kind}"


def _seen(prompt_id: str, polled: ServerPoll, sighting: Mark, mark: Mark) -> Seen:
    """What a poll showed about one prompt (nothing but the deadlines if it was not shown)."""
    history = polled.histories.get(prompt_id)
    if history is not None:
        return Seen(history=history, sighting=sighting, mark=mark)
    queue = polled.queue
    if prompt_id in polled.unreadable or queue is None:
        return Seen(unreadable=True, sighting=sighting, mark=mark)
    return Seen(
        running=prompt_id in queue.running,
        pending=prompt_id in queue.pending,
        sighting=sighting,
        mark=mark,
    )


def _look(polled: ServerPoll) -> Look:
    """What a poll showed, as the restart evidence wants it."""
    found = frozenset(p for p, record in polled.histories.items() if record is not None)
    tail = frozenset(polled.tail or ())
    return Look(
        queue=polled.queue,
        history=found | tail,
        whole_history=polled.tail_whole,
        tail_read=polled.tail is not None,
    )
