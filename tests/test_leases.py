"""The pure lease decisions: which replica polls which server, and what a replica does
about its leases in one heartbeat."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from comfywatch.leases import Lease, assign, lease_problem, plan, valid_until

SERVERS = [f"gpu-{i}" for i in range(12)]


def test_assign_is_the_same_for_every_replica_and_spreads_servers() -> None:
    replicas = ["a", "b", "c"]
    one = assign(SERVERS, replicas)
    assert one == assign(list(reversed(SERVERS)), list(reversed(replicas)))
    assert set(one) == set(SERVERS)
    counts = {r: sum(1 for owner in one.values() if owner == r) for r in replicas}
    assert all(count >= 1 for count in counts.values()), counts


def test_a_replica_that_leaves_moves_only_its_own_servers() -> None:
    before = assign(SERVERS, ["a", "b", "c"])
    after = assign(SERVERS, ["a", "b"])
    for server, owner in before.items():
        if owner != "c":
            assert after[server] == owner
        else:
            assert after[server] in {"a", "b"}


def test_a_replica_that_joins_takes_servers_only_from_the_others() -> None:
    before = assign(SERVERS, ["a", "b"])
    after = assign(SERVERS, ["a", "b", "c"])
    moved = {s for s in SERVERS if before[s] != after[s]}
    assert moved and all(after[s] == "c" for s in moved)


def test_no_replicas_no_assignment() -> None:
    assert assign(SERVERS, []) == {}


def _lease(server: str, owner: str | None, *, expired: bool = False, epoch: int = 1) -> Lease:
    return Lease(server=server, owner=owner, epoch=epoch, expired=expired)


def _mine(me: str, live: list[str]) -> set[str]:
    return {s for s, owner in assign(SERVERS, live).items() if owner == me}


@pytest.mark.parametrize(
    ("case", "leases", "take", "release", "keep"),
    [
        # nothing leased yet: take every server assigned to me
        ("fresh", lambda mine, other: {}, "mine", set(), set()),
        # free (given back) and expired leases of my servers are taken
        (
            "free or expired",
            lambda mine, other: {
                **{s: _lease(s, None) for s in mine},
                **{s: _lease(s, "c", expired=True) for s in other},
            },
            "mine",
            set(),
            set(),
        ),
        # my servers held by a live other replica: wait until it gives them back
        (
            "held by another",
            lambda mine, other: {s: _lease(s, "b") for s in mine},
            set(),
            set(),
            set(),
        ),
        # held by me: keep what is mine, release what is the other's
        (
            "rebalance",
            lambda mine, other: {s: _lease(s, "a") for s in SERVERS},
            set(),
            "other",
            "mine",
        ),
        # my own expired leases count as free: taken again (a new epoch)
        (
            "my lease expired",
            lambda mine, other: {s: _lease(s, "a", expired=True) for s in SERVERS},
            "mine",
            set(),
            set(),
        ),
    ],
)
def test_plan(
    case: str,
    leases: Callable[[set[str], set[str]], dict[str, Lease]],
    take: str | set[str],
    release: str | set[str],
    keep: str | set[str],
) -> None:
    mine = _mine("a", ["a", "b"])
    other = set(SERVERS) - mine
    named = {"mine": mine, "other": other}

    def expected(value: str | set[str]) -> set[str]:
        return named[value] if isinstance(value, str) else value

    decided = plan("a", SERVERS, ["a", "b"], leases(mine, other))
    assert decided.take == expected(take), case
    assert decided.release == expected(release), case
    assert decided.keep == expected(keep), case


def test_plan_counts_me_live_before_my_registration_shows() -> None:
    decided = plan("a", SERVERS, [], {})
    assert decided.take == set(SERVERS)


def test_a_server_no_longer_configured_is_given_back() -> None:
    decided = plan("a", ["gpu-0"], ["a"], {"old": _lease("old", "a")})
    assert decided.release == {"old"}
    assert decided.take == {"gpu-0"}


def test_a_lease_stops_counting_before_it_expires() -> None:
    assert 100.0 < valid_until(100.0, 15.0) < 115.0


@pytest.mark.parametrize(("lease_s", "poll_s", "ok"), [(15, 1, True), (3, 1, True), (2, 1, False)])
def test_lease_must_outlast_several_polls(lease_s: float, poll_s: float, ok: bool) -> None:
    assert (lease_problem(lease_s, poll_s) is None) is ok
