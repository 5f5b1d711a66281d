"""The two clocks the daemon reads, passed in so that tests can move them.

- ``wall()``: epoch seconds. Every stored timestamp, and every decision made on stored
  timestamps (``queue_timeout_s``, ``run_timeout_s``, ``not_found_after_s``, a hook
  delivery's stored ``next_attempt_at``, retention), is on this clock.
- ``mono()``: seconds that only go forward. Everything scheduled in memory is on this
  clock: a server's backoff, the next probe or queue read, the loop's sleeps, the gauges'
  and pruning's intervals, detection lag, and the hook retries a dispatcher scheduled
  itself (also due once their delay has passed here). A step of the wall clock (NTP, a
  suspended VM, an operator) then delays none of them within the process's lifetime.

Only times of one clock are ever subtracted from each other.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A wall clock and a monotonic clock."""

    def wall(self) -> float:
        """Epoch seconds (what is stored and shown)."""
        ...

    def mono(self) -> float:
        """Monotonic seconds (what schedules)."""
        ...


class SystemClock:
    """The host's clocks: ``time.time()`` and ``time.monotonic()``."""

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
