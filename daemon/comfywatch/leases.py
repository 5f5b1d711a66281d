"""**Pure.** Which replica polls which server, and what a replica does about its leases.

With ``[daemon] replicas = true`` several daemons share one PostgreSQL database. Each
server is polled by one replica at a time, under a lease (a ``server_leases`` row: owner,
fencing epoch, expiry). This module decides, from what the database shows, which servers
a replica should hold (:func:`assign`: rendezvous hashing over the live replicas, so a
join or a leave moves only the servers it must), and what to do about each lease
(:func:`plan`): take a free or expired one that is its own, give back one that now
belongs to another replica. It also says until when a replica may believe a lease is its
own (:func:`valid_until`): the renewal's start on the monotonic clock, plus the lease
time, less a margin, so that a replica cut off from the database stops polling before
another can take its servers over.

No I/O here: the store reads and writes the rows, :mod:`comfywatch.replicas` runs the loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass

#: The share of the lease time a replica keeps in hand: it stops polling a server this
#: long before the lease it last renewed expires (clock drift, a slow answer, a GC pause).
MARGIN_SHARE = 0.2
#: How many heartbeats fit in a lease time: a lease survives two failed renewals.
BEATS_PER_LEASE = 3
#: The shortest lease time, relative to the poll interval, that the config accepts.
MIN_LEASE_POLLS = 3.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A ``server_leases`` row, as the database showed it."""

    server: str
    owner: str | None
    epoch: int
    #: Whether it is past its expiry by the database's clock (a free lease counts as expired).
    expired: bool


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What a replica does about its leases in one heartbeat."""

    #: Servers to take: assigned to this replica, and free or expired (or never leased).
    take: frozenset[str]
    #: Servers to give back: held by this replica, assigned to another live one.
    release: frozenset[str]
    #: Servers to keep renewing.
    keep: frozenset[str]


def _weight(server: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{server}\0{replica}".encode(), digest_size=8).digest()


def assign(servers: Collection[str], replicas: Collection[str]) -> dict[str, str]:
    """Each server's replica: the live one with the highest hash of (server, replica).

    Every replica computes the same answer from the same set of live replicas; when one
    joins or leaves, only the servers it wins or held move. Empty without replicas.
    """
    if not replicas:
        return {}
    ordered = sorted(replicas)
    return {server: max(ordered, key=lambda r: _weight(server, r)) for server in servers}


def plan(
    me: str,
    servers: Collection[str],
    live: Collection[str],
    leases: Mapping[str, Lease],
) -> LeasePlan:
    """What ``me`` does: take its assigned servers that are free, expired or never leased;
    release those it holds that another live replica should hold; keep the rest it holds.

    ``live`` are the replicas whose registration has not expired (``me`` counts even if
    its own registration is not visible yet). A server held by another replica whose lease
    has not expired is left alone, even if it is assigned to ``me``: that replica gives
    it back on its next heartbeat, or its lease runs out.
    """
    owners = assign(servers, {*live, me})
    take: set[str] = set()
    release: set[str] = set()
    keep: set[str] = set()
    for server in servers:
        lease = leases.get(server)
        mine = owners.get(server) == me
        held = lease is not None and lease.owner == me and not lease.expired
        if held:
            (keep if mine else release).add(server)
        elif mine and (lease is None or lease.owner is None or lease.expired):
            take.add(server)
    # A lease of ``me`` on a server no longer configured: give it back.
    for server, lease in leases.items():
        if server not in servers and lease.owner == me and not lease.expired:
            release.add(server)
    return LeasePlan(frozenset(take), frozenset(release), frozenset(keep))


def valid_until(renew_started_m: float, lease_s: float) -> float:
    """Until when (monotonic) a replica may poll under a lease renewed by a statement sent
    at ``renew_started_m``: the database set its expiry later than that, to at least
    ``renew_started_m + lease_s`` by a clock that runs at the same rate."""
    return renew_started_m + lease_s * (1.0 - MARGIN_SHARE)


def beat_every_s(lease_s: float) -> float:
    """The time between two heartbeats (renewals) for a lease time of ``lease_s``."""
    return lease_s / BEATS_PER_LEASE


def lease_problem(lease_s: float, poll_interval_s: float) -> str | None:
    """Why ``lease_s`` is too short for ``poll_interval_s`` (``None``: it is not)."""
    if lease_s < MIN_LEASE_POLLS * poll_interval_s:
        return (
            f"must be at least {MIN_LEASE_POLLS:g} times poll_interval_s "
            f"({MIN_LEASE_POLLS * poll_interval_s:g} s), so that a lease outlives a "
            "renewal that fails"
        )
    return None
