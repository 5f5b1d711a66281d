"""Restart evidence as tables: (evidence so far, what a poll showed) -> (signs, restart or
doubt, evidence after it); and (marks of a job's sighting, first absence, now) -> the
reason it left unseen."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection
from dataclasses import replace

import pytest

from comfywatch.history import QueueSnapshot, parse_queue
from comfywatch.restarts import (
    Look,
    Mark,
    RestartEvidence,
    RestartSign,
    infer_restart,
    poll_failed,
    reconfigured,
    socket_changed,
    vanished,
)
from comfywatch.states import Reason

E = RestartEvidence
OUTAGE = RestartSign.OUTAGE
SOCKET = RestartSign.SOCKET
FORGOTTEN = RestartSign.FORGOTTEN
RESET = RestartSign.QUEUE_NUMBER_RESET
M0 = Mark()
#: Evidence after one queue read of a, b (numbers 5, 7), with h in the history.
KNOWN = E(
    mark=M0,
    queue_mark=M0,
    queued=frozenset({"a", "b"}),
    numbers={"a": 5, "b": 7},
    max_number=7,
    history=frozenset({"h"}),
)
AFTER_OUTAGE = poll_failed(KNOWN)
AFTER_DROP = socket_changed(KNOWN, up=False)


def queue(numbers: dict[str, int], running: Collection[str] = ()) -> QueueSnapshot:
    ids = frozenset(numbers)
    return QueueSnapshot(
        running=frozenset(running), pending=ids - frozenset(running), numbers=numbers
    )


def look(
    numbers: dict[str, int] | None,
    history: Collection[str] = (),
    *,
    whole: bool = False,
    tail: bool = True,
) -> Look:
    """A poll that read the queue (``numbers``; ``None``: it did not) and a history tail
    (``tail``) holding ``history``, the whole of it if ``whole``."""
    return Look(
        queue=None if numbers is None else queue(numbers),
        history=frozenset(history),
        whole_history=whole,
        tail_read=tail,
    )


# (case, evidence before, what the poll showed, signs, restart proven)
CASES: list[tuple[str, E, Look, tuple[RestartSign, ...], bool]] = [
    ("first look: nothing to compare", E(), look({"a": 0}, whole=True), (), False),
    ("new prompts count up", KNOWN, look({"a": 5, "b": 7, "new": 8}, ["h"]), (), False),
    (
        "a number taken before validation arrives late: no evidence",
        KNOWN,
        look({"a": 5, "b": 7, "late": 6}, ["h"], whole=True),
        (),
        False,
    ),
    (
        "a late number after the others finished: their entries are there",
        KNOWN,
        look({"late": 6}, ["h", "a", "b"], whole=True),
        (),
        False,
    ),
    (
        "a late number after the others were deleted: the history is still there",
        AFTER_OUTAGE,
        look({"late": 6}, ["h"], whole=True),
        (),
        False,
    ),
    (
        "the highest one was deleted: no new prompt, no evidence",
        KNOWN,
        look({"a": 5}, ["h"]),
        (),
        False,
    ),
    (
        "'queue front' prompts get negative numbers",
        KNOWN,
        look({"a": 5, "b": 7, "front": -9}),
        (),
        False,
    ),
    (
        "a new prompt numbered as another of the last read: a new process",
        KNOWN,
        look({"new": 5}),
        (RESET,),
        True,
    ),
    (
        "a front prompt carries the counter negated",
        KNOWN,
        look({"a": 5, "new": -7}),
        (RESET,),
        True,
    ),
    (
        "back after an outage, queue and history forgotten",
        AFTER_OUTAGE,
        look({}, [], whole=True),
        (OUTAGE, FORGOTTEN),
        True,
    ),
    (
        "the socket dropped, queue and history forgotten",
        AFTER_DROP,
        look({}, [], whole=True),
        (SOCKET, FORGOTTEN),
        True,
    ),
    (
        "new prompts finished since: entries never read may have been there all along",
        AFTER_DROP,
        look({"n2": 1}, ["n1"], whole=True),
        (),
        False,
    ),
    (
        "after a drop, an empty history and new prompts numbered from 0",
        AFTER_DROP,
        look({"n2": 1}, [], whole=True),
        (SOCKET, FORGOTTEN, RESET),
        True,
    ),
    (
        "forgotten between two polls: cleared by hand, or a restart: a doubt",
        KNOWN,
        look({}, [], whole=True),
        (FORGOTTEN,),
        False,
    ),
    (
        "forgotten, and a new prompt numbered below the highest: numbering starts again",
        KNOWN,
        look({"new": 0}, [], whole=True),
        (FORGOTTEN, RESET),
        True,
    ),
    (
        "after an outage, a known prompt still waits: same process",
        AFTER_OUTAGE,
        look({"b": 7}, [], whole=True),
        (),
        False,
    ),
    (
        "after an outage, a known entry is still in the history: same process",
        AFTER_OUTAGE,
        look({}, ["h"], whole=True),
        (),
        False,
    ),
    (
        "after an outage, an entry never read before: no evidence",
        AFTER_OUTAGE,
        look({}, ["x"], whole=True),
        (),
        False,
    ),
    (
        "after an outage, a prompt of the last read finished: same process",
        AFTER_OUTAGE,
        look({}, ["a"], whole=True),
        (),
        False,
    ),
    (
        "after an outage, only part of the history read: no evidence",
        AFTER_OUTAGE,
        look({}, ["x"], whole=False),
        (),
        False,
    ),
    (
        "after an outage, no history seen before: nothing was forgotten",
        poll_failed(E(mark=M0, queue_mark=M0, queued=frozenset({"a"}), numbers={"a": 3})),
        look({}, [], whole=True),
        (),
        False,
    ),
    (
        "after an outage, the queue not read: nothing to compare yet",
        AFTER_OUTAGE,
        look(None, [], whole=True),
        (),
        False,
    ),
]


@pytest.mark.parametrize(
    ("before", "seen", "why", "restarted"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_restart_inference_table(
    before: E, seen: Look, why: tuple[RestartSign, ...], restarted: bool
) -> None:
    inference = infer_restart(before, seen)
    assert inference.why == why
    assert inference.restarted is restarted
    mark = inference.evidence.mark
    assert mark.restarts == before.mark.restarts + (1 if restarted else 0)
    assert mark.doubts == before.mark.doubts + (1 if why and not restarted else 0)


def test_a_queue_read_becomes_what_the_next_one_is_compared_with() -> None:
    after = infer_restart(KNOWN, look({"b": 7, "c": 9}, ["h", "a"])).evidence
    assert after.queued == {"b", "c"}
    assert after.numbers == {"b": 7, "c": 9}
    assert after.max_number == 9
    assert after.history == {"h", "a"}  # the tail's ids replace those known
    assert after.queue_mark == after.mark


def test_entries_found_by_id_add_to_the_history_known() -> None:
    after = infer_restart(KNOWN, look(None, ["a"], tail=False)).evidence
    assert after.history == {"h", "a"}
    assert after.queue_mark == KNOWN.queue_mark  # no queue read: nothing else changes


def test_after_a_restart_the_new_process_numbering_is_the_measure() -> None:
    restart = infer_restart(AFTER_OUTAGE, look({"n": 1}, [], whole=True))
    assert restart.restarted
    assert restart.evidence.max_number == 1
    assert restart.evidence.history == frozenset()
    later = infer_restart(restart.evidence, look({"n": 1, "m": 2}, []))
    assert later.why == ()


def test_failures_and_socket_events_are_counted() -> None:
    """The first connection is no gap (the polls watched until then); each drop and
    each connection after it is."""
    evidence = poll_failed(poll_failed(E()))
    evidence = socket_changed(evidence, up=True)
    assert evidence.mark == Mark(outages=2, socket_up=True, websocket=True)
    evidence = socket_changed(evidence, up=False)
    assert evidence.mark == Mark(socket_events=1, outages=2, websocket=True)
    evidence = socket_changed(evidence, up=True)
    assert evidence.mark == Mark(socket_events=2, outages=2, socket_up=True, websocket=True)


def test_new_settings_are_a_gap_and_forget_what_the_old_ones_read() -> None:
    """After a reload changed the server (perhaps its URL: another ComfyUI), a job seen
    before and missed after is not proven deleted, and the old queue proves nothing."""
    after = reconfigured(KNOWN)
    assert after.mark == replace(KNOWN.mark, outages=KNOWN.mark.outages + 1)
    assert after.queued == frozenset() and after.numbers == {} and after.history == frozenset()
    assert vanished(KNOWN.mark, after.mark, after.mark) is Reason.LEFT_UNOBSERVED


def test_a_number_a_client_sent_is_no_evidence() -> None:
    """ComfyUI queues a client's ``number`` as a float; only its own (ints) are compared."""
    pending = [[5.0, "mine", {}, {}, []], [6, "its", {}, {}, []]]
    body = {"queue_running": [], "queue_pending": pending}
    assert parse_queue(body).numbers == {"its": 6}
    after_reset = infer_restart(KNOWN, Look(queue=parse_queue(body)))
    assert after_reset.why == ()


