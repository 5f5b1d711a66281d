"""The fake ComfyUI's queue and history as a pure state machine (comfywatch.testing.model).

Tables of operations and what ComfyUI's PromptQueue does after them, then random
operation sequences against a plain re-telling of PromptQueue (list heap, dict history).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfywatch.testing import MAXIMUM_HISTORY_SIZE, Outcome, QueuedPrompt, QueueModel
from comfywatch.testing.worker import progress_steps_due


def prompt(
    prompt_id: str, number: float, run_time_s: float = 1.0, outcome: Outcome = "success"
) -> QueuedPrompt:
    return QueuedPrompt(
        number=number,
        prompt_id=prompt_id,
        graph={"1": {"class_type": "SaveImage", "inputs": {}}},
        extra_data={},
        outputs_to_execute=["1"],
        outcome=outcome,
        run_time_s=run_time_s,
    )


@dataclass
class Watched:
    """A model and what its callbacks reported."""

    model: QueueModel
    updates: list[int] = field(default_factory=list)  # queue_remaining of each status
    changes: list[None] = field(default_factory=list)


def watched(**kwargs: Any) -> Watched:
    updates: list[int] = []
    changes: list[None] = []
    model = QueueModel(
        on_queue_updated=updates.append, on_change=lambda: changes.append(None), **kwargs
    )
    return Watched(model, updates, changes)


def put(model: QueueModel, prompt_id: str, *, front: bool = False) -> None:
    model.put(prompt(prompt_id, model.take_number(front=front)))


def finish(model: QueueModel) -> None:
    running = model.running
    assert running is not None
    model.finish({"id": running.prompt.prompt_id})


def apply(model: QueueModel, step: str) -> None:
    """One step of a table row: ``put a``, ``front a``, ``start``, ``finish``, ..."""
    verb, _, arg = step.partition(" ")
    actions = {
        "put": lambda: put(model, arg),
        "front": lambda: put(model, arg, front=True),
        "start": lambda: model.start_next(0.0),
        "finish": lambda: finish(model),
        "delete": lambda: model.delete_pending(arg),
        "wipe": model.wipe_pending,
        "forget": lambda: model.delete_history(arg),
        "clear_history": model.clear_history,
        "interrupt": lambda: model.request_interrupt(arg or None),
        "pause": model.pause,
        "resume": model.resume,
        "restart": model.restart,
    }
    actions[verb]()


def pending_ids(model: QueueModel) -> list[str]:
    """Pending ids in the order they would start (by number)."""
    return [p.prompt_id for p in sorted(model.pending(), key=lambda p: p.number)]


# Each row: steps; then pending (in start order), running, history (oldest first), and the
# queue_remaining of every status broadcast ComfyUI would send.
# fmt: off
QUEUE_TABLE = [
    ("put twice", ["put a", "put b"], ["a", "b"], None, [], [1, 2]),
    ("start takes the lowest number", ["put a", "put b", "start"], ["b"], "a", [], [1, 2, 2]),
    ("finish moves running to history", ["put a", "start", "finish"], [], None, ["a"], [1, 1, 0]),
    ("start with nothing pending", ["start"], [], None, [], []),
    ("start while one runs", ["put a", "put b", "start", "start"], ["b"], "a", [], [1, 2, 2]),
    ("front goes first", ["put a", "front b", "start"], ["a"], "b", [], [1, 2, 2]),
    ("delete a pending one", ["put a", "put b", "delete a"], ["b"], None, [], [1, 2, 1]),
    ("delete an unknown id", ["put a", "delete x"], ["a"], None, [], [1]),
    ("delete the only pending one: wipe, then update", ["put a", "delete a"], [], None, [], [1, 0, 0]),
    ("delete the only pending one while one runs", ["put a", "put b", "start", "delete b"], [], "a", [], [1, 2, 2, 1, 1]),
    ("delete never hits the running one", ["put a", "start", "delete a"], [], "a", [], [1, 1]),
    ("delete the same id twice", ["put a", "put b", "delete a", "delete a"], ["b"], None, [], [1, 2, 1]),
    ("wipe the queue", ["put a", "put b", "start", "wipe"], [], "a", [], [1, 2, 2, 1]),
    ("wipe an empty queue still broadcasts", ["wipe"], [], None, [], [0]),
    ("history delete sends no status", ["put a", "start", "finish", "forget a"], [], None, [], [1, 1, 0]),
    ("history clear sends no status", ["put a", "start", "finish", "clear_history"], [], None, [], [1, 1, 0]),
    ("paused starts nothing", ["pause", "put a", "start"], ["a"], None, [], [1]),
    ("resumed starts again", ["pause", "put a", "resume", "start"], [], "a", [], [1, 1]),
    ("restart forgets all, silently", ["put a", "start", "put b", "restart"], [], None, [], [1, 1, 2]),
    ("history keeps insertion order", ["put b", "put a", "start", "finish", "start", "finish"], [], None, ["b", "a"], [1, 2, 2, 1, 1, 0]),
]
# fmt: on


@pytest.mark.parametrize(
    ("steps", "pending", "running", "history", "updates"),
    [row[1:] for row in QUEUE_TABLE],
    ids=[row[0] for row in QUEUE_TABLE],
)
def test_queue_table(
    steps: list[str],
    pending: list[str],
    running: str | None,
    history: list[str],
    updates: list[int],
) -> None:
    box = watched()
    for step in steps:
        apply(box.model, step)
    model = box.model
    assert pending_ids(model) == pending
    assert (model.running.prompt.prompt_id if model.running else None) == running
    assert model.history_ids() == history
    assert box.updates == updates
    assert model.queue_remaining == len(pending) + (running is not None)
    assert len(box.changes) >= len(updates)


def test_numbers_are_used_up_and_restart_from_zero() -> None:
    model = QueueModel()
    assert [model.take_number(), model.take_number(), model.take_number(front=True)] == [0, 1, -2]
    model.restart()
    assert model.next_number == 0


def test_client_numbers_decide_the_start_order() -> None:
    model = QueueModel()
    for prompt_id, number in [("c", 7), ("a", 2.5), ("b", 3)]:
        model.put(prompt(prompt_id, number))
    started = []
    while (p := model.start_next(0.0)) is not None:
        started.append(p.prompt_id)
        finish(model)
    assert started == ["a", "b", "c"]


def test_history_keeps_one_more_than_its_cap_like_comfyui() -> None:
    model = QueueModel(max_history_size=2)
    assert QueueModel().max_history_size == MAXIMUM_HISTORY_SIZE == 10_000
    for prompt_id in "abcde":
        put(model, prompt_id)
        model.start_next(0.0)
        finish(model)
    assert model.history_ids() == ["c", "d", "e"]


def test_a_reused_id_keeps_its_place_in_history() -> None:
    model = QueueModel()
    for prompt_id in "aba":
        put(model, prompt_id)
        model.start_next(0.0)
        finish(model)
    assert model.history_ids() == ["a", "b"]


# ---------------------------------------------------------------------- time


# Each row: run time, outcome, steps at times; then (due, time_left_s) at t=...
# fmt: off
TIME_TABLE = [
    ("before its run time", 2.0, "success", [], 11.0, None, 1.0),
    ("at its run time", 2.0, "success", [], 12.0, "success", 0.0),
    ("scripted error", 2.0, "error", [], 13.0, "error", 0.0),
    ("interrupted at once", 60.0, "success", ["interrupt"], 10.0, "interrupted", 0.0),
    ("interrupt for another id", 60.0, "success", ["interrupt x"], 10.0, None, 60.0),
    ("held never ends", 0.0, "success", ["hold"], 99.0, None, None),
    ("held and interrupted waits", 0.0, "success", ["hold", "interrupt"], 99.0, None, None),
    ("released interrupt ends it", 60.0, "success", ["hold", "interrupt", "release"], 10.0, "interrupted", 0.0),
    ("rerun starts the clock again", 2.0, "success", ["interrupt", "rerun 20"], 21.0, None, 1.0),
]
# fmt: on


@pytest.mark.parametrize(
    ("run_time_s", "outcome", "steps", "now_s", "due", "time_left_s"),
    [row[1:] for row in TIME_TABLE],
    ids=[row[0] for row in TIME_TABLE],
)
def test_time_table(
    run_time_s: float,
    outcome: Outcome,
    steps: list[str],
    now_s: float,
    due: Outcome | None,
    time_left_s: float | None,
) -> None:
    model = QueueModel()
    model.put(prompt("p", model.take_number(), run_time_s=run_time_s, outcome=outcome))
    assert model.start_next(10.0) is not None
    for step in steps:
        verb, _, arg = step.partition(" ")
        if verb == "interrupt":
            model.request_interrupt(arg or None)
        elif verb == "rerun":
            model.rerun(float(arg))
        else:
            getattr(model, verb)()
    assert model.due(now_s) == due
    assert model.time_left_s(now_s) == time_left_s


def test_nothing_running_is_never_due() -> None:
    model = QueueModel()
    assert (model.due(0.0), model.time_left_s(0.0), model.rerun(0.0)) == (None, None, None)
    assert model.request_interrupt() is False
    with pytest.raises(RuntimeError):
        model.finish({})


# ---------------------------------------------------------------------- history pages


# ComfyUI's get_history(max_items, offset) over the history a..e, quirks included.
PAGE_TABLE = [
    (None, -1, "abcde"),
    (2, -1, "de"),  # the newest, oldest first
    (2, 0, "ab"),
    (None, 3, "de"),
    (9, -1, "abcde"),
    (0, -1, ""),
    (0, 0, "a"),  # the check comes after the first entry is taken
    (-1, 0, "a"),
    (-1, -1, ""),
    (2, 4, "e"),
    (2, 10, ""),
    (4, 1, "bcde"),
    (1, 3, "d"),
    (3, -7, "cde"),  # any negative offset means "the newest"
]


@pytest.mark.parametrize(("max_items", "offset", "expected"), PAGE_TABLE)
def test_history_page_table(max_items: int | None, offset: int, expected: str) -> None:
    model = QueueModel()
    for prompt_id in "abcde":
        put(model, prompt_id)
        model.start_next(0.0)
        finish(model)
    page = model.history_page(max_items, offset)
    assert "".join(page) == expected
    assert all(page[k] == {"id": k} for k in page)


# ---------------------------------------------------------------------- against PromptQueue


class PromptQueueRetold:
    """ComfyUI's PromptQueue as written: a list heap with linear deletes, a dict history."""

    def __init__(self, max_history_size: int) -> None:
        self.max_history_size = max_history_size
        self.queue: list[tuple[float, str, int]] = []
        self.running: str | None = None
        self.history: dict[str, int] = {}
        self.updates: list[int] = []

    def remaining(self) -> int:
        return len(self.queue) + (self.running is not None)

    def put(self, number: float, prompt_id: str, seq: int) -> None:
        heapq.heappush(self.queue, (number, prompt_id, seq))
        self.updates.append(self.remaining())

    def start(self) -> None:
        if self.running is None and self.queue:
            self.running = heapq.heappop(self.queue)[1]
            self.updates.append(self.remaining())

    def finish(self) -> None:
        if self.running is not None:
            prompt_id, self.running = self.running, None
            if len(self.history) > self.max_history_size:
                self.history.pop(next(iter(self.history)))
            self.history[prompt_id] = 0
            self.updates.append(self.remaining())

    def delete(self, prompt_id: str) -> None:
        matches = [item for item in self.queue if item[1] == prompt_id]
        if matches:
            if len(self.queue) == 1:
                self.wipe()
            else:
                self.queue.remove(min(matches, key=lambda item: item[2]))  # earliest submitted
                heapq.heapify(self.queue)
            self.updates.append(self.remaining())

    def wipe(self) -> None:
        self.queue = []
        self.updates.append(self.remaining())


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(-3, 20), st.sampled_from("abcdefg")),
        st.tuples(st.sampled_from(["start", "finish", "wipe"]), st.just(0), st.just("")),
        st.tuples(st.just("delete"), st.just(0), st.sampled_from("abcdefgx")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.integers(0, 4))
