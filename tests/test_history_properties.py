"""Property-based: whatever JSON a server sends, parsing raises nothing but ParseError."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfywatch.errors import ParseError
from comfywatch.history import (
    MAX_ENTRY_JSON_CHARS,
    HistoryRecord,
    parse_history_entry,
    parse_history_response,
    parse_queue,
)
from comfywatch.states import JobState

from .helpers import only_entry

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

FIXTURES = [
    only_entry(name)
    for name in (
        "success_saveimage_history.json",
        "runtime_error_history.json",
        "interrupted_history.json",
        "cached_rerun_history.json",
        "chain_invert_scale_history.json",
    )
]


def _check(record: HistoryRecord) -> None:
    assert record.outcome in {JobState.SUCCESS, JobState.ERROR, JobState.INTERRUPTED}
    assert len(json.dumps(record.entry, default=str)) <= MAX_ENTRY_JSON_CHARS + 1000
    for out in record.outputs:
        assert isinstance(out.node_id, str) and isinstance(out.kind, str)
        assert out.filename is None or isinstance(out.filename, str)


@given(json_values)
def test_any_history_answer_parses_or_raises_parse_error(body: Any) -> None:
    try:
        record = parse_history_response("p", body)
    except ParseError:
        return
    if record is not None:
        _check(record)


@given(json_values)
def test_any_entry_parses_or_raises_parse_error(entry: Any) -> None:
    with contextlib.suppress(ParseError):
        _check(parse_history_entry("p", entry))


@given(json_values)
def test_any_queue_parses_or_raises_parse_error(body: Any) -> None:
    try:
        snapshot = parse_queue(body)
    except ParseError:
        return
    assert not snapshot.running & snapshot.pending


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.data())
def test_mutated_fixtures_parse_or_raise_parse_error(data: st.DataObject) -> None:
    """Replace or delete any part of a real recorded entry: still only ParseError."""
    prompt_id, original = data.draw(st.sampled_from(FIXTURES))
    entry = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_paths(entry)))
        if not path:
            entry = data.draw(json_values)
            break
        parent = entry
        try:
            for step in path[:-1]:
                parent = parent[step]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    with contextlib.suppress(ParseError):
        _check(parse_history_entry(prompt_id, entry))


def test_deeply_nested_entry_is_handled() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    prompt_id, original = FIXTURES[0]
    entry = copy.deepcopy(original)
    entry["prompt"][2] = deep
    record = parse_history_entry(prompt_id, entry)
    assert record.outcome is JobState.SUCCESS
