"""Restart inference as a table: (evidence so far, what this poll showed, now) -> (evidence
after it, why a restart is suspected)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from comfywatch.history import QueueSnapshot
from comfywatch.restarts import RestartEvidence, RestartSign, infer_restart

E = RestartEvidence
OUTAGE = RestartSign.OUTAGE
RESET = RestartSign.QUEUE_NUMBER_RESET
NOW = 100.0


def queue(numbers: dict[str, int]) -> QueueSnapshot:
    return QueueSnapshot(running=frozenset(), pending=frozenset(numbers), numbers=numbers)


def ids(*names: str) -> frozenset[str]:
    return frozenset(names)


# (case, evidence before, queue numbers this poll showed (None: the poll failed), why,
#  evidence after); every poll happens at NOW.
CASES: list[tuple[str, E, dict[str, int] | None, tuple[RestartSign, ...], E]] = [
    ("first poll: nothing to compare", E(), {"a": 0}, (), E(max_number=0, known_ids=ids("a"))),
    ("first poll, empty queue", E(), {}, (), E()),
    (
        "new prompts count up",
        E(max_number=7, known_ids=ids("a")),
        {"a": 5, "new": 8},
        (),
        E(max_number=8, known_ids=ids("a", "new")),
    ),
    (
        "a fresh process counts from 0 again",
        E(max_number=7, known_ids=ids("a", "b")),
        {"new": 0},
        (RESET,),
        E(suspected_at_s=NOW, max_number=0, known_ids=ids("new")),
    ),
    (
        "the highest one was deleted: no new prompt, no evidence",
        E(max_number=7, known_ids=ids("a", "b")),
        {"a": 5},
        (),
        E(max_number=7, known_ids=ids("a")),
    ),
    (
        "a known prompt with a small number is no evidence",
        E(max_number=7, known_ids=ids("a")),
        {"a": 1},
        (),
        E(max_number=7, known_ids=ids("a")),
    ),
    (
        "'queue front' prompts get negative numbers",
        E(max_number=7, known_ids=ids("a")),
        {"front": -3},
        (),
        E(max_number=7, known_ids=ids("front")),
    ),
    (
        "a new prompt with the same number as the highest seen",
        E(max_number=7, known_ids=ids("a")),
        {"new": 7},
        (),
        E(max_number=7, known_ids=ids("new")),
    ),
    (
        "the poll failed: an outage begins, nothing else is learnt",
        E(suspected_at_s=5, max_number=7, known_ids=ids("a")),
        None,
        (),
        E(outage=True, suspected_at_s=5, max_number=7, known_ids=ids("a")),
    ),
    (
        "still failing",
        E(outage=True, max_number=7),
        None,
        (),
        E(outage=True, max_number=7),
    ),
    (
        "back after an outage: a restart may have happened",
        E(outage=True, max_number=7, known_ids=ids("a")),
        {"a": 5},
        (OUTAGE,),
        E(suspected_at_s=NOW, max_number=7, known_ids=ids("a")),
    ),
    (
        "the first poll failed, the next succeeded",
        E(outage=True),
        {},
        (OUTAGE,),
        E(suspected_at_s=NOW),
    ),
    (
        "back after an outage, numbering reset too",
        E(outage=True, max_number=7, known_ids=ids("a")),
        {"new": 2},
        (OUTAGE, RESET),
        E(suspected_at_s=NOW, max_number=2, known_ids=ids("new")),
    ),
    (
        "an earlier suspicion is kept while nothing new is seen",
        E(suspected_at_s=40, max_number=3, known_ids=ids("a")),
        {"a": 3, "b": 4},
        (),
        E(suspected_at_s=40, max_number=4, known_ids=ids("a", "b")),
    ),
    (
        "a second reset, measured against the new process's numbers",
        E(suspected_at_s=40, max_number=1, known_ids=ids("new")),
        {"new": 1, "next": 0},
        (RESET,),
        E(suspected_at_s=NOW, max_number=1, known_ids=ids("new", "next")),
    ),
]


@pytest.mark.parametrize(
    ("before", "numbers", "why", "after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_restart_inference_table(
    before: E, numbers: dict[str, int] | None, why: tuple[RestartSign, ...], after: E
) -> None:
    inference = infer_restart(before, None if numbers is None else queue(numbers), NOW)
    assert inference.why == why
    assert inference.evidence == after


def test_a_restart_is_remembered_until_the_next_one() -> None:
    """Polls after a suspected restart keep its time: jobs last seen before it that vanish
    later are still lost to it."""
    evidence = E(max_number=9, known_ids=ids("a"))
    evidence = infer_restart(evidence, queue({"b": 0}), 10).evidence
    for now in (11, 12, 13):
        inference = infer_restart(evidence, queue({"b": 0, f"c{now}": now}), now)
        assert inference.why == ()
        evidence = inference.evidence
    assert evidence.suspected_at_s == 10


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
