"""Parsing recorded ComfyUI history and queue answers into typed values (pure, no I/O)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from comfywatch.errors import ParseError
from comfywatch.history import (
    MAX_TRACEBACK_CHARS,
    parse_history_entry,
    parse_history_response,
    parse_queue,
    sanitize_entry,
)
from comfywatch.states import JobState

from .helpers import fixture, only_entry


def test_success_entry_is_success_with_its_image_and_timestamps() -> None:
    """The recorded SaveImage run: success, one output image, ComfyUI's ms timestamps kept."""
    pid, entry = only_entry("success_saveimage_history.json")
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.SUCCESS
    assert (record.status_str, record.completed) == ("success", True)
    assert record.error is None
    assert record.number == 0
    assert record.started_at_ms is not None and record.finished_at_ms is not None
    assert record.finished_at_ms >= record.started_at_ms
    [out] = record.outputs
    assert (out.node_id, out.kind, out.position) == ("2", "images", 0)
    assert out.filename and out.filename.endswith(".png")
    assert (out.subfolder, out.type) == ("", "output")


def test_runtime_error_carries_node_exception_and_partial_outputs() -> None:
    """completed=false is finished; the error fields come from the execution_error message."""
    pid, entry = only_entry("runtime_error_history.json")
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.ERROR
    assert (record.status_str, record.completed) == ("error", False)
    assert record.error is not None
    assert (record.error.node_id, record.error.node_type) == ("4", "SaveImage")
    assert record.error.exception_type == "Exception"
    assert "outside the output folder" in (record.error.exception_message or "")
    assert record.error.traceback and "folder_paths.py" in record.error.traceback
    assert [o.type for o in record.outputs] == ["temp"]  # the PreviewImage that ran first


def test_interrupt_is_told_apart_from_error_by_its_message() -> None:
    """status_str says "error" for both; the terminal message says interrupted."""
    pid, entry = only_entry("interrupted_history.json")
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.INTERRUPTED
    assert record.status_str == "error"
    assert record.error is not None
    assert record.error.exception_type is None
    assert record.outputs == ()


def test_cached_rerun_is_success_with_the_earlier_files() -> None:
    pid, entry = only_entry("cached_rerun_history.json")
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.SUCCESS
    assert [o.filename for o in record.outputs] == ["fixture_cached_00001_.png"]


def test_two_output_nodes_and_batches_keep_every_record_in_order() -> None:
    pid, entry = only_entry("chain_invert_scale_history.json")
    record = parse_history_entry(pid, entry)
    assert {o.node_id for o in record.outputs} == {"4", "5"}
    pid, entry = only_entry("batch2_history.json")
    record = parse_history_entry(pid, entry)
    assert [(o.position, o.filename) for o in record.outputs] == [
        (0, "fixture_batch_00001_.png"),
        (1, "fixture_batch_00002_.png"),
    ]


def test_empty_answer_means_not_finished() -> None:
    assert parse_history_response("x", {}) is None
    assert parse_history_response("x", {"other": {}}) is None


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_non_object_history_answer_is_a_parse_error(body: Any) -> None:
    with pytest.raises(ParseError):
        parse_history_response("x", body)


def _success() -> tuple[str, dict[str, Any]]:
    pid, entry = only_entry("success_saveimage_history.json")
    return pid, copy.deepcopy(entry)


def test_error_message_beside_success_status_str_is_an_error() -> None:
    """A known server path leaves status_str "success" beside an execution_error message."""
    pid, entry = _success()
    msgs = entry["status"]["messages"]
    msgs[-1] = ["execution_error", {"node_id": "2", "exception_message": "boom", "timestamp": 5}]
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.ERROR
    assert record.status_str == "success"
    assert record.error is not None and record.error.exception_message == "boom"


@pytest.mark.parametrize(
    ("status_str", "completed", "outcome"),
    [
        ("success", True, JobState.SUCCESS),
        ("error", False, JobState.ERROR),
        (None, True, JobState.SUCCESS),
        (None, None, JobState.ERROR),
    ],
)
def test_no_terminal_message_falls_back_to_status_str(
    status_str: str | None, completed: bool | None, outcome: JobState
) -> None:
    pid, entry = _success()
    entry["status"] = {"messages": []}
    if status_str is not None:
        entry["status"]["status_str"] = status_str
    if completed is not None:
        entry["status"]["completed"] = completed
    assert parse_history_entry(pid, entry).outcome is outcome


def test_old_entry_without_meta_or_timestamps_parses() -> None:
    pid, entry = _success()
    del entry["meta"]
    for _, data in entry["status"]["messages"]:
        data.pop("timestamp", None)
    record = parse_history_entry(pid, entry)
    assert record.outcome is JobState.SUCCESS
    assert record.started_at_ms is None and record.finished_at_ms is None


