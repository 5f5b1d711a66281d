"""The last ``progress`` of each prompt, and when it is due to be written (pure: no I/O,
times passed in).

ComfyUI sends a ``progress`` message per sampling step, dozens a second at times. The
book keeps only the latest per (server, prompt id) and says which ones to write: each
prompt's at most once per ``min_gap_s``, and its latest one always, once the gap has
passed (or sooner, with the job's terminal change: see :meth:`ProgressBook.latest`).
Prompts that no job tracks (yet) are kept too, the newest ``max_entries`` of them, so a
job registered after its prompt started (``comfywatch submit`` registers through the
spool) gets its progress all the same.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from comfywatch.history import Progress

__all__ = ["MIN_GAP_S", "Noted", "ProgressBook"]

#: The shortest time between two progress writes of one job.
MIN_GAP_S = 1.0
#: How many prompts' progress is kept at most (the least recently updated go first).
MAX_ENTRIES = 4096

#: Whether a job tracks (server, prompt id).
Tracked = Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class Noted:
    """A prompt's latest progress, and when it arrived (epoch seconds)."""

    server: str
    progress: Progress
    at_s: float


@dataclass(slots=True)
class _Entry:
    noted: Noted
    #: When it was last handed out to be written (monotonic seconds), if ever.
    written_m: float | None = None


class ProgressBook:
    """The latest progress per (server, prompt id) and which of it is unwritten."""

    def __init__(self, *, min_gap_s: float = MIN_GAP_S, max_entries: int = MAX_ENTRIES) -> None:
        self.min_gap_s = min_gap_s
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._dirty: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, server: str, progress: Progress, at_s: float) -> None:
        """Keep ``progress`` as the prompt's latest (unwritten)."""
        key = (server, progress.prompt_id)
        noted = Noted(server, progress, at_s)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(noted)
            while len(self._entries) > self._max_entries:
                old, _ = self._entries.popitem(last=False)
                self._dirty.discard(old)
        else:
            entry.noted = noted
            self._entries.move_to_end(key)
        self._dirty.add(key)

    def latest(self, server: str, prompt_id: str) -> Noted | None:
        """The prompt's latest progress, written or not."""
        entry = self._entries.get((server, prompt_id))
        return entry.noted if entry is not None else None

    def forget(self, server: str, prompt_id: str) -> None:
        """The prompt's job is terminal: its progress is final."""
        self._entries.pop((server, prompt_id), None)
        self._dirty.discard((server, prompt_id))

    def due(self, now_m: float, tracked: Tracked) -> list[Noted]:
        """The unwritten progress of tracked prompts whose last write is ``min_gap_s`` old
        (or that were never written), marked written at ``now_m``."""
        due: list[Noted] = []
        for key in list(self._dirty):
            entry = self._entries[key]
            if not tracked(*key) or not self._ready(entry, now_m):
                continue
            entry.written_m = now_m
            self._dirty.discard(key)
            due.append(entry.noted)
        return due

    def next_due_m(self, tracked: Tracked) -> float | None:
        """When the next unwritten progress of a tracked prompt is due (monotonic seconds;
        in the past: now), or ``None`` if none waits."""
        times: list[float] = []
        for key in self._dirty:
            if tracked(*key):
                written_m = self._entries[key].written_m
                times.append(-math.inf if written_m is None else written_m + self.min_gap_s)
        return min(times, default=None)

    def unwritten(self, items: list[Noted]) -> None:
        """Their write failed: due again (unless newer progress replaced them)."""
        for noted in items:
            key = (noted.server, noted.progress.prompt_id)
            if key in self._entries:
                self._dirty.add(key)

    def _ready(self, entry: _Entry, now_m: float) -> bool:
        return entry.written_m is None or now_m - entry.written_m >= self.min_gap_s
