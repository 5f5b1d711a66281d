"""Whether a server may have restarted, from what its polls show (pure: no I/O, no clock).

ComfyUI keeps its queue and history in memory, so a restart forgets both: a job that
vanishes after one is lost to the restart rather than cancelled or cleared.
``infer_restart(evidence, queue, now_s)`` folds one poll into a server's evidence and says
whether (and why) a restart is now suspected; the poller keeps the evidence between polls
and hands ``evidence.suspected_at_s`` to :func:`comfywatch.tracking.decide`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from comfywatch.history import QueueSnapshot


class RestartSign(StrEnum):
    """Why a restart is suspected (the value is logged as ``evidence``)."""

    #: Polls failed, then one succeeded: the server may have restarted in between.
    OUTAGE = "outage"
    #: A prompt new to us carries a queue number below one seen before.
    QUEUE_NUMBER_RESET = "queue_number_reset"


@dataclass(frozen=True, slots=True)
class RestartEvidence:
    """What earlier polls of one server showed that bears on a restart."""

    #: A poll failed since the last one that succeeded.
    outage: bool = False
    #: The last time a restart was suspected (epoch seconds; ``None``: never).
    suspected_at_s: float | None = None
    #: The highest non-negative queue number seen since the last suspected numbering reset.
    max_number: int | None = None
    #: The ids of the prompts (with a queue number) in the last queue seen.
    known_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RestartInference:
    """The evidence after one poll, and why that poll suggests a restart (empty: it does
    not)."""

    evidence: RestartEvidence
    why: tuple[RestartSign, ...] = ()


def infer_restart(
    evidence: RestartEvidence, queue: QueueSnapshot | None, now_s: float
) -> RestartInference:
    """Fold one poll into the evidence; ``queue`` is ``None`` when the poll failed."""
    if queue is None:
        return RestartInference(replace(evidence, outage=True))
    return _with_queue(evidence, queue, now_s)


def answered(evidence: RestartEvidence, now_s: float) -> RestartInference:
    """Fold in a poll that succeeded without reading the queue: only an outage's end."""
    if not evidence.outage:
        return RestartInference(evidence)
    return RestartInference(
        replace(evidence, outage=False, suspected_at_s=now_s), (RestartSign.OUTAGE,)
    )


def _with_queue(evidence: RestartEvidence, queue: QueueSnapshot, now_s: float) -> RestartInference:
    why: list[RestartSign] = []
    if evidence.outage:
        why.append(RestartSign.OUTAGE)
    max_number = evidence.max_number
    if _numbering_restarted(queue.numbers, evidence.known_ids, max_number):
        why.append(RestartSign.QUEUE_NUMBER_RESET)
        max_number = None  # the new process's numbering starts here
    counted = [number for number in queue.numbers.values() if number >= 0]
    if counted:
        max_number = max([*counted, max_number or 0])
    return RestartInference(
        RestartEvidence(
            outage=False,
            suspected_at_s=now_s if why else evidence.suspected_at_s,
            max_number=max_number,
            known_ids=frozenset(queue.numbers),
        ),
        tuple(why),
    )


def _numbering_restarted(
    numbers: Mapping[str, int], known_ids: frozenset[str], max_number: int | None
) -> bool:
    """True if a prompt new to us carries a queue number below one seen before.

    ComfyUI gives each accepted prompt the next number of a counter that starts at 0 with
    the process; "queue front" prompts get negative ones. Deleting prompts lowers the
    maximum without any new prompt, so only a new id with a small number is evidence.
    """
    if max_number is None:
        return False
    return any(
        0 <= number < max_number
        for prompt_id, number in numbers.items()
        if prompt_id not in known_ids
    )