def test_unknown_kinds_and_plain_values_are_kept() -> None:
    pid, entry = _success()
    entry["outputs"]["7"] = {
        "text": ["hello"],
        "animated": [True],
        "gaussians": [{"filename": "x.ply", "subfolder": "3d", "type": "output", "fmt": "ply"}],
        "result": "not a list",
    }
    record = parse_history_entry(pid, entry)
    seven = {(o.kind, o.position): o for o in record.outputs if o.node_id == "7"}
    assert seven["text", 0].value == "hello"
    assert seven["animated", 0].value is True
    assert seven["gaussians", 0].filename == "x.ply"
    assert seven["gaussians", 0].extra == {"fmt": "ply"}
    assert seven["result", 0].value == "not a list"


def test_six_element_prompt_and_create_time_are_read() -> None:
    pid, entry = _success()
    entry["prompt"][3]["create_time"] = 1723867781000
    entry["prompt"].append({"sensitive": True})
    record = parse_history_entry(pid, entry)
    assert record.created_at_ms == 1723867781000
    assert record.number == 0


def test_huge_traceback_is_capped() -> None:
    pid, entry = _success()
    entry["status"]["messages"][-1] = [
        "execution_error",
        {"node_id": "1", "traceback": ["x" * 1000] * 1000},
    ]
    record = parse_history_entry(pid, entry)
    assert record.error is not None and record.error.traceback is not None
    assert len(record.error.traceback) <= MAX_TRACEBACK_CHARS


def test_api_keys_in_extra_data_are_stripped() -> None:
    pid, entry = _success()
    entry["prompt"][3].update(
        api_key_comfy_org="sk-secret-1", auth_token_comfy_org="tok-secret-2", keep="me"
    )
    record = parse_history_entry(pid, entry)
    stored = str(record.entry)
    assert "sk-secret-1" not in stored and "tok-secret-2" not in stored
    assert record.entry["prompt"][3]["keep"] == "me"
    assert entry["prompt"][3]["api_key_comfy_org"] == "sk-secret-1"  # input untouched


def test_oversized_entry_is_elided_but_keeps_status() -> None:
    _, entry = _success()
    entry["prompt"][2] = {"big": "y" * 3_000_000}
    clean = sanitize_entry(entry)
    assert clean["prompt"][2] == {"_elided": "graph too large to store"}
    assert clean["status"]["status_str"] == "success"


def test_queue_lists_running_and_pending_with_numbers() -> None:
    snapshot = parse_queue(fixture("queue_1_running_3_pending.json"))
    assert len(snapshot.running) == 1
    assert len(snapshot.pending) == 3
    assert set(snapshot.numbers) == snapshot.running | snapshot.pending


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"queue_running": [], "queue_pending": None},
        {"queue_running": [[1]], "queue_pending": []},
        {"queue_running": [[1, 2]], "queue_pending": []},
        {"queue_running": ["x"], "queue_pending": []},
    ],
)
def test_malformed_queue_is_a_parse_error(body: Any) -> None:
    with pytest.raises(ParseError):
        parse_queue(body)


def test_output_keys_that_collide_after_capping_are_kept_once() -> None:
    """A (node, kind, position) key is unique in the table: capped names must not repeat."""
    pid, entry = _success()
    long = "n" * 5000
    entry["outputs"] = {long + "a": {"text": ["one"]}, long + "b": {"text": ["two"]}}
    record = parse_history_entry(pid, entry)
    keys = [(o.node_id, o.kind, o.position) for o in record.outputs]
    assert len(keys) == len(set(keys)) == 1


def test_text_no_database_accepts_is_cleaned() -> None:
    """Undecodable file names reach JSON as lone surrogates; NUL and NaN appear too. What
    is stored must be valid for SQLite and PostgreSQL alike."""
    import json

    pid, entry = _success()
    entry["outputs"]["2"]["images"][0]["filename"] = "bad\udcffname\x00.png"
    entry["outputs"]["3"] = {"scores": [float("nan"), 2**80], "text": ["a\x00b"]}
    entry["status"]["messages"][0][1]["timestamp"] = 2**80
    record = parse_history_entry(pid, entry)
    names = [o.filename for o in record.outputs if o.filename]
    assert names == ["bad\ufffdname\ufffd.png"]
    values = {(o.kind, o.position): o.value for o in record.outputs if o.node_id == "3"}
    assert values == {("scores", 0): None, ("scores", 1): str(2**80), ("text", 0): "a\ufffdb"}
    assert record.started_at_ms is None
    text = json.dumps(record.entry, allow_nan=False)  # no NaN left
    text.encode("utf-8")  # no lone surrogate left
    assert "\\u0000" not in text
