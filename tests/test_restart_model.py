"""Model-based: a restart is never recorded as a deletion, nor a deletion as a restart.

A hypothesis ``RuleBasedStateMachine`` drives a fake ComfyUI (a real HTTP server on a
loopback port) through random interleavings of submit, start, finish (success, error or
interrupted), delete, clear history, restart, outage, and prompts whose number arrives late
(taken before validation) or comes from the client, with the daemon's polls in between:
``Poller.tick()`` on a real ``Store`` (a SQLite file) through the real ``ComfyClient``, and
with ``websocket = true`` the real WebSocket task. The fake's worker is paused and held, so
that nothing changes but what a rule does. The test keeps the truth of each prompt and
checks every terminal state the daemon records against it:

- what was observable is recorded as it happened: a finish with its outcome; a job deleted
  while the socket stayed connected (or, with ``websocket = false``, while every poll
  succeeded and nothing that could pass for a restart happened) is ``cancelled``;
- what was not is never recorded as a confident wrong answer: no ``cancelled`` for a
  restart (but for the instant restart with ``websocket = false``, which nothing shows: see
  README), no ``server_restarted`` for a deletion unless the server, as polled, could not be
  told from a restarted one (the queue and the history forgot everything).

Examples (the ``restart-model`` settings profile): CI runs a fixed set (``derandomize``)
of 25 examples, well under a minute. For a longer, random search set
``COMFYWATCH_HYPOTHESIS_EXAMPLES``, and lift the per-test timeout::

    COMFYWATCH_HYPOTHESIS_EXAMPLES=500 .venv/bin/pytest -p no:cacheprovider --timeout=0 \
        tests/test_restart_model.py

With the variable set, examples are drawn at random; a failure prints the steps that
reproduce it (and the seed, for ``@seed``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from comfywatch.comfy import SocketEvent
from comfywatch.config import load_settings
from comfywatch.poller import Poller
from comfywatch.store import JobFilter, NewJob, Store
from comfywatch.testing import OUTCOMES, FakeComfyUI, Outcome
from comfywatch.watchers import QueueWatchers

from .conftest import write_config

T = TypeVar("T")

_EXAMPLES = os.environ.get("COMFYWATCH_HYPOTHESIS_EXAMPLES")
settings.register_profile(
    "restart-model",
    max_examples=int(_EXAMPLES or 25),
    stateful_step_count=40,
    derandomize=_EXAMPLES is None,  # CI: the same examples every run
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SERVER = "local"
#: Prompts per example at most (each costs a registration and some polls).
MAX_PROMPTS = 10


class Clock:
    """The daemon's clock: one second per tick (deadlines are not under test)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        """Real monotonic time: backoff and probes are scheduled as in the daemon."""
        return time.monotonic()


@dataclass
class Truth:
    """What happened to one prompt."""

    tracked: bool
    #: pending, running, finished, deleted or restarted (forgotten by a restart).
    fate: str = "pending"
    outcome: Outcome | None = None
    #: Its history entry was cleared (or forgotten) after it finished.
    cleared: bool = False

    @property
    def gone(self) -> bool:
        """In neither queue nor history."""
        return self.fate in ("deleted", "restarted") or (self.fate == "finished" and self.cleared)


@dataclass
class Tick:
    """One poll of the daemon, as the test saw it from outside."""

    step: int
    failed: bool
    read_queue: bool
    read_tail: bool
    socket_up_before: bool
    socket_up_after: bool
    socket_events_before: int
    socket_events_after: int
    #: The fake's queue and history while the tick ran (nothing changes during one).
    queue: frozenset[str]
    history: frozenset[str]


@dataclass
class Action:
    step: int
    kind: str


@dataclass
class Record:
    ticks: list[Tick] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    def actions_between(self, first_tick: int, last_tick: int, kind: str) -> bool:
        """Whether an action of ``kind`` happened after tick ``first_tick`` and before tick
        ``last_tick``."""
        start, end = self.ticks[first_tick].step, self.ticks[last_tick].step
        return any(a.kind == kind and start < a.step < end for a in self.actions)


