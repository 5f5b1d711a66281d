"""Whether a server was watched without a gap, and whether it restarted (pure: no I/O, no
clock).

ComfyUI keeps its queue and history in memory. A prompt that leaves the queue without a
history entry was deleted, finished and then cleared from the history, or forgotten by a
restart; which one it was can only be said from what was watched meanwhile:

- A WebSocket that stayed connected proves that the server did not restart: a restart
  drops every socket. A socket that drops or connects again leaves a gap: the server may
  have restarted while it was not connected. Until the socket first connects (or with
  ``websocket = false``), the polls are the only watch.
- A failed poll leaves a gap too (the server may have restarted while it was down).
- A restart forgets the queue and the history: a poll that finds the whole history empty
  (where it held entries before) and none of the prompts of the last queue read in the
  queue shows that the server forgot them. After a gap, or with a new prompt numbered
  below the ones seen before, that is a restart. Between two polls that both succeeded it
  may also be someone clearing the queue and the history: a doubt, not a restart.
- Queue numbers start again at 0 with a new process, but ComfyUI takes a prompt's number
  before validating it and queues it after, and a client may send its own number (a float):
  a new prompt with a small number proves nothing alone. A new prompt carrying the same
  server-given number as a different prompt of the last queue read does: one process never
  hands a number out twice.

Each server keeps a :class:`RestartEvidence`; :func:`poll_failed`, :func:`socket_changed`
and :func:`infer_restart` fold what happened into it. Its :class:`Mark` counts the gaps,
doubts and restarts so far: a job keeps the mark of the poll that last saw it in the queue,
and :func:`vanished` compares it with the marks when it was first missed and now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from comfywatch.history import QueueSnapshot
from comfywatch.states import Reason


class RestartSign(StrEnum):
    """What a poll showed that bears on a restart (the values are logged as ``evidence``)."""

    #: Polls failed since the last queue read: the server may have restarted meanwhile.
    OUTAGE = "outage"
    #: The WebSocket dropped or connected since the last queue read.
    SOCKET = "socket_dropped"
    #: The whole history is empty (it held entries before), and the queue holds none of
    #: the prompts of the last queue read.
    FORGOTTEN = "queue_and_history_forgotten"
    #: A new prompt's number shows the numbering started again.
    QUEUE_NUMBER_RESET = "queue_number_reset"


@dataclass(frozen=True, slots=True)
class Mark:
    """A point in the watch of one server: what happened so far, as counters."""

    #: WebSocket drops and connections (but the first connection: the polls before it
    #: watched the server as without a socket).
    socket_events: int = 0
    #: Failed polls.
    outages: int = 0
    #: Polls that showed the queue and history forgotten without proof of a restart.
    doubts: int = 0
    #: Restarts inferred.
    restarts: int = 0
    #: Whether the WebSocket was connected.
    socket_up: bool = False
    #: The WebSocket has connected once: from then on only the socket staying connected
    #: shows that the server did not restart (polls alone cannot tell while it is down).
    websocket: bool = False

    def gaps(self) -> tuple[int, int, int, int]:
        """Everything that leaves a restart possible: equal between two marks means that
        every poll between them succeeded and showed no sign of one."""
        return (self.socket_events, self.outages, self.doubts, self.restarts)


def vanished(seen: Mark | None, missed: Mark | None, now: Mark) -> Reason | None:
    """Why a prompt that left the queue without a history entry left unseen, or ``None``
    when the server was watched without a gap (so it was deleted, or its entry cleared).

    ``seen``: the mark of the poll that last showed it in the queue (``None``: no poll of
    this process did); ``missed``: of the first poll that did not; ``now``: of this one.
    """
    if seen is None:
        return Reason.LEFT_UNOBSERVED  # known only from the database
    if seen.socket_up and now.socket_events == seen.socket_events:
        return None  # the socket stayed connected: the server did not restart
    if (missed or now).restarts != seen.restarts:
        return Reason.SERVER_RESTARTED  # a restart came before it was missed
    if seen.websocket or now.gaps() != seen.gaps():
        # The socket was not connected throughout; or a gap, or a restart after it was
        # missed.
        return Reason.LEFT_UNOBSERVED
    return None  # websocket = false, and every poll succeeded and showed no restart


@dataclass(frozen=True, slots=True)
class Look:
    """What one successful poll showed."""

    #: The queue, when it was read.
    queue: QueueSnapshot | None = None
    #: History entries seen (a tail's ids, entries found by id).
    history: frozenset[str] = frozenset()
    #: A history tail came back shorter than asked: ``history`` holds the whole history.
    whole_history: bool = False
    #: A history tail was read (its ids replace the history known).
    tail_read: bool = False


@dataclass(frozen=True, slots=True)
class RestartEvidence:
    """What earlier polls of one server showed that bears on a restart."""

    mark: Mark = Mark()
    #: The mark at the last queue read (``None``: none yet).
    queue_mark: Mark | None = None
    #: The ids of the last queue read.
    queued: frozenset[str] = frozenset()
    #: Their server-given numbers.
    numbers: Mapping[str, int] = field(default_factory=dict)
    #: The highest non-negative number seen since the last restart.
    max_number: int | None = None
    #: History entries seen by the last poll that read the history.
    history: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RestartInference:
    """The evidence after one poll; ``why`` lists the signs of a restart or a doubt."""

    evidence: RestartEvidence
    why: tuple[RestartSign, ...] = ()
    #: The signs prove a restart (else, when ``why`` names FORGOTTEN, they only doubt).
    restarted: bool = False


def poll_failed(evidence: RestartEvidence) -> RestartEvidence:
    mark = evidence.mark
    return replace(evidence, mark=replace(mark, outages=mark.outages + 1))


def reconfigured(evidence: RestartEvidence) -> RestartEvidence:
    """A reload changed the server's settings (another URL may be another server): a gap
    in the watch, and nothing the old settings read is compared with what the new ones do."""
    mark = evidence.mark
    return RestartEvidence(mark=replace(mark, outages=mark.outages + 1))


def socket_changed(evidence: RestartEvidence, *, up: bool) -> RestartEvidence:
    """The WebSocket connected (``up``) or dropped."""
    mark = evidence.mark
    if up and not mark.websocket:
        # The first connection: what came before was watched by the polls alone.
        return replace(evidence, mark=replace(mark, socket_up=True, websocket=True))
    events = mark.socket_events + 1
    return replace(evidence, mark=replace(mark, socket_events=events, socket_up=up))


def infer_restart(evidence: RestartEvidence, look: Look) -> RestartInference:
    """Fold one successful poll into the evidence."""
    history = evidence.history
    if look.tail_read:
        history = look.history
    elif look.history:
        history = history | look.history
    queue = look.queue
    if queue is None:
        return RestartInference(replace(evidence, history=history))
    why, restarted = _signs(evidence, look, queue)
    mark = evidence.mark
    max_number = evidence.max_number
    if restarted:
        mark = replace(mark, restarts=mark.restarts + 1)
        max_number = None  # the new process's numbering starts here
        history = look.history  # and what the old one held is gone
    elif why:
        mark = replace(mark, doubts=mark.doubts + 1)
    counted = [number for number in queue.numbers.values() if number >= 0]
    if counted:
        max_number = max([*counted, max_number if max_number is not None else 0])
    return RestartInference(
        RestartEvidence(
            mark=mark,
            queue_mark=mark,
            queued=queue.running | queue.pending,
            numbers=queue.numbers,
            max_number=max_number,
            history=history,
        ),
        why,
        restarted,
    )


def _signs(
    evidence: RestartEvidence, look: Look, queue: QueueSnapshot
) -> tuple[tuple[RestartSign, ...], bool]:
    """The signs this queue read shows, and whether they prove a restart."""
    before = evidence.queue_mark
    if before is None:
        return (), False  # the first look: nothing to compare
    numbered_again = _number_reused(queue.numbers, evidence.numbers)
    forgotten = _forgotten(evidence, look, queue)
    if not (numbered_again or forgotten):
        return (), False
    why: list[RestartSign] = []
    now = evidence.mark
    if now.outages != before.outages:
        why.append(RestartSign.OUTAGE)
    if now.socket_events != before.socket_events:
        why.append(RestartSign.SOCKET)
    if forgotten:
        why.append(RestartSign.FORGOTTEN)
    lower = forgotten and _numbered_below(queue.numbers, evidence.queued, evidence.max_number)
    if numbered_again or lower:
        why.append(RestartSign.QUEUE_NUMBER_RESET)
    gap = now.outages != before.outages or now.socket_events != before.socket_events
    return tuple(why), numbered_again or (forgotten and (gap or lower))


def _forgotten(evidence: RestartEvidence, look: Look, queue: QueueSnapshot) -> bool:
    """True if the whole history was read and is empty where it held entries before, and
    the queue holds none of the prompts of the last queue read.

    Only an empty history counts: entries this daemon never read (finished between two
    reads) may have been there all along, so unknown entries prove nothing.
    """
    if not (look.whole_history and evidence.history) or look.history:
        return False
    return not (evidence.queued & (queue.running | queue.pending))


def _number_reused(numbers: Mapping[str, int], before: Mapping[str, int]) -> bool:
    """True if a new prompt carries the number a different prompt had in the last read
    (front-of-queue prompts carry the counter negated)."""
    new = [abs(number) for prompt_id, number in numbers.items() if prompt_id not in before]
    if not (new and before):
        return False
    held = {abs(number) for number in before.values()}  # by other prompts than the new
    return any(number in held for number in new)


def _numbered_below(
    numbers: Mapping[str, int], known: frozenset[str], max_number: int | None
) -> bool:
    """True if a new prompt carries a number below the highest seen."""
    if max_number is None:
        return False
    return any(
        0 <= number < max_number for prompt_id, number in numbers.items() if prompt_id not in known
    )
