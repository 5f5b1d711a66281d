"""What to fetch from one server, from what changed (pure: no I/O, ``now_s`` passed in:
monotonic seconds, since all of this is scheduling).

A :class:`ServerWatch` takes the events of one server (socket up or down, a queue count
from the socket or from ``GET /prompt``, a history tail, a queue snapshot, a failure, new
registrations, deadlines) and answers with a :class:`Plan`: probe the count, read the
history tail (how many entries), read the queue. ComfyUI broadcasts ``queue_remaining``
(pending + running) on every put (+1), start (unchanged), finish and delete (-1 each,
a finish after its history entry is written), so a drop says "read the tail", and only a
drop the tail does not explain (a delete) or a put while a tracked job is still unseen
says "read the queue". See README "How it decides".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Entries asked for beyond the drops counted: one already seen, to show the tail reaches
#: back to the last one (a longer tail is asked when it does not, e.g. without the socket,
#: where a put can mask a finish).
TAIL_MARGIN = 1
#: Tail growth: each fetch without overlap asks for this many times more, up to the cap.
TAIL_GROWTH = 4
TAIL_CAP = 1_024
#: How many of the newest history ids are kept as the overlap anchor.
ANCHOR_SIZE = 64
#: With the socket up, the count is still probed this often to find a silent socket.
STALL_PROBE_S = 5.0
#: Probes in a row whose count differs from the socket's (no frame between): stalled.
STALL_MISMATCHES = 2
#: The shortest gap between two queue reads caused by new registrations.
REGISTRATION_GAP_S = 1.0


@dataclass(frozen=True, slots=True)
class Plan:
    """The requests due now; ``queue_reason`` says why the queue is read (logs, tests)."""

    probe: bool = False
    tail: int | None = None
    queue: bool = False
    queue_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Tracked:
    """What the poller tracks on the server, as far as the plan cares."""

    #: Jobs registered but never seen in queue or history.
    unseen: bool = False
    #: Jobs believed waiting or running.
    in_queue: bool = False


@dataclass(frozen=True, slots=True)
class TailVerdict:
    """What one tail fetch showed: the entries new since the anchor, or "ask again"."""

    new_ids: tuple[str, ...]
    #: ``None``: the tail is complete; else the ``max_items`` to fetch again with.
    grow_to: int | None = None


@dataclass
class ServerWatch:
    """One server's watch state; the poller feeds it events and asks :meth:`plan`."""

    poll_interval_s: float
    queue_refresh_s: float
    socket_up: bool = False
    #: The last queue count known (socket, probe or queue snapshot); ``None``: unknown.
    count: int | None = None
    #: The socket sent a frame since the last probe.
    frame_since_probe: bool = False
    mismatches: int = 0
    #: A stalled socket the caller should close (cleared by :meth:`socket_disconnected`).
    stalled: bool = False
    next_probe_at_s: float = 0.0
    #: Finishes and deletes (count decreases) since the last tail fetch.
    drops: int = 0
    #: Starts (frames with an unchanged count) since the last queue snapshot.
    starts: int = 0
    #: The count rose since the last queue snapshot.
    puts: bool = False
    #: The newest history ids seen, oldest first (``anchor_known``: a tail was read).
    anchor: deque[str] = field(default_factory=deque)
    anchor_known: bool = False
    queue_read_at_s: float | None = None
    need_tail: bool = True
    need_queue: str | None = "start"
    #: Registrations wait for a queue read no sooner than this.
    registered_at_s: float | None = None
    #: The socket was up once and dropped: the next connection resyncs.
    socket_dropped: bool = False
    #: The queue cannot be read (too large): never-seen jobs wait.
    queue_unreadable: bool = False
    #: When the first sign of a finish not yet taken by a poll arrived (a drop in a socket
    #: ``status`` frame, a drop or rise in a probe's answer): what detection lag is
    #: measured from.
    changed_at_s: float | None = None
    _anchor_set: set[str] = field(default_factory=set)

    # -- events -------------------------------------------------------------------------

    def socket_connected(self, now_s: float) -> None:
        self.socket_up = True
        self.stalled = False
        self.mismatches = 0
        self.frame_since_probe = True
        self.next_probe_at_s = now_s + STALL_PROBE_S
        if self.socket_dropped:
            self.resync()  # a restart drops every socket: look again at everything

    def socket_disconnected(self, now_s: float) -> None:
        if self.socket_up:
            self.socket_dropped = True
        self.socket_up = False
        self.stalled = False
        self.next_probe_at_s = now_s  # poll at the interval from now on

    def socket_count(self, remaining: int, now_s: float | None = None) -> None:
        """A ``status`` frame, arrived at ``now_s`` (``None``: unknown)."""
        self.frame_since_probe = True
        self._count_seen(remaining, from_socket=True, now_s=now_s)

    def probed(self, remaining: int, now_s: float) -> None:
        """A ``GET /prompt`` answer, arrived at ``now_s``."""
        if self.socket_up:
            self.next_probe_at_s = now_s + STALL_PROBE_S
            if remaining != self.count:
                # A frame since the last probe restarts the tally (it may have raced).
                self.mismatches = 1 if self.frame_since_probe else self.mismatches + 1
                if self.mismatches >= STALL_MISMATCHES:
                    self.stalled = True
                    self.socket_dropped = True
                    self.socket_up = False  # poll as without a socket until it reconnects
            else:
                self.mismatches = 0
            self.frame_since_probe = False
            if self.socket_up:
                return  # the socket's frames carry the changes
        else:
            self.next_probe_at_s = now_s + self.poll_interval_s
        self._count_seen(remaining, from_socket=False, now_s=now_s)

    def _count_seen(self, remaining: int, *, from_socket: bool, now_s: float | None) -> None:
        previous, self.count = self.count, remaining
        if previous is None:
            return
        if self.changed_at_s is None and (
            remaining < previous or (remaining > previous and not from_socket)
        ):
            self.changed_at_s = now_s  # a finish, or one a put may hide (see below)
        if remaining < previous:
            self.drops += previous - remaining
            self.need_tail = True
        elif remaining > previous:
            self.puts = True
            if not from_socket:
                self.need_tail = True  # a finish may hide behind a put: the tail tells
        elif from_socket:
            self.starts += 1

    def tail_read(
        self, ids: Sequence[str], asked: int, tracked: Tracked, *, drops_asked: int
    ) -> TailVerdict:
        """A history tail (``ids`` oldest first) asked with ``max_items=asked`` when
        ``drops_asked`` drops were counted (frames may have brought more since)."""
        newest_known = -1
        if self.anchor_known:
            for position in range(len(ids) - 1, -1, -1):
                if ids[position] in self._anchor_set:
                    newest_known = position
                    break
            if newest_known < 0 and len(ids) >= asked and asked < TAIL_CAP:
                return TailVerdict((), grow_to=min(TAIL_CAP, asked * TAIL_GROWTH))
        new_ids = tuple(ids[newest_known + 1 :])
        for prompt_id in new_ids:
            self._remember(prompt_id)
        overflow = self.anchor_known and newest_known < 0 and len(ids) >= asked
        if (len(new_ids) < drops_asked or overflow) and tracked.in_queue:
            self.want_queue("unexplained drop")
        self.anchor_known = True
        self.drops = max(0, self.drops - drops_asked)
        self.need_tail = self.drops > 0
        return TailVerdict(new_ids)

    def _remember(self, prompt_id: str) -> None:
        if prompt_id in self._anchor_set:
            return
        self.anchor.append(prompt_id)
        self._anchor_set.add(prompt_id)
        if len(self.anchor) > ANCHOR_SIZE:
            self._anchor_set.discard(self.anchor.popleft())

    def queue_read(self, remaining: int | None, now_s: float) -> None:
        """A queue snapshot (``remaining``: its size; ``None``: it could not be read
        because it is too large)."""
        self.queue_read_at_s = now_s
        self.queue_unreadable = remaining is None
        # With the socket up its frames carry the count, but after a resync none may come
        # before the next finish: without the snapshot's size, that drop would go unseen.
        if remaining is not None and (self.socket_up is False or self.count is None):
            self.count = remaining
        self.starts = 0
        self.puts = False
        self.registered_at_s = None
        self.need_queue = None

    def failed(self) -> None:
        """A poll failed: once the server answers again, look at everything again."""
        self.resync()

    def resync(self) -> None:
        self.need_queue = "resync"
        self.need_tail = True
        self.count = None

    def forget_history(self) -> None:
        """No job was tracked here for a while: the anchor is stale, start afresh."""
        self.resync()
        self.anchor.clear()
        self._anchor_set.clear()
        self.anchor_known = False
        self.drops = 0
        self.changed_at_s = None

    def take_change(self) -> float | None:
        """When the first change not yet looked into arrived, or ``None``; a poll takes it
        (later changes wait for the next poll)."""
        changed_at_s, self.changed_at_s = self.changed_at_s, None
        return changed_at_s

    def registered(self, now_s: float) -> None:
        if self.registered_at_s is None:
            self.registered_at_s = now_s

    def want_queue(self, reason: str) -> None:
        if self.need_queue is None:
            self.need_queue = reason

    # -- the answer ---------------------------------------------------------------------

    def plan(self, now_s: float, tracked: Tracked, *, interval: bool) -> Plan:
        """The requests due now. ``interval``: the poll interval has passed (a full tick)."""
        probe = (not self.socket_up and interval) or (
            self.socket_up and now_s >= self.next_probe_at_s
        )
        tail = self.drops + TAIL_MARGIN if self.need_tail else None
        reason = self._queue_reason(now_s, tracked)
        return Plan(probe=probe, tail=tail, queue=reason is not None, queue_reason=reason)

    def _queue_reason(self, now_s: float, tracked: Tracked) -> str | None:
        if self.need_queue is not None:
            return self.need_queue
        if not (tracked.unseen or tracked.in_queue):
            return None
        last = self.queue_read_at_s
        if self.registered_at_s is not None and (
            last is None or now_s - last >= REGISTRATION_GAP_S
        ):
            return "registered"
        gap_over = last is None or now_s - last >= REGISTRATION_GAP_S
        if tracked.unseen and self.puts and gap_over and not self.queue_unreadable:
            return "new prompts"
        refresh_due = last is None or now_s - last >= self.queue_refresh_s
        if refresh_due and tracked.in_queue and (self.starts or not self.socket_up):
            return "refresh"
        return None