class RestartModel(RuleBasedStateMachine):
    """The fake, the daemon's poller and the truth; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="comfywatch-model-"))
        self.fake: FakeComfyUI | None = None
        self.store: Store | None = None
        self.poller: Poller | None = None
        self.watchers: QueueWatchers | None = None
        self.websocket = False
        self.clock = Clock()
        self.step = 0
        self.truth: dict[str, Truth] = {}
        self.reserved: list[int] = []
        self.record = Record()
        self.recorded: dict[str, tuple[str, str | None]] = {}
        self.socket_up = False
        self.socket_events = 0
        self._socket_changed = asyncio.Event()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- set-up and tear-down ----------------------------------------------------------------

    @initialize(
        websocket=st.booleans(),
        queue_refresh_s=st.sampled_from([0.001, 300.0]),
        finished=st.integers(min_value=0, max_value=2),
        waiting=st.integers(min_value=1, max_value=4),
    )
    def start(self, websocket: bool, queue_refresh_s: float, finished: int, waiting: int) -> None:
        """The server with some prompts finished and some waiting, all tracked, and the
        daemon's first poll."""
        self.websocket = websocket
        self.run(self._start(queue_refresh_s))
        for _ in range(finished):
            self.submit(tracked=True, how="next")
            self.start_next()
            self.finish("success")
        for _ in range(waiting):
            self.submit(tracked=True, how="next")
        self.tick(1)

    async def _start(self, queue_refresh_s: float) -> None:
        self.fake = FakeComfyUI(run_time_s=0.01)
        await self.fake.start()
        self.fake.pause()
        self.fake.hold_running()
        server = {"url": self.fake.url, "websocket": self.websocket}
        server["queue_refresh_s"] = queue_refresh_s
        config = load_settings(write_config(self.folder, {SERVER: server}))
        self.store = Store.open(f"sqlite:///{self.folder / 'model.db'}")
        await self.store.migrate()
        self.poller = Poller(
            store=self.store,
            servers=config.servers,
            hooks=config.hooks,
            not_found_after_s=5,
            poll_interval_s=1.0,
            clock=self.clock,
            max_backoff_s=0.5,
        )
        if self.websocket:
            self.watchers = QueueWatchers(self._on_socket)
            self.watchers.start(self.poller.clients())
            await self._socket_wait(up=True)

    def _on_socket(self, server: str, kind: SocketEvent, remaining: int | None) -> None:
        assert self.poller is not None
        if kind != "count":
            self.socket_events += 1
            self.socket_up = kind == "connected"
            self._socket_changed.set()
        self.poller.socket_event(server, kind, remaining)

    async def _socket_wait(self, *, up: bool) -> None:
        async with asyncio.timeout(10):
            while self.socket_up is not up:
                self._socket_changed.clear()
                await self._socket_changed.wait()

    def teardown(self) -> None:
        try:
            if self.fake is not None and self.poller is not None:
                self.run(self._settle())
        finally:
            self.run(self._stop())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    async def _settle(self) -> None:
        """The server back, a few more polls: every decision still due is checked."""
        assert self.fake is not None
        if not self.fake.is_up:
            await self.fake.come_up()
            self.step += 1
            self.record.actions.append(Action(self.step, "outage end"))
        for _ in range(3):
            await self._tick()
        event(f"prompts {len(self.truth)}, ticks {len(self.record.ticks)}, steps {self.step}")

    async def _stop(self) -> None:
        if self.watchers is not None:
            await self.watchers.stop()
        if self.poller is not None:
            await self.poller.close()
        if self.store is not None:
            await self.store.close()
        if self.fake is not None:
            await self.fake.stop()

    # -- what happens to the server ----------------------------------------------------------

    def _act(self, kind: str) -> None:
        self.step += 1
        self.record.actions.append(Action(self.step, kind))

    def _pending(self) -> list[str]:
        return [p for p, t in self.truth.items() if t.fate == "pending"]

    def _running(self) -> str | None:
        return next((p for p, t in self.truth.items() if t.fate == "running"), None)

    @precondition(lambda self: len(self.truth) < MAX_PROMPTS)
    @rule(tracked=st.booleans(), how=st.sampled_from(["next", "late", "client"]))
    def submit(self, tracked: bool, how: str) -> None:
        """A prompt: numbered now, with a number taken earlier (validated late), or with
        the client's own number."""
        assert self.fake is not None
        number: float | None = None
        if how == "late" and self.reserved:
            number = self.reserved.pop(0)
        elif how == "client":
            number = float(len(self.truth) % 3)
        else:
            how = "next"
        prompt_id = str(uuid.uuid4())
        self.fake.submit(prompt_id=prompt_id, number=number)
        self.truth[prompt_id] = Truth(tracked=tracked)
        self._act(f"submit {how}")
        if tracked:
            self.run(self._register(prompt_id))

    async def _register(self, prompt_id: str) -> None:
        assert self.store is not None and self.poller is not None
        job = NewJob(server=SERVER, prompt_id=prompt_id, labels={}, hooks=(), source="model")
        self.poller.add(await self.store.register([job], self.clock()))

    @precondition(lambda self: len(self.reserved) < 2)
    @rule()
    def take_number(self) -> None:
        """A POST /prompt takes its number and starts validating."""
        assert self.fake is not None
        self.reserved.append(self.fake.take_number())
        self._act("take number")

    @precondition(lambda self: self._running() is None and self._pending())
    @rule()
    def start_next(self) -> None:
        assert self.fake is not None
        fake = self.fake
        first = min(fake.model.pending(), key=lambda p: (p.number, p.prompt_id)).prompt_id
        fake.resume()
        self.run(fake.wait_running(first))
        fake.pause()
        self.truth[first].fate = "running"
        self._act("start")

    @precondition(lambda self: self._running() is not None)
    @rule(outcome=st.sampled_from(OUTCOMES))
    def finish(self, outcome: Outcome) -> None:
        assert self.fake is not None
        prompt_id = self.run(self.fake.finish_running(outcome))
        assert prompt_id is not None and prompt_id == self._running()
        truth = self.truth[prompt_id]
        truth.fate, truth.outcome = "finished", outcome
        self._act("finish")

    @precondition(lambda self: self._pending())
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        assert self.fake is not None
        prompt_id = data.draw(st.sampled_from(sorted(self._pending())))
        assert self.fake.delete_from_queue(prompt_id) == 1
        self.truth[prompt_id].fate = "deleted"
        self._act("delete")

    @rule()
    def clear_history(self) -> None:
        assert self.fake is not None
        self.fake.clear_history()
        for truth in self.truth.values():
            if truth.fate == "finished":
                truth.cleared = True
        self._act("clear history")

    @rule(reconnect=st.booleans())
    def restart(self, reconnect: bool) -> None:
        """``reconnect``: wait for the socket to connect again (about a second)."""
        assert self.fake is not None
        self.run(self._restart(reconnect=reconnect))
        for truth in self.truth.values():
            if truth.fate in ("pending", "running"):
                truth.fate = "restarted"
            elif truth.fate == "finished":
                truth.cleared = True
        self.reserved.clear()  # requests still validating died with the process
        self._act("restart")

    async def _restart(self, *, reconnect: bool) -> None:
        assert self.fake is not None
        await self.fake.restart()
        self.fake.hold_running()  # a restart releases a held worker; pause() stays
        if self.websocket and self.socket_up:
            await self._socket_wait(up=False)
            if reconnect:
                await self._socket_wait(up=True)

    @precondition(lambda self: self.fake is not None and self.fake.is_up)
    @rule()
    def outage_begins(self) -> None:
        self.run(self._go_down())
        self._act("outage begins")

    async def _go_down(self) -> None:
        assert self.fake is not None
        await self.fake.go_down()
        if self.websocket and self.socket_up:
            await self._socket_wait(up=False)

    @precondition(lambda self: self.fake is not None and not self.fake.is_up)
    @rule()
    def outage_ends(self) -> None:
        assert self.fake is not None
        self.run(self.fake.come_up())
        self._act("outage ends")

    # -- the daemon's polls and the checks ---------------------------------------------------

    @rule(count=st.integers(min_value=1, max_value=3))
    def tick(self, count: int) -> None:
        for _ in range(count):
            self.run(self._tick())

    @rule()
    def tick_once(self) -> None:
        """A second rule: polls come about as often as everything else together."""
        self.run(self._tick())

    async def _tick(self) -> None:
        assert self.fake is not None and self.poller is not None and self.store is not None
        fake = self.fake
        self.step += 1
        self.clock.now += 1
        queue_reads = fake.requests["GET /queue"]
        tails = fake.requests["GET /history"]
        running = fake.model.running
        queue = {p.prompt_id for p in fake.model.pending()}
        queue |= {running.prompt.prompt_id} if running else set()
        up_before, events_before = self.socket_up, self.socket_events
        report = await self.poller.tick()
        tick = Tick(
            step=self.step,
            failed=report.servers_failed > 0,
            read_queue=fake.requests["GET /queue"] > queue_reads,
            read_tail=fake.requests["GET /history"] > tails,
            socket_up_before=up_before,
            socket_up_after=self.socket_up,
            socket_events_before=events_before,
            socket_events_after=self.socket_events,
            queue=frozenset(queue),
            history=frozenset(fake.model.history_ids()),
        )
        self.record.ticks.append(tick)
        for row in await self.store.jobs(JobFilter()):
            job = row.job
            got = (str(job.state), job.reason)
            if job.prompt_id in self.recorded:
                assert self.recorded[job.prompt_id] == got, "a terminal state changed"
            elif job.state.terminal:
                self.recorded[job.prompt_id] = got
                self._check(job.prompt_id, got, len(self.record.ticks) - 1)

    def _check(self, prompt_id: str, got: tuple[str, str | None], decided: int) -> None:
        """One terminal state against the truth (``decided``: the tick that recorded it)."""
        truth = self.truth[prompt_id]
        state, reason = got
        event(f"websocket={self.websocket}: {truth.fate} recorded {state} ({reason})")
        where = f"{prompt_id[:8]}: recorded {got}, truth {truth}"
        if reason == "finished":
            assert truth.fate == "finished" and state == truth.outcome, where
            return
        assert truth.gone, f"{where}: it is still on the server"
        seen = self._last_seen(prompt_id, decided)
        if state == "not_found":
            assert seen is None, f"{where}: it was seen"
            return
        assert seen is not None, f"{where}: never seen in a queue read"
        assert (state, reason) in {
            ("cancelled", "deleted_from_queue"),
            ("lost", "history_cleared"),
            ("lost", "server_restarted"),
            ("lost", "left_unobserved"),
        }, where
        ticks = self.record.ticks
        window = ticks[seen + 1 : decided + 1]
        failed = any(t.failed for t in window)
        restarted = self.record.actions_between(seen, decided, "restart")
        # The socket stayed connected from the tick that saw it to the one that decided:
        # for sure (strict), or as far as the daemon may have seen (events during the tick
        # that saw it may have come before its poll began).
        last = ticks[decided]
        strict = ticks[seen].socket_up_before and (
            last.socket_events_after == ticks[seen].socket_events_before
        )
        lenient = ticks[seen].socket_up_after and (
            last.socket_events_after == ticks[seen].socket_events_after
        )
        if self.websocket and strict:
            assert got[0] == "cancelled" or reason == "history_cleared", (
                f"{where}: the socket stayed connected, so the server did not restart"
            )
        if got in {("cancelled", "deleted_from_queue"), ("lost", "history_cleared")}:
            if self.websocket:
                assert lenient or strict, f"{where}: the socket was not connected throughout"
            if truth.fate == "restarted":
                # Only with websocket = false, and only an instant restart, is invisible.
                assert not self.websocket and not failed, f"{where}: a restart was visible"
            if reason == "history_cleared":
                assert truth.fate != "deleted", where
            return
        if reason == "server_restarted":
            assert truth.fate == "restarted" or restarted or self._forgot_all(seen, decided), (
                f"{where}: no restart, and the server did not look restarted"
            )
            return
        # left_unobserved: right unless the deletion was watched throughout.
        if not self.websocket and truth.fate == "deleted":
            since = self._last_tail(seen)
            wiped = self.record.actions_between(since, decided, "clear history")
            wiped |= self.record.actions_between(since, decided, "restart")
            assert failed or wiped, f"{where}: every poll succeeded and nothing looked odd"

    def _last_seen(self, prompt_id: str, decided: int) -> int | None:
        """The last tick before ``decided`` that read the queue while it held the prompt."""
        for index in range(decided, -1, -1):
            tick = self.record.ticks[index]
            if tick.read_queue and not tick.failed and prompt_id in tick.queue:
                return index
        return None

    def _last_tail(self, seen: int) -> int:
        """The last tick up to ``seen`` that read the history tail (0: none did)."""
        for index in range(seen, -1, -1):
            tick = self.record.ticks[index]
            if tick.read_tail and not tick.failed:
                return index
        return 0

    def _forgot_all(self, seen: int, decided: int) -> bool:
        """Whether a tick after ``seen`` found nothing of what the server held then."""
        then = self.record.ticks[seen]
        held = then.queue | then.history
        return any(
            not (held & (tick.queue | tick.history))
            for tick in self.record.ticks[seen + 1 : decided + 1]
        )

    @invariant()
    def the_fake_agrees_with_the_truth(self) -> None:
        if self.fake is None:
            return
        for prompt_id, truth in self.truth.items():
            entry = self.fake.model.history_entry(prompt_id)
            assert (entry is not None) == (truth.fate == "finished" and not truth.cleared)


RestartModel.TestCase.settings = settings.get_profile("restart-model")
TestRestartModel = RestartModel.TestCase