W = Mark()
UP = Mark(socket_events=1, socket_up=True, websocket=True)
RESTARTED = Mark(restarts=1)


# (case, mark when last seen, mark when first missed, mark now, reason)
VANISHED: list[tuple[str, Mark | None, Mark | None, Mark, Reason | None]] = [
    ("never seen by this process", None, W, W, Reason.LEFT_UNOBSERVED),
    ("every poll succeeded, nothing seen", W, W, W, None),
    ("a poll failed since", W, W, Mark(outages=1), Reason.LEFT_UNOBSERVED),
    ("the socket connected again since", W, W, UP, Reason.LEFT_UNOBSERVED),
    ("the socket connected the first time", W, W, Mark(socket_up=True, websocket=True), None),
    ("a doubt since", W, W, Mark(doubts=1), Reason.LEFT_UNOBSERVED),
    ("a restart before it was missed", W, RESTARTED, RESTARTED, Reason.SERVER_RESTARTED),
    ("a restart after it was missed", W, W, Mark(restarts=1), Reason.LEFT_UNOBSERVED),
    ("a restart before it was seen", Mark(restarts=1), Mark(restarts=1), Mark(restarts=1), None),
    (
        "the socket stayed connected through failed polls and doubts",
        UP,
        UP,
        Mark(socket_events=1, outages=4, doubts=2, restarts=1, socket_up=True, websocket=True),
        None,
    ),
    ("the socket dropped, no restart shown", UP, UP, Mark(socket_events=2), Reason.LEFT_UNOBSERVED),
    (
        "the socket dropped, a restart shown",
        UP,
        Mark(socket_events=2, restarts=1),
        Mark(socket_events=2, restarts=1),
        Reason.SERVER_RESTARTED,
    ),
    (
        "seen while the socket was down after a drop: polls alone do not tell",
        Mark(websocket=True),
        Mark(websocket=True),
        Mark(),
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "seen while the socket was down after a drop, a restart shown",
        Mark(websocket=True),
        RESTARTED,
        RESTARTED,
        Reason.SERVER_RESTARTED,
    ),
    (
        "dropped and back: connected now, but not throughout",
        UP,
        UP,
        Mark(socket_events=3, socket_up=True),
        Reason.LEFT_UNOBSERVED,
    ),
]


@pytest.mark.parametrize(
    ("seen", "missed", "now", "reason"),
    [case[1:] for case in VANISHED],
    ids=[case[0] for case in VANISHED],
)
def test_vanished_table(
    seen: Mark | None, missed: Mark | None, now: Mark, reason: Reason | None
) -> None:
    assert vanished(seen, missed, now) is reason


def test_the_pure_core_imports_no_io() -> None:
    """The decisions stay pure: importing them loads no network, database, logging or
    event loop library (checked in a fresh interpreter)."""
    code = (
        "import sys\n"
        "import comfywatch.history, comfywatch.restarts, comfywatch.tracking\n"
        "io = {'aiohttp', 'sqlalchemy', 'structlog', 'asyncio', 'socket', 'prometheus_client'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in io))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
