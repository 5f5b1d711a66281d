"""The daemon: wiring, signals (TERM/INT stop, HUP reload), reloads, the main loop.

No HTTP to ComfyUI and no SQL here: the poller, the hook dispatcher and the store do that.

Faults that pass (a busy or unreachable database: ``StoreError``) are logged and tried
again. Anything else raised by the daemon's own machinery (the store, a tick's
bookkeeping, the dispatcher, a background task) is a bug: it ends :meth:`Daemon.run`
with that exception, once, and the command line logs it and exits with status 70. (An
error met on one server's data stays with that server: see ``Poller``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from comfywatch.advice import config_advice
from comfywatch.clock import SYSTEM_CLOCK, Clock
from comfywatch.comfy import SocketEvent
from comfywatch.config import Settings, config_fingerprint, load_settings
from comfywatch.config.schema import ListenAddress
from comfywatch.errors import ConfigError, LockLost, StoreError
from comfywatch.history import Progress
from comfywatch.hooks import HookDispatcher
from comfywatch.housekeeping import Housekeeping
from comfywatch.leases import beat_every_s
from comfywatch.metrics import Metrics
from comfywatch.notify import SystemdNotifier
from comfywatch.poller import Poller
from comfywatch.progress import ProgressBook
from comfywatch.progress_writer import ProgressWriter
from comfywatch.reload import changes, restart_only
from comfywatch.replicas import Replica
from comfywatch.spool import Spool
from comfywatch.store import ActiveJob, Fence, NewJob, Store
from comfywatch.store.listen import DELIVERIES, REGISTERED, ChangeListener, listen_url
from comfywatch.watchers import QueueWatchers
from comfywatch.web import HttpListener, HttpMove

log = structlog.get_logger("comfywatch.service")

#: How long a stop waits for an in-flight tick before cancelling its network part.
STOP_GRACE_S = 5.0
#: The longest a tick waits for slow servers before recording the others' results.
MIN_TICK_BUDGET_S = 1.0
#: The shortest gap between polls of one server that WebSocket hints may cause: a finish
#: is recorded within tens of milliseconds, and a burst of finishes costs one history tail
#: per gap (at most 20 a second), however many prompts finish.
HINT_GAP_S = 0.05
#: How long a stop waits for hook deliveries in flight before cancelling them.
HOOK_STOP_GRACE_S = 10.0
#: Delay before retrying a tick whose database transaction failed.
STORE_RETRY_S = 1.0
#: The longest a pass spends registering spool files before it ticks (the rest waits for
#: the next pass): a flood of files delays ticks by this much at most.
SPOOL_BUDGET_S = 1.0
#: The longest reload error ``STATUS=`` repeats (the log has all of it).
STATUS_ERROR_CHARS = 300
#: Jobs heard of (registered by another process) loaded per query.
HEARD_CHUNK = 500
#: The keys whose change sets logging up again.
LOG_KEYS = frozenset({"daemon.log_level", "daemon.log_format"})


def new_jobs(settings: Settings) -> list[NewJob]:
    return [
        NewJob(
            server=job.server,
            prompt_id=job.prompt_id,
            labels=dict(job.labels),
            hooks=tuple(job.hooks),
            source=job.source,
        )
        for job in settings.jobs
    ]


def configured(settings: Settings) -> set[tuple[str, str]]:
    """The (server, prompt_id) pairs the main file names: never pruned (see Store.prune).

    Spool files are read once, so the jobs they registered are pruned like any other.
    """
    return {(job.server, job.prompt_id) for job in settings.jobs}


@dataclass
class DaemonStatus:
    """Live counts for ``STATUS=``, ``/readyz`` and ``--until-done``."""

    active_jobs: int = 0
    pending_deliveries: int = 0
    servers_up: int = 0
    servers_total: int = 0
    last_tick_monotonic: float | None = None
    ready: bool = False
    #: Why the last reload failed (``None``: it succeeded, or none was tried).
    reload_error: str | None = None


class Daemon:
    """Runs the poller and the hook dispatcher until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        metrics: Metrics | None = None,
        notifier: SystemdNotifier | None = None,
        clock: Clock = SYSTEM_CLOCK,
        log_setup: Callable[[Settings], None] | None = None,
    ) -> None:
        """``clock``: the wall clock for what is stored and decided on stored times, the
        monotonic one for what is scheduled (the loop's own sleeps use the event loop's).
        ``log_setup`` sets logging up for reloaded settings (level and format)."""
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self.notifier = notifier or SystemdNotifier.from_env()
        self._clock = clock
        self._log_setup = log_setup
        self.status = DaemonStatus(servers_total=len(settings.servers))
        self.metrics.config_loaded(True, clock.wall())
        #: The endpoints of ``[daemon] http`` (started by :func:`run_daemon`).
        self.http = HttpListener(self)
        self.stop_event = asyncio.Event()
        self._reload_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._hinted: set[str] = set()
        # A background task ended, or the database lock was lost: look at once.
        self._trouble = False
        self._watchers = QueueWatchers(
            self._socket_event, self._socket_progress, on_ended=self.notice_trouble
        )
        self.progress = ProgressBook()
        self.spool = Spool(settings, metrics=self.metrics)
        self._housekeeping = Housekeeping(
            store=store,
            metrics=self.metrics,
            spool=self.spool,
            mono=clock.mono,
            on_failed=self.notice_trouble,
        )
        # Taken before the files were read, so an edit made during a load is not missed.
        self._fingerprint = settings.fingerprint
        # What the files looked like at the last look (see _config_changed).
        self._fingerprint_seen = settings.fingerprint
        # Whether the last tick was recorded (so the counts in self.status are current).
        self._tick_recorded = False
        d = settings.daemon
        #: With ``[daemon] replicas``: this daemon's registration and server leases.
        self.replica: Replica | None = None
        if d.replicas:
            self.replica = Replica(
                store,
                servers=settings.servers,
                lease_s=d.lease_s,
                metrics=self.metrics,
                mono=clock.mono,
                on_change=self._leases_changed,
            )
        self._replica_task: asyncio.Task[None] | None = None
        self._jobs_synced_m = 0.0  # when the held servers' jobs are read again (monotonic)
        self.poller = Poller(
            store=store,
            servers=settings.servers,
            hooks=settings.hooks,
            not_found_after_s=d.not_found_after_s,
            poll_interval_s=d.poll_interval_s,
            metrics=self.metrics,
            clock=clock,
            on_poll_done=self.hint,  # a slow server's late result: record it soon
            progress=self.progress,
            replicated=self.replica is not None,
            fence=self._fence,
            may_poll=self._may_poll,
            user_agent="comfywatch" if self.replica is None else f"comfywatch/{self.replica.id}",
        )
        self._progress_writer = ProgressWriter(
            store=store, book=self.progress, job_id_of=self.poller.job_id, fence=self._fence
        )
        self._progress_task: asyncio.Task[None] | None = None
        #: Jobs another process registered (heard of on PostgreSQL): loaded on the next pass.
        self._heard: set[int] = set()
        self._listen_task: asyncio.Task[None] | None = None
        self.dispatcher = HookDispatcher(
            store=store,
            hooks=settings.hooks,
            concurrency=d.hook_concurrency,
            metrics=self.metrics,
            clock=clock,
            look_every_s=d.poll_interval_s,
        )

    # -- replicas -----------------------------------------------------------------------

    def _may_poll(self, server: str) -> bool:
        return self.replica is None or self.replica.holds(server)

    def _fence(self) -> Fence | None:
        return None if self.replica is None else self.replica.fence()

    def _leases_changed(self, lost: set[str]) -> None:
        """The replica's leases changed: stop polling the servers lost at once; the main
        loop loads the jobs of those gained (:meth:`_own_leases`)."""
        self.poller.drop(lost)
        self.dispatcher.wake()
        self._wake.set()

    async def _own_leases(self) -> None:
        """Hand the servers whose lease this replica holds to the poller."""
        if self.replica is None:
            return
        try:
            gained = await self.poller.own(self.replica.owned())
            now_m = self._clock.mono()
            if now_m >= self._jobs_synced_m:
                # Jobs registered through another replica (the config, a spool file it
                # read first, `register`) reach the owner of their server here.
                self._jobs_synced_m = now_m + beat_every_s(self.settings.daemon.lease_s)
                if await self.poller.refresh():
                    self._wake.set()
        except StoreError as exc:
            log.warning("lease_jobs_not_loaded", error=str(exc))
            return
        for server in gained:
            self.hint(server)
        if gained:
            self.dispatcher.wake()  # what those servers' jobs owe

    # -- control ------------------------------------------------------------------------

    def notice_trouble(self) -> None:
        """A background task ended, or the database lock was lost: the main loop looks
        (:meth:`_check_background`) without waiting for the next tick."""
        self._trouble = True
        self._wake.set()

    def _heard_registered(self, payload: str) -> None:
        """``comfywatch_registered``: jobs registered by another process (this one's own
        are tracked already)."""
        ids = {int(part) for part in payload.split(",") if part.isdigit()}
        new = {job_id for job_id in ids if not self.poller.tracks(job_id)}
        if new:
            self._heard.update(new)
            self._wake.set()

    def _listen(self) -> None:
        """On PostgreSQL, hear of registrations and due deliveries as they commit (the
        poll interval stays the safety net)."""
        if listen_url(self.settings.daemon.database_url) is None:
            return
        listener = ChangeListener(
            self.settings.daemon.database_url,
            {REGISTERED: self._heard_registered, DELIVERIES: lambda _: self.dispatcher.wake()},
            on_connected=self.dispatcher.wake,
        )
        self._listen_task = asyncio.create_task(listener.run(self.stop_event), name="listen")
        self._listen_task.add_done_callback(lambda _: self.notice_trouble())

    async def _load_heard(self) -> None:
        """Hand the jobs heard of to the poller (those it tracks already change nothing)."""
        if not self._heard:
            return
        ids, self._heard = sorted(self._heard), set()
        for start in range(0, len(ids), HEARD_CHUNK):
            chunk = ids[start : start + HEARD_CHUNK]
            try:
                rows = await self.store.active_jobs(chunk)
            except StoreError as exc:
                self._heard.update(ids[start:])  # tried again on the next pass
                log.warning("registered_jobs_not_loaded", error=str(exc))
                return
            self.status.active_jobs += self._registered(rows)

    def request_stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_event.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -- start-up and reload --------------------------------------------------------------

    async def start(self) -> None:
        """Migrate the schema and register the configured jobs."""
        await self.store.migrate()
        added = await self.store.register(new_jobs(self.settings), self._clock.wall())
        if self.replica is not None:
            await self.replica.beat()  # registers; takes the free leases assigned to it
            await self._own_leases()
        # STATUS= goes out with READY=1: counts from the database, not zeros. No server has
        # failed a poll yet (ticks count a server as up until one does).
        self.status.active_jobs = await self.poller.load()
        self.status.pending_deliveries = await self.store.pending_delivery_count()
        self.status.servers_up = len(self.settings.servers)
        log.info(
            "daemon_started",
            config=str(self.settings.path),
            servers=sorted(self.settings.servers),
            jobs_configured=len(self.settings.jobs),
            jobs_added=len(added),
            **({} if self.replica is None else {"replica": self.replica.id}),
        )
        for advice in await asyncio.to_thread(config_advice, self.settings):
            log.warning(
                "config_warning",
                code=advice.code,
                file=advice.file,
                key=advice.key,
                line=advice.line,
                message=advice.message,
            )

    async def reload(self, *, why: str) -> bool:
        """Load the configuration again and apply all of it, or none of it: on any error
        (a broken file, another database, an HTTP address that cannot be bound, jobs the
        database refuses) the running configuration stays whole, and the failure shows in
        the log, the metrics, ``/readyz`` and ``STATUS=`` until a reload succeeds."""
        self.notifier.notify(reloading=True)
        try:
            return await self._reload(why)
        finally:
            # Only once the new settings are in use (or the old ones kept).
            self.notifier.notify(ready=True, status=self._status_line())

    async def _reload(self, why: str) -> bool:
        old = self.settings
        changed: list[str] | None = None
        try:
            settings = load_settings(old.path)
            changed = changes(old, settings)
            for key, reason in restart_only(changed).items():  # the first refuses it
                raise ConfigError(reason, file=str(settings.path), key=key)
            # What can fail goes first, and is undone if a later step fails.
            move = await self._prepare_http(settings, changed)
            try:
                added = await self.store.register(new_jobs(settings), self._clock.wall())
            except BaseException:
                await move.rollback()
                raise
        except ConfigError as exc:
            # A broken file: do not try again until the files change again.
            self._fingerprint = config_fingerprint(old)
            return self._reload_failed(why, exc, changed)
        except StoreError as exc:
            # The files are fine but the jobs could not be registered: the fingerprint
            # stays, so the next loop tries again.
            return self._reload_failed(why, exc, changed)
        await move.commit()
        self._fingerprint = settings.fingerprint
        await self._watchers.stop()
        d = settings.daemon
        self.poller.apply(
            servers=settings.servers,
            hooks=settings.hooks,
            not_found_after_s=d.not_found_after_s,
            poll_interval_s=d.poll_interval_s,
        )
        self.dispatcher.configure(
            hooks=settings.hooks,
            concurrency=d.hook_concurrency,
            look_every_s=d.poll_interval_s,
        )
        self.spool.configure(settings)
        if self.replica is not None:
            self.replica.configure(settings.servers)
        self.settings = settings
        new = self._registered(added)
        if self.status.ready:
            self._watchers.start(self.poller.clients())
        self.status.servers_total = len(settings.servers)
        self.status.servers_up = sum(1 for h in self.poller.health().values() if h.up is not False)
        self.status.reload_error = None
        self.metrics.config_loaded(True, self._clock.wall())
        log.info(
            "config_reloaded",
            why=why,
            changed=changed,
            jobs_configured=len(settings.jobs),
            jobs_added=new,
        )
        # After the line above, which is written as before (even if it no longer would be).
        if self._log_setup is not None and not LOG_KEYS.isdisjoint(changed):
            self._log_setup(settings)
        return True

    async def _prepare_http(self, settings: Settings, changed: list[str]) -> HttpMove:
        """Listen on the new ``[daemon] http`` address, if it changed, beside the old one."""
        address = settings.daemon.http if "daemon.http" in changed else self.http.address
        try:
            return await self.http.prepare(address)
        except OSError as exc:
            assert address is not None  # stopping cannot fail
            raise listen_error(settings, address, exc) from None

    def _reload_failed(
        self, why: str, exc: ConfigError | StoreError, changed: list[str] | None
    ) -> bool:
        self.status.reload_error = str(exc)
        self.metrics.config_loaded(False, self._clock.wall())
        fields = {} if changed is None else {"not_applied": changed}
        log.error("reload_failed", why=why, error=str(exc), kept="previous configuration", **fields)
        return False

    def _registered(self, rows: list[ActiveJob]) -> int:
        """Hand jobs the store just registered (or refreshed) to the poller, and poll
        their servers soon; returns how many are new to it."""
        new = self.poller.add(rows)
        for server in {row.server for row in rows}:
            self.hint(server)
        self._progress_writer.wake()  # progress that came before the registration
        return new

    def _config_changed(self) -> bool:
        """Whether the files changed since they were loaded and have stayed as they are since
        the last look (a loop pass before): a file caught while an editor or a deployment
        tool writes it (truncated, or half-written) is not loaded."""
        now = config_fingerprint(self.settings)
        seen, self._fingerprint_seen = self._fingerprint_seen, now
        return now != self._fingerprint and now == seen

    # -- the loop -----------------------------------------------------------------------

    async def run(self, *, until_done: bool = False) -> int:
        """Poll until stopped (or, with ``until_done``, until nothing is left to do).

        Raises :class:`LockLost` if the database lock is lost, and what a bug raised
        (see the module's docstring). The notify socket is closed when it returns."""
        try:
            return await self._run(until_done)
        except LockLost as exc:
            log.error("database_lock_lost", error=str(exc))
            raise
        finally:
            self.notifier.close()

    async def _run(self, until_done: bool) -> int:
        await self.start()
        dispatcher_task = asyncio.create_task(self.dispatcher.run(self.stop_event))
        self._progress_task = asyncio.create_task(self._progress_writer.run(self.stop_event))
        self._progress_task.add_done_callback(lambda _: self.notice_trouble())
        dispatcher_task.add_done_callback(lambda _: self.notice_trouble())
        self._listen()
        if self.replica is not None:
            self._replica_task = asyncio.create_task(self.replica.run(self.stop_event))
            self._replica_task.add_done_callback(lambda _: self.notice_trouble())
        failing: BaseException | None = None  # what ends the loop, if anything does
        try:
            self.status.ready = True
            self.notifier.notify(ready=True, status=self._status_line())
            self._watchers.start(self.poller.clients())
            next_full_s = time.monotonic()
            while not self.stop_event.is_set():
                await self._check_background(dispatcher_task)
                await self._own_leases()
                reloaded = False
                if self._reload_event.is_set():
                    self._reload_event.clear()
                    reloaded = await self.reload(why="SIGHUP")
                elif self._config_changed():
                    reloaded = await self.reload(why="files changed")
                await self._load_heard()
                only: set[str] | None = None
                # New settings (another poll_interval_s, new servers, ...): a full pass now.
                if not reloaded and time.monotonic() < next_full_s:
                    only = set(self._hinted)  # woken early: poll just the hinted servers
                else:
                    next_full_s = time.monotonic() + self.settings.daemon.poll_interval_s
                self._hinted.clear()  # hints from before the tick are served by it
                if only is None:  # the spool on full passes, not on every WebSocket hint
                    await self.ingest_spool()
                retry_s = await self._one_tick(only)
                self._reconnect_stalled()
                if retry_s is not None:
                    next_full_s = time.monotonic() + retry_s
                if self.stop_event.is_set():
                    break  # the dispatcher ends on a stop too: that is no failure
                await self._check_background(dispatcher_task)
                if until_done and await self._all_done():
                    log.info("all_done")
                    break
                await self._sleep_until(next_full_s)
        except BaseException as exc:
            failing = exc
            raise
        finally:
            self.stop_event.set()
            self.notifier.notify(stopping=True)
            failures = await self._watchers.stop()
            failures += await self._housekeeping.stop()
            if self._listen_task is not None:
                await asyncio.wait({self._listen_task})
                if not self._listen_task.cancelled() and self._listen_task.exception():
                    failures.append(self._listen_task.exception())  # type: ignore[arg-type]
            if self._replica_task is not None:
                await asyncio.wait({self._replica_task})
                if not self._replica_task.cancelled():
                    replica_failure = self._replica_task.exception()
                    if replica_failure is not None:
                        failures.append(replica_failure)
            await asyncio.wait({self._progress_task})  # ends its write in flight, if any
            if not self._progress_task.cancelled():
                progress_failure = self._progress_task.exception()
                if progress_failure is not None:
                    failures.append(progress_failure)
            self.dispatcher.wake()
            try:
                failures += await self._stop_dispatcher(dispatcher_task)
            finally:
                await self.poller.close()
                if self.replica is not None:
                    await self.replica.leave()  # the others take its servers at once
                await self.dispatcher.close()
                log.info("daemon_stopped")
            self._raise_late(failures, failing)
        return 0

    async def _stop_dispatcher(self, task: asyncio.Task[None]) -> list[BaseException]:
        """Let in-flight deliveries finish within the grace period, then cancel them
        (they stay pending and are sent again after the restart: at least once).
        Returns what the dispatcher raised, if it failed."""
        done, _ = await asyncio.wait({task}, timeout=HOOK_STOP_GRACE_S)
        if not done:
            log.warning("hook_attempts_cancelled_on_stop", grace_s=HOOK_STOP_GRACE_S)
            task.cancel()
            await asyncio.wait({task})
        exc = None if task.cancelled() else task.exception()
        return [exc] if exc is not None else []

    @staticmethod
    def _raise_late(failures: list[BaseException], failing: BaseException | None) -> None:
        """Background tasks that failed while the daemon stopped: the first is raised
        (a bug: the exit status says so), unless the daemon already stops on another
        exception; those not raised are logged. One raised already is left alone."""
        late = [exc for exc in failures if exc is not failing]
        if failing is None and late:
            first, *late = late
        else:
            first = None
        for exc in late:
            log.error("background_task_failed", exc_info=exc)
        if first is not None:
            raise first

    async def ingest_spool(self, budget_s: float = SPOOL_BUDGET_S) -> list[ActiveJob]:
        """Register what waits in ``jobs_dir`` (bad files are set aside, never fatal), and
        hand the new jobs to the poller; returns them."""
        added = await self.spool.ingest(self.store, now_s=self._clock.wall(), budget_s=budget_s)
        if added:
            self.status.active_jobs += self._registered(added)
        return added

    async def _one_tick(self, only: set[str] | None = None) -> float | None:
        """Run one tick (bounded by the stop grace period once a stop is requested);
        returns a delay before the next full tick when this one must be retried soon."""
        budget_s = max(MIN_TICK_BUDGET_S, self.settings.daemon.poll_interval_s)
        tick = asyncio.create_task(self.poller.tick(only, budget_s=budget_s))
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            await asyncio.wait({tick, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not tick.done():
                done, _ = await asyncio.wait({tick}, timeout=STOP_GRACE_S)
                if not done:
                    log.warning("tick_cancelled_on_stop")
                    tick.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await tick
                    return None
            report = tick.result()
        except StoreError as exc:
            self._tick_recorded = False
            log.error("tick_not_recorded", error=str(exc), retry_in_s=STORE_RETRY_S)
            return STORE_RETRY_S
        finally:
            stop.cancel()
        self._tick_recorded = True
        if report.changed:
            self.dispatcher.wake()
        now = self._clock.wall()
        self.status.active_jobs = report.active
        self.status.last_tick_monotonic = time.monotonic()
        health = self.poller.health()
        self.status.servers_up = sum(1 for h in health.values() if h.up is not False)
        self.metrics.ticks.inc()
        self.metrics.last_tick.set(now)
        await self._after_tick(now)
        self.notifier.notify(watchdog=True, status=self._status_line())
        return None

    async def _after_tick(self, now: float) -> None:
        """Counts for STATUS= and the gauges, and pruning when it is due."""
        try:
            self.status.pending_deliveries = await self.store.pending_delivery_count()
            await self._housekeeping.refresh_gauges(now)
            days = self.settings.daemon.retention_days
            if days is not None:
                self._housekeeping.prune_if_due(now, days, keep=configured(self.settings))
        except StoreError as exc:
            log.warning("housekeeping_failed", error=str(exc))

    async def _all_done(self) -> bool:
        """Whether ``--until-done`` may stop; never on counts older than a failed tick, and a
        busy database means "not yet", not a crash."""
        if not self._tick_recorded or self.status.active_jobs != 0 or self.spool.waiting:
            return False
        try:
            return await self.store.pending_delivery_count() == 0
        except StoreError as exc:
            log.warning("housekeeping_failed", error=str(exc))
            return False

    async def _sleep_until(self, deadline_s: float) -> None:
        """Sleep until the next full tick (monotonic ``deadline_s``); a stop or reload
        ends it at once, a WebSocket hint once the minimum gap between polls has passed."""
        gap_end_s = time.monotonic() + self._hint_gap_s()
        while True:
            self._wake.clear()
            if (
                self.stop_event.is_set()
                or self._reload_event.is_set()
                or self._trouble
                or self._heard
            ):
                return
            now_s = time.monotonic()
            if now_s >= deadline_s or (self._hinted and now_s >= gap_end_s):
                return
            until_s = min(deadline_s, gap_end_s) if self._hinted else deadline_s
            # Only while the last tick was recorded: a loop whose ticks fail stays unfed.
            ping_s = self.notifier.watchdog_ping_s if self._tick_recorded else None
            if ping_s is not None:
                # Long poll intervals: keep systemd's watchdog fed while idle after a
                # completed tick (a hung tick still stops the pings).
                until_s = min(until_s, now_s + ping_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), until_s - now_s)
            if ping_s is not None:
                self.notifier.notify(watchdog=True)

    def _hint_gap_s(self) -> float:
        """The shortest time between two polls of a server, however often it hints."""
        return min(HINT_GAP_S, self.settings.daemon.poll_interval_s)

    # -- push hints ---------------------------------------------------------------------

    def _socket_event(self, server: str, kind: SocketEvent, remaining: int | None) -> None:
        if self.poller.socket_event(server, kind, remaining):
            self.hint(server)

    def _socket_progress(self, server: str, progress: Progress) -> None:
        self.progress.note(server, progress, self._clock.wall())
        self._progress_writer.wake()

    def _reconnect_stalled(self) -> None:
        clients = self.poller.clients()
        for server in self.poller.stalled_sockets():
            log.warning("websocket_stalled", server=server)
            self._watchers.reconnect(server, clients[server])

    def hint(self, server: str) -> None:
        """``server``'s queue shrank: poll it soon rather than at the next full tick."""
        self._hinted.add(server)
        self._wake.set()

    async def _check_background(self, dispatcher: asyncio.Task[None]) -> None:
        """A background task that died, or a lost database lock, stops the daemon loudly,
        never half-running."""
        self._trouble = False
        await self.store.check_daemon_lock()
        if dispatcher.done():
            dispatcher.result()
            raise RuntimeError("hook dispatcher stopped unexpectedly")
        if self._replica_task is not None and self._replica_task.done():
            self._replica_task.result()
            raise RuntimeError("replica heartbeat stopped unexpectedly")
        if self._progress_task is not None and self._progress_task.done():
            self._progress_task.result()
            raise RuntimeError("progress writer stopped unexpectedly")
        if self._listen_task is not None and self._listen_task.done():
            self._listen_task.result()
            raise RuntimeError("database listener stopped unexpectedly")
        self._watchers.check()
        self._housekeeping.check()

    def _status_line(self) -> str:
        s = self.status
        line = (
            f"servers up {s.servers_up}/{s.servers_total}, jobs tracked {s.active_jobs}, "
            f"deliveries pending {s.pending_deliveries}"
        )
        if s.reload_error is not None:
            error = s.reload_error
            error = (
                error if len(error) <= STATUS_ERROR_CHARS else error[:STATUS_ERROR_CHARS] + "..."
            )
            line += f"; last reload failed, previous configuration kept: {error}"
        return line


def listen_error(settings: Settings, address: ListenAddress, exc: OSError) -> ConfigError:
    """The ConfigError of an ``[daemon] http`` address that cannot be bound."""
    return ConfigError(
        f"cannot listen on {address.host}:{address.port}: {exc.strerror or exc}",
        file=str(settings.path),
        key="daemon.http",
    )


async def run_daemon(
    settings: Settings,
    *,
    until_done: bool = False,
    log_setup: Callable[[Settings], None] | None = None,
) -> int:
    """Open the store and run until stopped. Raises StoreError if the database fails.

    ``log_setup`` sets logging up again when a reload changes its settings."""
    store = Store.open(settings.daemon.database_url)
    daemon: Daemon | None = None

    def lock_lost() -> None:
        if daemon is not None:
            daemon.notice_trouble()

    try:
        if not settings.daemon.replicas:  # replicas share the database, under leases
            await store.lock_for_daemon(on_lost=lock_lost)
        # What exists now (modules, classes, the ORM, settings) lives as long as the process:
        # full collections skip it from here on. Scanning it again at each one stalled the
        # loop for a few hundred ms on a busy machine while a flood of spool files came in.
        gc.collect()
        gc.freeze()
        daemon = Daemon(settings, store=store, log_setup=log_setup)
        daemon.install_signal_handlers()
        try:
            address = settings.daemon.http
            try:
                await (await daemon.http.prepare(address)).commit()
            except OSError as exc:
                assert address is not None
                raise listen_error(settings, address, exc) from None
            return await daemon.run(until_done=until_done)
        finally:
            await daemon.http.close()
    finally:
        if daemon is not None:
            daemon.notifier.close()  # run() closes it; not reached if the listener failed
        await store.close()