def test_random_operations_match_prompt_queue(
    operations: list[tuple[str, int, str]], max_history_size: int
) -> None:
    box = watched(max_history_size=max_history_size)
    model = box.model
    retold = PromptQueueRetold(max_history_size)
    for seq, (verb, number, prompt_id) in enumerate(operations):
        if verb == "put":
            model.put(prompt(prompt_id, number))
            retold.put(number, prompt_id, seq)
        elif verb == "start":
            model.start_next(0.0)
            retold.start()
        elif verb == "finish":
            if model.running is not None:
                finish(model)
            retold.finish()
        elif verb == "wipe":
            model.wipe_pending()
            retold.wipe()
        else:
            model.delete_pending(prompt_id)
            retold.delete(prompt_id)
        assert sorted((p.number, p.prompt_id) for p in model.pending()) == sorted(
            (n, p) for n, p, _ in retold.queue
        )
        assert (model.running.prompt.prompt_id if model.running else None) == retold.running
        assert model.history_ids() == list(retold.history)
    assert box.updates == retold.updates


def test_many_pending_prompts_with_deletes_start_in_number_order() -> None:
    """Lazy deletion keeps the heap right through many deletes and compactions."""
    model = QueueModel()
    count = 20_000
    for index in range(count):
        model.put(prompt(f"p{index}", (index * 7919) % count))  # numbers out of order
    for index in range(0, count, 3):
        assert model.delete_pending(f"p{index}")
    assert model.pending_count == count - len(range(0, count, 3))
    numbers = []
    while (started := model.start_next(0.0)) is not None:
        numbers.append(started.number)
        finish(model)
    assert numbers == sorted(numbers)
    assert len(numbers) == count - len(range(0, count, 3))


# ---------------------------------------------------------------------- progress steps


@pytest.mark.parametrize(
    ("elapsed_s", "run_time_s", "steps", "due"),
    [
        (0.0, 8.0, 4, 1),  # the first step at the start
        (1.9, 8.0, 4, 1),
        (2.0, 8.0, 4, 2),
        (7.9, 8.0, 4, 4),  # all sent before the end
        (99.0, 8.0, 4, 4),
        (0.0, 0.0, 4, 4),  # an instant run sends them all at once
        (5.0, 8.0, 0, 0),
        (-1.0, 8.0, 4, 0),  # a clock that went back sends nothing
    ],
)
def test_progress_steps_due(elapsed_s: float, run_time_s: float, steps: int, due: int) -> None:
    assert progress_steps_due(elapsed_s, run_time_s, steps) == due
