"""The retry policy, pure: what to record after one delivery attempt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from comfywatch.states import DeliveryState

#: Retry delays are multiplied by a random factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt gave: success, or a failure that may be retried (``final``: not)."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    response: str | None = None
    final: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to record after an attempt: the delivery's new state and next attempt time."""

    state: DeliveryState
    next_attempt_s: float | None = None
    retry_in_s: float | None = None

    @property
    def result(self) -> str:
        """The metrics label: delivered, retry or dead."""
        return "retry" if self.state is DeliveryState.PENDING else self.state.value


def next_attempt(
    result: AttemptResult,
    *,
    attempt: int,
    schedule_s: Sequence[float],
    now_s: float,
    jitter: float = 1.0,
) -> Verdict:
    """The verdict on failed or successful attempt number ``attempt`` (1-based): delivered,
    pending again (retry later) or dead.

    Failed attempt *n* is retried after ``schedule_s[n-1] * jitter``; a final failure, or one
    after the schedule is used up, is dead.
    """
    if result.ok:
        return Verdict(DeliveryState.DELIVERED)
    if result.final or attempt > len(schedule_s):
        return Verdict(DeliveryState.DEAD)
    delay_s = max(0.0, schedule_s[attempt - 1] * jitter)
    return Verdict(DeliveryState.PENDING, next_attempt_s=now_s + delay_s, retry_in_s=delay_s)
