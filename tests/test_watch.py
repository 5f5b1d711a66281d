"""The per-server watch state: which requests each sequence of events makes due (pure)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from comfywatch.watch import (
    REGISTRATION_GAP_S,
    STALL_PROBE_S,
    TAIL_CAP,
    TAIL_GROWTH,
    TAIL_MARGIN,
    Plan,
    ServerWatch,
    Tracked,
)

WAITING = Tracked(in_queue=True)
UNSEEN = Tracked(unseen=True)
IDLE = Tracked()


def settled(
    *, socket: bool, count: int = 5, history: tuple[str, ...] = ("h1", "h2")
) -> ServerWatch:
    """A watch past its start: queue and tail read, count known."""
    watch = ServerWatch(poll_interval_s=1.0, queue_refresh_s=300.0)
    if socket:
        watch.socket_connected(0.0)
        watch.socket_count(count)  # the greeting
    watch.tail_read(history, TAIL_MARGIN, WAITING, drops_asked=0)
    watch.queue_read(count, 0.0)
    return watch


Step = Callable[[ServerWatch], object]

# (name, socket up?, events, tracked, interval tick?, the plan at t=1 s)
TABLE: list[tuple[str, bool, list[Step], Tracked, bool, Plan]] = [
    ("socket, quiet", True, [], WAITING, True, Plan()),
    ("socket, a start", True, [lambda w: w.socket_count(5)], WAITING, True, Plan()),
    (
        "socket, a finish",
        True,
        [lambda w: w.socket_count(4)],
        WAITING,
        False,
        Plan(tail=1 + TAIL_MARGIN),
    ),
    (
        "socket, three drops",
        True,
        [lambda w: w.socket_count(4), lambda w: w.socket_count(2)],
        WAITING,
        False,
        Plan(tail=3 + TAIL_MARGIN),
    ),
    ("socket, a put, all seen", True, [lambda w: w.socket_count(6)], WAITING, True, Plan()),
    (
        "socket, a put, one unseen",
        True,
        [lambda w: w.socket_count(6)],
        UNSEEN,
        True,
        Plan(queue=True, queue_reason="new prompts"),
    ),
    ("no socket, interval", False, [], WAITING, True, Plan(probe=True)),
    ("no socket, hint only", False, [], WAITING, False, Plan()),
    (
        "no socket, count fell",
        False,
        [lambda w: w.probed(3, 0.5)],
        WAITING,
        False,
        Plan(tail=2 + TAIL_MARGIN),
    ),
    (
        "no socket, count rose",
        False,
        [lambda w: w.probed(6, 0.5)],
        WAITING,
        False,
        Plan(tail=TAIL_MARGIN),
    ),
    (
        "new registration, gap passed",
        True,
        [lambda w: w.registered(0.5)],
        UNSEEN,
        True,
        Plan(queue=True, queue_reason="registered"),
    ),
    (
        "a failure: resync",
        True,
        [lambda w: w.failed()],
        WAITING,
        False,
        Plan(tail=TAIL_MARGIN, queue=True, queue_reason="resync"),
    ),
    (
        "socket dropped",
        True,
        [lambda w: w.socket_disconnected(0.5)],
        WAITING,
        True,
        Plan(probe=True),
    ),
    (
        "socket back after a drop: resync",
        True,
        [lambda w: w.socket_disconnected(0.2), lambda w: w.socket_connected(0.5)],
        WAITING,
        False,
        Plan(tail=TAIL_MARGIN, queue=True, queue_reason="resync"),
    ),
    ("nothing tracked waits: no refresh", False, [], IDLE, False, Plan()),
]


@pytest.mark.parametrize(
    ("socket", "events", "tracked", "interval", "plan"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_plan_table(
    socket: bool, events: list[Step], tracked: Tracked, interval: bool, plan: Plan
) -> None:
    watch = settled(socket=socket)
    for event in events:
        event(watch)
    assert watch.plan(1.0, tracked, interval=interval) == plan


def test_a_fresh_watch_reads_queue_and_tail() -> None:
    watch = ServerWatch(poll_interval_s=1.0, queue_refresh_s=300.0)
    assert watch.plan(0.0, WAITING, interval=True) == Plan(
        probe=True, tail=TAIL_MARGIN, queue=True, queue_reason="start"
    )


def test_registrations_wait_for_the_gap_after_a_queue_read() -> None:
    watch = settled(socket=True)
    watch.registered(0.1)
    assert not watch.plan(REGISTRATION_GAP_S / 2, UNSEEN, interval=True).queue
    assert watch.plan(REGISTRATION_GAP_S, UNSEEN, interval=True).queue_reason == "registered"


def test_queue_refresh_with_the_socket_only_after_starts() -> None:
    watch = settled(socket=True)
    assert not watch.plan(301.0, WAITING, interval=True).queue  # nothing started: nothing to learn
    watch.socket_count(5)  # a start
    assert not watch.plan(299.0, WAITING, interval=True).queue
    assert watch.plan(301.0, WAITING, interval=True).queue_reason == "refresh"


def test_queue_refresh_without_the_socket_every_queue_refresh_s() -> None:
    watch = settled(socket=False)
    assert not watch.plan(299.0, WAITING, interval=True).queue
    assert watch.plan(301.0, WAITING, interval=True).queue_reason == "refresh"


def test_a_tail_that_explains_every_drop_reads_no_queue() -> None:
    watch = settled(socket=True)
    watch.socket_count(3)
    verdict = watch.tail_read(("h1", "h2", "p1", "p2"), 2 + TAIL_MARGIN, WAITING, drops_asked=2)
    assert verdict.new_ids == ("p1", "p2") and verdict.grow_to is None
    assert watch.plan(1.0, WAITING, interval=False) == Plan()


def test_an_unexplained_drop_reads_the_queue() -> None:
    """Two drops, one new entry: a prompt left without one (a delete)."""
    watch = settled(socket=True)
    watch.socket_count(3)
    verdict = watch.tail_read(("h1", "h2", "p1"), 2 + TAIL_MARGIN, WAITING, drops_asked=2)
    assert verdict.new_ids == ("p1",)
    assert watch.plan(1.0, WAITING, interval=False) == Plan(
        queue=True, queue_reason="unexplained drop"
    )


def test_an_unexplained_drop_with_nothing_waiting_reads_no_queue() -> None:
    watch = settled(socket=True)
    watch.socket_count(4)
    watch.tail_read(("h1", "h2"), 1 + TAIL_MARGIN, IDLE, drops_asked=1)
    assert not watch.plan(1.0, IDLE, interval=False).queue


def test_tail_grows_until_it_overlaps_the_anchor() -> None:
    watch = settled(socket=True, history=("old",))
    watch.socket_count(4)
    asked = 1 + TAIL_MARGIN
    first = [f"n{i}" for i in range(asked)]  # all new: no overlap, a full page
    verdict = watch.tail_read(first, asked, WAITING, drops_asked=1)
    assert verdict == type(verdict)((), grow_to=asked * TAIL_GROWTH)
    longer = ["older", "old", *(f"n{i}" for i in range(asked * 2))]
    verdict = watch.tail_read(longer, asked * TAIL_GROWTH, WAITING, drops_asked=1)
    assert verdict.grow_to is None and verdict.new_ids == tuple(f"n{i}" for i in range(asked * 2))
    assert not watch.plan(1.0, WAITING, interval=False).queue  # more finished than dropped


def test_a_short_tail_is_complete_without_overlap() -> None:
    """Fewer entries than asked: that is the whole history (after a restart, say)."""
    watch = settled(socket=True, history=("old",))
    watch.socket_count(4)
    verdict = watch.tail_read(("p1",), 1 + TAIL_MARGIN, WAITING, drops_asked=1)
    assert verdict.grow_to is None and verdict.new_ids == ("p1",)


def test_tail_growth_stops_at_the_cap_and_reads_the_queue() -> None:
    watch = settled(socket=True, history=("old",))
    watch.socket_count(4)
    page = [f"n{i}" for i in range(TAIL_CAP)]
    verdict = watch.tail_read(page, TAIL_CAP, WAITING, drops_asked=1)
    assert verdict.grow_to is None
    assert watch.plan(1.0, WAITING, interval=False).queue_reason == "unexplained drop"


def test_drops_that_arrive_during_a_tail_fetch_are_kept() -> None:
    watch = settled(socket=True)
    watch.socket_count(4)
    asked_with = watch.drops
    watch.socket_count(3)  # while the request was in flight
    watch.tail_read(("h1", "h2", "p1"), 1 + TAIL_MARGIN, WAITING, drops_asked=asked_with)
    assert watch.plan(1.0, WAITING, interval=False).tail == 1 + TAIL_MARGIN


def test_a_silent_socket_is_found_stalled_and_falls_back_to_polling() -> None:
    """Open but silent: two probes in a row disagree with its last count, no frame in
    between. The watch then probes at each poll interval, as without a socket."""
    watch = settled(socket=True, count=5)
    assert watch.plan(STALL_PROBE_S - 0.1, WAITING, interval=True) == Plan()
    assert watch.plan(STALL_PROBE_S, WAITING, interval=True).probe
    watch.probed(3, STALL_PROBE_S)
    assert not watch.stalled and watch.socket_up
    assert not watch.plan(STALL_PROBE_S + 1, WAITING, interval=True).probe
    watch.probed(3, 2 * STALL_PROBE_S)
    assert watch.stalled and not watch.socket_up
    plan = watch.plan(2 * STALL_PROBE_S, WAITING, interval=False)
    assert plan.tail == 2 + TAIL_MARGIN  # the drops it missed
    assert watch.plan(2 * STALL_PROBE_S + 1, WAITING, interval=True).probe  # each interval
    watch.socket_disconnected(2 * STALL_PROBE_S)  # closed by the caller
    watch.socket_connected(2 * STALL_PROBE_S + 1)
    assert watch.plan(2 * STALL_PROBE_S + 1, WAITING, interval=False).queue_reason == "resync"


def test_a_frame_between_probes_is_no_stall() -> None:
    watch = settled(socket=True, count=5)
    watch.probed(4, STALL_PROBE_S)  # raced a frame
    watch.socket_count(4)
    watch.probed(3, 2 * STALL_PROBE_S)
    assert not watch.stalled


def test_a_finish_after_a_resync_with_the_socket_up_reads_the_tail() -> None:
    """Jobs registered on a server whose socket is up (a prompt already running): the
    watch starts afresh, reads the queue and the tail, and the next frame (the finish)
    is a drop. Taken as the first count known, it left the job running for good."""
    watch = settled(socket=True, count=1)
    watch.forget_history()
    watch.tail_read(("h1", "h2"), TAIL_MARGIN, WAITING, drops_asked=0)
    watch.queue_read(1, 1.0)
    assert watch.plan(1.0, WAITING, interval=False) == Plan()
    watch.socket_count(0)
    assert watch.plan(1.0, WAITING, interval=False) == Plan(tail=1 + TAIL_MARGIN)
