"""The baseline: a naive per-prompt poller, as a script watching ComfyUI would write it.

Every ``interval_s`` it asks ``GET /history/{id}`` for each prompt it has not seen finish
(``concurrency`` requests at once, one keep-alive session per server, ``User-Agent:
naive-poller``). A cycle that takes longer than the interval is followed at once by the next.
It records when it saw each prompt finish (wall clock, ms) and ComfyUI's finish timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from .procs import NAIVE_AGENT, finished_ms


@dataclass
class NaivePoller:
    """Polls ``prompts`` (server url -> prompt ids) until stopped or all finished."""

    prompts: Mapping[str, Sequence[str]]
    interval_s: float = 1.0
    concurrency: int = 8
    detected: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    cycles: int = 0

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.prompts.values())

    async def run(self, stop: asyncio.Event) -> None:
        sessions = {
            url: aiohttp.ClientSession(
                headers={"User-Agent": NAIVE_AGENT},
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=30),
            )
            for url in self.prompts
        }
        try:
            while not stop.is_set() and len(self.detected) < self.total:
                started = time.monotonic()
                await asyncio.gather(
                    *(self._cycle(sessions[url], url, ids) for url, ids in self.prompts.items())
                )
                self.cycles += 1
                pause = self.interval_s - (time.monotonic() - started)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        finally:
            for session in sessions.values():
                await session.close()

    async def _cycle(self, session: aiohttp.ClientSession, url: str, ids: Sequence[str]) -> None:
        waiting = iter([i for i in ids if i not in self.detected])

        async def worker() -> None:
            for prompt_id in waiting:
                await self._poll(session, url, prompt_id)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def _poll(self, session: aiohttp.ClientSession, url: str, prompt_id: str) -> None:
        try:
            async with session.get(f"{url}/history/{prompt_id}") as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        if entry:
            self.detected[prompt_id] = (time.time() * 1000, finished_ms(entry))
