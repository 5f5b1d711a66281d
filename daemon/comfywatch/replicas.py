"""One replica among several (``[daemon] replicas = true``): its registration, heartbeat
and server leases.

Each heartbeat (every third of ``lease_s``) renews the replica's registration and the
leases it holds, reads the live replicas and every lease, and acts on
:func:`comfywatch.leases.plan`: takes the free or expired leases of the servers assigned
to it, gives back those now assigned to another replica. A lease counts as held only
until :func:`comfywatch.leases.valid_until` of its last renewal (the monotonic clock,
with a margin): a replica that cannot reach the database stops polling before the lease
expires in the database, and so before another replica can take it over.

What the replica holds reaches the poller through :meth:`Replica.owned` and
:meth:`Replica.fence` (writes are conditional on the epochs it names);
``on_change(lost)`` is called whenever the set changed, with the servers no longer held:
it must stop polling them before it returns (a lease is given back only after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection

import structlog

from comfywatch import __version__
from comfywatch.errors import StoreError
from comfywatch.leases import beat_every_s, plan, valid_until
from comfywatch.metrics import Metrics
from comfywatch.store import Fence, Store

log = structlog.get_logger("comfywatch.replicas")


def new_replica_id() -> str:
    """A replica's id: host, process, and a random part (a restarted process is new)."""
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Replica:
    """This daemon's registration and leases; :meth:`run` heartbeats until stopped."""

    def __init__(
        self,
        store: Store,
        *,
        servers: Collection[str],
        lease_s: float,
        metrics: Metrics | None = None,
        mono: Callable[[], float] = time.monotonic,
        on_change: Callable[[set[str]], None] = lambda _lost: None,
        replica_id: str | None = None,
    ) -> None:
        self.id = replica_id or new_replica_id()
        self._store = store
        self._servers = frozenset(servers)
        self._lease_s = lease_s
        self._metrics = metrics
        self._mono = mono
        self._on_change = on_change
        #: Per server held: the lease's epoch, and until when (monotonic) it counts.
        self._held: dict[str, tuple[int, float]] = {}
        self._failing = False
        self._exported: set[str] = set()  # the servers the gauge has a value for

    def configure(self, servers: Collection[str]) -> None:
        """The configured servers changed (a reload): the next heartbeat acts on them."""
        self._servers = frozenset(servers)

    def holds(self, server: str) -> bool:
        """Whether this replica may poll ``server`` at this moment (checked again as each
        poll starts: a heartbeat stuck on an unanswering database changes nothing)."""
        held = self._held.get(server)
        return held is not None and held[1] > self._mono()

    def owned(self) -> set[str]:
        """The servers this replica may poll now (held, and not past their deadline)."""
        now_m = self._mono()
        return {server for server, (_, until_m) in self._held.items() if until_m > now_m}

    def fence(self) -> Fence:
        """What this replica's writes are conditional on: its id and its leases' epochs."""
        owned = self.owned()
        return Fence(self.id, {s: epoch for s, (epoch, _) in self._held.items() if s in owned})

    def next_deadline_m(self) -> float | None:
        """When (monotonic) the first held lease stops counting, if none is renewed."""
        return min((until_m for _, until_m in self._held.values()), default=None)

    async def beat(self) -> None:
        """One heartbeat: register, renew, then take and give back what the plan says.
        A database that fails leaves the leases to run out (they stop counting at their
        deadline); the next heartbeat tries again."""
        before = self.owned()
        try:
            await self._beat()
            if self._failing:
                self._failing = False
                log.info("replica_database_back", replica=self.id)
        except StoreError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "lease_renewal_failed",
                    replica=self.id,
                    error=str(exc),
                    servers=sorted(self._held),
                )
        self._expire()
        after = self.owned()
        if before != after:
            log.info(
                "leases_changed",
                replica=self.id,
                gained=sorted(after - before),
                lost=sorted(before - after),
            )
            self._on_change(before - after)
        self._export(after)

    async def _beat(self) -> None:
        store = self._store
        await store.heartbeat(
            self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            lease_s=self._lease_s,
        )
        if self._held:
            started_m = self._mono()
            epochs = {server: epoch for server, (epoch, _) in self._held.items()}
            renewed = await store.renew_leases(self.id, epochs, self._lease_s)
            until_m = valid_until(started_m, self._lease_s)
            for server in list(self._held):
                if server in renewed:
                    self._held[server] = (epochs[server], until_m)
                else:  # taken over: another replica raised the epoch
                    del self._held[server]
        live, leases = await store.lease_view()
        decided = plan(self.id, self._servers, live, leases)
        for server in sorted(decided.release):
            held = self._held.pop(server, None)
            self._on_change({server})  # stops polling it before it is given back
            at = held[0] if held is not None else leases[server].epoch
            await store.release_lease(self.id, server, at)
        for server in sorted(decided.take):
            started_m = self._mono()
            taken = await store.take_lease(self.id, server, self._lease_s)
            if taken is not None:
                epoch = taken
                self._held[server] = (epoch, valid_until(started_m, self._lease_s))
                if self._metrics is not None:
                    self._metrics.lease_takeovers.inc()
                log.info("lease_taken", replica=self.id, server=server, epoch=epoch)

    def _expire(self) -> None:
        now_m = self._mono()
        for server, (_, until_m) in list(self._held.items()):
            if until_m <= now_m:
                del self._held[server]
                log.warning("lease_expired", replica=self.id, server=server)

    def _export(self, owned: set[str]) -> None:
        if self._metrics is None:
            return
        self._exported |= self._servers | owned
        for server in self._exported:
            self._metrics.lease_owned.labels(server).set(1 if server in owned else 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat every third of the lease time until ``stop``; also wakes when a held
        lease reaches its deadline, so the poller stops at once."""
        every_s = beat_every_s(self._lease_s)
        next_beat_m = self._mono()
        while not stop.is_set():
            now_m = self._mono()
            if now_m >= next_beat_m:
                next_beat_m = now_m + every_s
                try:
                    # A database that does not answer at all must not hold the loop: the
                    # leases' deadlines are watched here.
                    await asyncio.wait_for(self.beat(), timeout=every_s)
                except TimeoutError:
                    log.warning("lease_renewal_failed", replica=self.id, error="timed out")
                    self._check_deadlines()
                continue
            wake_m = next_beat_m
            deadline = self.next_deadline_m()
            if deadline is not None and deadline > now_m:
                wake_m = min(wake_m, deadline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, wake_m - now_m))
            self._check_deadlines()

    def _check_deadlines(self) -> None:
        """Drop the leases past their deadline, and say so."""
        before = set(self._held)
        self._expire()
        if set(self._held) != before:
            self._on_change(before - set(self._held))
            self._export(self.owned())

    async def leave(self) -> None:
        """Give every lease back and deregister (a clean stop: the others take over at
        once rather than after the lease time)."""
        lost = set(self._held)
        self._held.clear()
        self._on_change(lost)
        self._export(set())
        try:
            await self._store.leave(self.id)
        except StoreError as exc:
            log.warning("replica_leave_failed", replica=self.id, error=str(exc))
