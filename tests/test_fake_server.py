"""The fake ComfyUI (comfywatch.testing), over real sockets, against a real server's answers.

The reference answers in tests/fixtures/ were recorded from ComfyUI 0.3.64.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfywatch.testing import (
    COMFYUI_VERSION,
    FAULTS,
    ROUTES,
    FakeComfyUI,
    PromptRejected,
    RouteStats,
    ServerStats,
    default_graph,
    serve,
    sized_graph,
)

FIXTURES = Path(__file__).parent / "fixtures"
JSON_CT = "application/json; charset=utf-8"


def load_entry(name: str) -> tuple[str, dict[str, Any]]:
    """The (prompt id, entry) of a recorded ``GET /history/{id}`` answer."""
    body = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    ((prompt_id, entry),) = body.items()
    return prompt_id, entry


def shape(value: Any) -> Any:
    """Types and key order of a JSON value, without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def messages(entry: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(name, data keys in order) of each status message."""
    return [(name, list(data)) for name, data in entry["status"]["messages"]]


def timestamps(entry: dict[str, Any]) -> list[int]:
    return [data["timestamp"] for _, data in entry["status"]["messages"]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    server = FakeComfyUI(run_time_s=0.01)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == JSON_CT
        return await response.json()


async def post_json(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else None)


# ---------------------------------------------------------------------- history entries


async def test_success_entry_equals_the_recorded_one_but_for_timestamps(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The recorded graph, id and client id give the recorded entry, with our own clock."""
    prompt_id, recorded = load_entry("success_saveimage_history.json")
    status, answer = await post_json(
        http,
        f"{fake.url}/prompt",
        {"prompt": recorded["prompt"][2], "prompt_id": prompt_id, "client_id": "fixture"},
    )
    assert (status, answer) == (200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})

    await fake.wait_finished(prompt_id)
    body = await get_json(http, f"{fake.url}/history/{prompt_id}")
    entry = body[prompt_id]

    start, cached, end = timestamps(entry)
    assert start == cached <= end
    for _, data in recorded["status"]["messages"] + entry["status"]["messages"]:
        data["timestamp"] = 0
    assert entry == recorded
    assert json.dumps(entry) == json.dumps(recorded)  # key order too


async def test_error_entry_has_the_recorded_shape(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    prompt_id, recorded = load_entry("runtime_error_history.json")
    fake.submit(
        recorded["prompt"][2],
        prompt_id=prompt_id,
        outcome="error",
        extra_data={"client_id": "fixture"},
    )
    await fake.wait_finished(prompt_id)
    entry = (await get_json(http, f"{fake.url}/history/{prompt_id}"))[prompt_id]

    assert list(entry) == list(recorded)
    assert entry["prompt"][0] == 0  # a fresh server (the recording's was 8)
    assert entry["prompt"][1:4] == recorded["prompt"][1:4]
    assert sorted(entry["prompt"][4]) == sorted(recorded["prompt"][4])
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert messages(entry) == messages(recorded)
    error = entry["status"]["messages"][-1][1]
    real_error = recorded["status"]["messages"][-1][1]
    assert {k: type(v) for k, v in error.items()} == {k: type(v) for k, v in real_error.items()}
    # The failing node and what ran before it are the recorded ones for this graph.
    assert (error["node_id"], error["node_type"]) == ("4", "SaveImage")
    assert sorted(error["executed"]) == sorted(real_error["executed"])
    assert error["exception_type"] == "Exception"
    assert error["traceback"]
    assert all(isinstance(frame, str) for frame in error["traceback"])
    assert error["current_inputs"]["filename_prefix"] == ["../outside/fixture"]
    # The preview that ran before the failure is a partial output, as recorded.
    assert shape(entry["outputs"]) == shape(recorded["outputs"])
    temp = entry["outputs"]["2"]["images"][0]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", temp["filename"])
    assert (temp["subfolder"], temp["type"]) == ("", "temp")
    assert entry["meta"] == recorded["meta"]
    assert prompt_id in json.dumps(entry)
    start, _, end = timestamps(entry)
    assert start <= end


async def test_interrupted_entry_has_the_recorded_shape(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """A long prompt interrupted over HTTP ends with an execution_interrupted entry."""
    prompt_id, recorded = load_entry("interrupted_history.json")
    fake.submit(
        recorded["prompt"][2],
        prompt_id=prompt_id,
        run_time_s=60,
        extra_data={"client_id": "fixture"},
    )
    await fake.wait_running(prompt_id)
    async with http.post(f"{fake.url}/interrupt", json={"prompt_id": prompt_id}) as response:
        assert response.status == 200
        assert await response.read() == b""
    await fake.wait_finished(prompt_id)
    entry = (await get_json(http, f"{fake.url}/history/{prompt_id}"))[prompt_id]

    assert list(entry) == list(recorded)
    assert entry["prompt"][1:] == recorded["prompt"][1:]
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert messages(entry) == messages(recorded)
    interrupted = entry["status"]["messages"][-1][1]
    real = recorded["status"]["messages"][-1][1]
    assert {k: type(v) for k, v in interrupted.items()} == {k: type(v) for k, v in real.items()}
    assert all(isinstance(node, str) for node in interrupted["executed"])
    assert interrupted["node_id"] in recorded["prompt"][2]
    assert "exception_message" not in interrupted
    assert entry["outputs"] == recorded["outputs"] == {}
    assert entry["meta"] == recorded["meta"] == {}


async def test_outcome_is_scriptable_over_http(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    ids = {}
    for outcome in ("success", "error", "interrupted"):
        status, answer = await post_json(
            http,
            f"{fake.url}/prompt",
            {
                "prompt": default_graph(),
                "extra_data": {"comfywatch_fake": {"outcome": outcome, "run_time_s": 0}},
            },
        )
        assert status == 200
        ids[outcome] = answer["prompt_id"]
    expected = {
        "success": ("success", True, "execution_success"),
        "error": ("error", False, "execution_error"),
        "interrupted": ("error", False, "execution_interrupted"),
    }
    for outcome, prompt_id in ids.items():
        entry = await fake.wait_finished(prompt_id)
        status = entry["status"]
        assert (status["status_str"], status["completed"], status["messages"][-1][0]) == (
            expected[outcome]
        )
        assert entry["prompt"][3]["comfywatch_fake"]["outcome"] == outcome
    success = (await fake.wait_finished(ids["success"]))["outputs"]
    assert success == {
        "2": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    }

    status, answer = await post_json(
        http,
        f"{fake.url}/prompt",
        {"prompt": default_graph(), "extra_data": {"comfywatch_fake": {"outcome": "maybe"}}},
    )
    assert status == 400
    assert answer["error"]["type"] == "invalid_comfywatch_fake"


async def test_output_files_count_up_per_prefix_and_can_be_viewed(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    first = await fake.wait_finished(fake.submit(default_graph("shots/cat")))
    other = default_graph("shots/cat")
    other["1"]["inputs"]["width"] = 32  # type: ignore[index]  # not the same graph: no cache
    second = await fake.wait_finished(fake.submit(other))
    records = [entry["outputs"]["2"]["images"][0] for entry in (first, second)]
    assert records == [
        {"filename": "cat_00001_.png", "subfolder": "shots", "type": "output"},
        {"filename": "cat_00002_.png", "subfolder": "shots", "type": "output"},
    ]
    view = f"{fake.url}/view"
    params = {"filename": "cat_00002_.png", "subfolder": "shots", "type": "output"}
    async with http.get(view, params=params) as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        assert (await response.read()).startswith(b"\x89PNG\r\n\x1a\n")
    async with http.get(view, params={**params, "filename": "cat_00003_.png"}) as response:
        assert response.status == 404
    async with http.get(view, params={**params, "filename": "../etc/passwd"}) as response:
        assert response.status == 400
    async with http.get(view, params={**params, "subfolder": "../x"}) as response:
        assert response.status == 403


# ---------------------------------------------------------------------- queue and history


async def test_identical_graph_is_answered_from_the_cache(fake: FakeComfyUI) -> None:
    """Like ComfyUI: a fully cached re-run lists every node as cached and repeats the files."""
    first = await fake.wait_finished(fake.submit(default_graph("again")))
    second = await fake.wait_finished(fake.submit(default_graph("again")))
    assert second["outputs"] == first["outputs"]
    cached = {m[0]: m[1] for m in second["status"]["messages"]}["execution_cached"]
    assert cached["nodes"] == list(default_graph("again"))
    await fake.restart()  # the cache lives in the process
    third = await fake.wait_finished(fake.submit(default_graph("again")))
    assert third["outputs"] != first["outputs"]


async def test_queue_items_have_the_recorded_shape(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    recorded = json.loads((FIXTURES / "queue_1_running_3_pending.json").read_text())
    fake.hold_running()
    ids = [fake.submit(extra_data={"client_id": "fixture"}) for _ in range(4)]
    await fake.wait_running(ids[0])

    queue = await get_json(http, f"{fake.url}/queue")
    assert list(queue) == list(recorded)
    assert [item[1] for item in queue["queue_running"]] == ids[:1]
    assert sorted(item[1] for item in queue["queue_pending"]) == sorted(ids[1:])
    assert sorted(item[0] for item in queue["queue_pending"]) == [1, 2, 3]
    real_item = recorded["queue_pending"][0]
    for item in queue["queue_running"] + queue["queue_pending"]:
        assert [type(part) for part in item] == [type(part) for part in real_item]
        assert item[3] == real_item[3] == {"client_id": "fixture"}
        assert item[4] == ["2"]
    assert await get_json(http, f"{fake.url}/prompt") == {"exec_info": {"queue_remaining": 4}}
    for prompt_id in ids:
        assert await get_json(http, f"{fake.url}/history/{prompt_id}") == {}
    assert fake.queue_snapshot() == queue


async def test_queue_then_history_never_misses_a_prompt(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The running→history move is atomic, so queue-then-history always finds a prompt."""
    ids = [fake.submit(run_time_s=0) for _ in range(25)]
    unseen = set(ids)
    while unseen:
        queue = await get_json(http, f"{fake.url}/queue")
        in_line = {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
        for prompt_id in sorted(unseen - in_line):
            history = await get_json(http, f"{fake.url}/history/{prompt_id}")
            assert prompt_id in history, f"{prompt_id} left the queue without a history entry"
            unseen.discard(prompt_id)
    numbers = [(await fake.wait_finished(prompt_id))["prompt"][0] for prompt_id in ids]
    assert numbers == list(range(25))


async def test_deleted_pending_prompt_never_gets_history(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.pause()
    keep, drop = fake.submit(), fake.submit()
    async with http.post(f"{fake.url}/queue", json={"delete": [drop, "unknown"]}) as response:
        assert response.status == 200
        assert await response.read() == b""
    queue = await get_json(http, f"{fake.url}/queue")
    assert [item[1] for item in queue["queue_pending"]] == [keep]
    fake.resume()
    await fake.wait_finished(keep)
    assert await get_json(http, f"{fake.url}/queue") == {"queue_running": [], "queue_pending": []}
    assert await get_json(http, f"{fake.url}/history/{drop}") == {}
    assert fake.history_entry(drop) is None


async def test_queue_clear_and_history_delete_and_clear(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    done = [await fake.wait_finished(fake.submit()) for _ in range(3)]
    ids = [entry["prompt"][1] for entry in done]
    fake.pause()
    waiting = [fake.submit() for _ in range(2)]
    assert (await post_json(http, f"{fake.url}/queue", {"clear": True}))[0] == 200
    assert (await get_json(http, f"{fake.url}/queue"))["queue_pending"] == []
    assert all(fake.history_entry(p) is None for p in waiting)

    assert (await post_json(http, f"{fake.url}/history", {"delete": [ids[0]]}))[0] == 200
    assert list(await get_json(http, f"{fake.url}/history")) == ids[1:]
    assert (await post_json(http, f"{fake.url}/history", {"clear": True}))[0] == 200
    assert await get_json(http, f"{fake.url}/history") == {}


async def test_history_list_pages_like_comfyui(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    ids = [fake.submit(run_time_s=0) for _ in range(5)]
    await fake.wait_finished(ids[-1])
    base = f"{fake.url}/history"
    assert list(await get_json(http, base)) == ids
    assert list(await get_json(http, f"{base}?max_items=2")) == ids[3:]  # newest, oldest first
    assert list(await get_json(http, f"{base}?max_items=2&offset=0")) == ids[:2]
    assert list(await get_json(http, f"{base}?offset=3")) == ids[3:]
    assert list(await get_json(http, f"{base}?max_items=9")) == ids
    async with http.get(f"{base}?max_items=many") as response:
        assert response.status == 500
    assert await get_json(http, f"{base}/not-a-uuid") == {}


async def test_newest_history_holds_the_prompt_a_shrinking_status_announced(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The cheap tracker's contract: when a status shows the queue shrank, the prompt that
    finished is in GET /history?max_items=1 (ComfyUI stores it before the broadcast)."""
    async with http.ws_connect(f"{fake.url}/ws") as ws:
        assert await status_of(ws) == 0
        for _ in range(3):
            prompt_id = fake.submit(run_time_s=0)
            assert await statuses(ws, 3) == [1, 1, 0]  # put, start, finish
            newest = await get_json(http, f"{fake.url}/api/history?max_items=1")
            assert list(newest) == [prompt_id]


async def test_every_route_answers_under_api_and_counts_as_its_kind(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    entry = await fake.wait_finished(fake.submit())
    image = entry["outputs"]["2"]["images"][0]
    api = f"{fake.url}/api"
    gets = ["/queue", "/history", "/history/x", "/prompt", "/system_stats", "/features"]
    for path in gets:
        await get_json(http, api + path)
    async with http.get(f"{api}/view", params=image) as response:
        assert response.status == 200
    posts = {
        "/queue": {"clear": True},
        "/history": {"delete": ["x"]},
        "/interrupt": {},
        "/prompt": {"prompt": default_graph("api")},
    }
    for path, body in posts.items():
        assert (await post_json(http, api + path, body))[0] == 200
    async with http.ws_connect(f"{api}/ws") as ws:
        assert (await ws.receive_json())["type"] == "status"
    assert dict(fake.requests) == dict.fromkeys(ROUTES, 1)


async def test_history_keeps_one_more_than_its_cap_like_comfyui(fake: FakeComfyUI) -> None:
    fake.max_history_size = 3
    ids = [fake.submit(run_time_s=0) for _ in range(5)]
    await fake.wait_finished(ids[-1])
    assert [fake.history_entry(p) is not None for p in ids] == [False, True, True, True, True]


# ---------------------------------------------------------------------- POST /prompt


async def test_post_prompt_rejections_match_comfyui(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    url = f"{fake.url}/prompt"
    status, answer = await post_json(http, url, {"client_id": "x"})
    assert (status, answer) == (
        400,
        {
            "error": {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            },
            "node_errors": {},
        },
    )
    no_outputs = {"1": {"class_type": "EmptyImage", "inputs": {}}}
    status, answer = await post_json(http, url, {"prompt": no_outputs})
    assert (status, answer) == (
        400,
        {
            "error": {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            "node_errors": {},
        },
    )
    status, answer = await post_json(http, url, {"prompt": {"1": {"inputs": {}}}})
    assert status == 400
    assert answer["error"]["type"] == "invalid_prompt"
    async with http.post(url, data=b"{not json") as response:
        assert response.status == 500
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await response.text() == "500 Internal Server Error\n\nServer got itself in trouble"
    # Every 400 used up a number; the 500 did not.
    status, answer = await post_json(http, url, {"prompt": default_graph()})
    assert (status, answer["number"]) == (200, 3)
    with pytest.raises(PromptRejected):
        fake.submit(no_outputs)
    assert (await post_json(http, url, {"prompt": default_graph()}))[1]["number"] == 5


async def test_a_link_to_a_missing_node_is_refused_in_node_errors_like_comfyui(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The recorded refusal of a SaveImage linked to node 9, which does not exist (the
    traceback, of ComfyUI's own code, aside); a graph with one good output keeps it and
    reports the other in ``node_errors`` with a 200, as ComfyUI does."""
    case = json.loads((FIXTURES / "post_prompt_refusals.json").read_text())["link_to_missing_node"]
    status, answer = await post_json(http, f"{fake.url}/prompt", case["request"])
    expected = case["response"]
    expected["node_errors"]["2"]["errors"][0]["extra_info"]["traceback"] = []
    assert (status, answer) == (400, expected)

    graph = {
        **default_graph(),
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["8", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    status, answer = await post_json(http, f"{fake.url}/prompt", {"prompt": graph})
    assert status == 200
    assert answer["node_errors"] == {
        "4": {
            "errors": [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": "'8'",
                    "extra_info": {"exception_type": "KeyError", "traceback": []},
                }
            ],
            "dependent_outputs": ["4"],
            "class_type": "PreviewImage",
        }
    }
    entry = await fake.wait_finished(answer["prompt_id"])
    assert entry["prompt"][4] == ["2"]  # only the good output runs


async def test_client_prompt_id_and_extra_data_are_echoed(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    graph = {"9": {"class_type": "MyNode", "inputs": {}, "_output": True}}
    status, answer = await post_json(
        http,
        f"{fake.url}/api/prompt",
        {"prompt": graph, "prompt_id": "mine", "client_id": "c1", "extra_data": {"note": "x"}},
    )
    assert (status, answer["prompt_id"]) == (200, "mine")
    entry = await fake.wait_finished("mine")
    assert entry["prompt"][2:] == [graph, {"note": "x", "client_id": "c1"}, ["9"]]


# ---------------------------------------------------------------------- controls


async def test_pause_keeps_prompts_pending(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.pause()
    prompt_id = fake.submit()
    queue = await get_json(http, f"{fake.url}/queue")
    assert (queue["queue_running"], [i[1] for i in queue["queue_pending"]]) == ([], [prompt_id])
    assert await get_json(http, f"{fake.url}/prompt") == {"exec_info": {"queue_remaining": 1}}
    fake.resume()
    entry = await fake.wait_finished(prompt_id)
    assert entry["status"]["status_str"] == "success"


async def test_hold_running_is_a_stuck_worker(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.hold_running()
    first, second = fake.submit(run_time_s=0), fake.submit(run_time_s=0)
    await fake.wait_running(first)
    for _ in range(3):  # however often one looks, nothing moves
        queue = await get_json(http, f"{fake.url}/queue")
        assert [i[1] for i in queue["queue_running"]] == [first]
        assert [i[1] for i in queue["queue_pending"]] == [second]
        assert await get_json(http, f"{fake.url}/history/{first}") == {}
    fake.release()
    await fake.wait_finished(second)
    assert fake.history_entry(first) is not None


async def test_interrupt_only_hits_the_running_prompt(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """A held prompt sees interrupts at release, which makes the effect deterministic."""
    async with http.post(f"{fake.url}/interrupt") as response:  # idle, no body
        assert response.status == 200

    fake.hold_running()
    spared = fake.submit(run_time_s=0)
    await fake.wait_running(spared)
    assert (await post_json(http, f"{fake.url}/interrupt", {"prompt_id": "other"}))[0] == 200
    fake.release()
    assert (await fake.wait_finished(spared))["status"]["messages"][-1][0] == "execution_success"

    fake.hold_running()
    hit = fake.submit(run_time_s=0)
    await fake.wait_running(hit)
    assert (await post_json(http, f"{fake.url}/interrupt", {"prompt_id": hit}))[0] == 200
    fake.release()
    entry = await fake.wait_finished(hit)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"

    long_one = fake.submit(run_time_s=60)
    await fake.wait_running(long_one)
    fake.interrupt()
    entry = await fake.wait_finished(long_one)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


async def test_restart_forgets_everything_on_the_same_port(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    url = fake.url
    finished = fake.submit(run_time_s=0)
    await fake.wait_finished(finished)
    fake.hold_running()
    running = fake.submit()
    pending = fake.submit()
    await fake.wait_running(running)
    async with http.ws_connect(f"{url}/ws") as ws:
        await ws.receive_json()
        await fake.restart()
        message = await ws.receive()
        assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)

    assert fake.url == url
    assert await get_json(http, f"{url}/queue") == {"queue_running": [], "queue_pending": []}
    assert await get_json(http, f"{url}/history") == {}
    for prompt_id in (finished, running, pending):
        assert await get_json(http, f"{url}/history/{prompt_id}") == {}
    status, answer = await post_json(http, f"{url}/prompt", {"prompt": default_graph()})
    assert (status, answer["number"]) == (200, 0)
    await fake.wait_finished(answer["prompt_id"])  # the worker is not stuck any more


async def test_go_down_refuses_connections_while_prompts_keep_running(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.hold_running()
    prompt_id = fake.submit()
    await fake.wait_running(prompt_id)
    await fake.go_down()
    assert not fake.is_up
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await fresh.get(f"{fake.url}/queue")
    fake.release()
    await fake.wait_finished(prompt_id)
    await fake.come_up()
    assert prompt_id in await get_json(http, f"{fake.url}/history/{prompt_id}")
    status, answer = await post_json(http, f"{fake.url}/prompt", {"prompt": default_graph()})
    assert (status, answer["number"]) == (200, 1)  # the same "process": numbers go on

    await fake.go_down(forget=True)
    await fake.come_up()
    assert await get_json(http, f"{fake.url}/history/{prompt_id}") == {}
    status, answer = await post_json(http, f"{fake.url}/prompt", {"prompt": default_graph()})
    assert answer["number"] == 0


async def test_stop_then_start_keeps_state_and_reruns_the_running_prompt(
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeComfyUI(run_time_s=0)
    done = fake.submit()  # queued before the server starts
    await fake.start()
    try:
        await fake.wait_finished(done)
        fake.hold_running()
        stuck = fake.submit()
        await fake.wait_running(stuck)
        await fake.stop()
        assert fake.queue_snapshot()["queue_running"][0][1] == stuck
        fake.release()
        await fake.start()
        await fake.wait_finished(stuck)
        assert fake.history_entry(done) is not None
    finally:
        await fake.stop()


async def test_api_prefix_answers_the_same_and_counts_as_the_same_route(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    prompt_id = await fake.wait_finished(fake.submit())
    pid = prompt_id["prompt"][1]
    for path in ("/queue", "/prompt", f"/history/{pid}", "/history?max_items=1", "/system_stats"):
        plain = await get_json(http, f"{fake.url}{path}")
        assert await get_json(http, f"{fake.url}/api{path}") == plain
    assert fake.requests["GET /queue"] == 2
    assert fake.requests["GET /history/{id}"] == 2
    assert fake.requests["GET /history"] == 2
    async with http.get(f"{fake.url}/api/jobs") as response:  # 0.6.0+ only
        assert response.status == 404


async def test_system_stats_match_the_recorded_shape(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    recorded = json.loads((FIXTURES / "server_info_system_stats.json").read_text())
    stats = await get_json(http, f"{fake.url}/system_stats")
    assert shape(stats) == shape(recorded)
    assert stats["system"]["comfyui_version"] == COMFYUI_VERSION == "0.3.64"
    assert str(fake.port) in stats["system"]["argv"]


async def test_required_headers(http: aiohttp.ClientSession) -> None:
    fake = FakeComfyUI(required_headers={"Authorization": "Bearer s3cret"})
    await fake.start()
    try:
        async with http.get(f"{fake.url}/queue") as response:
            assert response.status == 401
            assert await response.text() == "Unauthorized"
        wrong = {"Authorization": "Bearer nope"}
        async with http.get(f"{fake.url}/api/prompt", headers=wrong) as response:
            assert response.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
            await http.ws_connect(f"{fake.url}/ws")
        assert handshake.value.status == 401
        good = {"Authorization": "Bearer s3cret"}
        async with http.get(f"{fake.url}/queue", headers=good) as response:
            assert response.status == 200
        async with http.ws_connect(f"{fake.url}/ws", headers=good) as ws:
            assert (await ws.receive_json())["type"] == "status"
        assert fake.requests["GET /queue"] == 2
    finally:
        await fake.stop()


# ---------------------------------------------------------------------- WebSocket


async def status_of(ws: aiohttp.ClientWebSocketResponse) -> int:
    message = await ws.receive_json()
    assert message["type"] == "status", message
    return int(message["data"]["status"]["exec_info"]["queue_remaining"])


async def test_ws_broadcasts_status_on_every_queue_change(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(f"{fake.url}/ws?clientId=watcher") as ws:
        assert await ws.receive_json() == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "watcher"},
        }
        fake.pause()
        kept, dropped = fake.submit(run_time_s=0), fake.submit(run_time_s=0)
        assert [await status_of(ws), await status_of(ws)] == [1, 2]  # put, put
        fake.delete_from_queue(dropped)
        assert await status_of(ws) == 1  # delete
        fake.resume()
        assert await status_of(ws) == 1  # start
        # Not our prompt: only its progress (it has no client id), then the finish.
        for value in range(1, 5):
            progress = {"value": value, "max": 4, "prompt_id": kept, "node": "1"}
            assert await ws.receive_json() == {"type": "progress", "data": progress}
        assert await status_of(ws) == 0  # finish
        assert fake.history_entry(kept) is not None


async def statuses(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    """The queue_remaining of the next ``count`` status messages (others are skipped)."""
    found: list[int] = []
    while len(found) < count:
        message = await ws.receive_json()
        if message["type"] == "status":
            assert list(message["data"]) == ["status"], message  # only the greeting has a sid
            found.append(int(message["data"]["status"]["exec_info"]["queue_remaining"]))
    return found


async def test_ws_status_is_sent_exactly_when_comfyui_sends_it(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """Put, start, finish, delete and wipe each send one status; deleting the only pending
    prompt sends two (ComfyUI wipes, then updates); history changes and no-ops send none."""
    # Every action first, then the statuses they caused, in order.
    queue, history = f"{fake.url}/queue", f"{fake.url}/history"
    async with http.ws_connect(f"{fake.url}/ws?clientId=watcher") as ws:
        assert await status_of(ws) == 0
        fake.pause()
        ids = []
        for _ in range(3):
            _, answer = await post_json(http, f"{fake.url}/prompt", {"prompt": default_graph()})
            ids.append(answer["prompt_id"])  # three puts: 1, 2, 3
        await post_json(http, queue, {"delete": [ids[1], "unknown"]})  # 2; unknown: nothing
        await post_json(http, queue, {"clear": True})  # 0
        await post_json(http, queue, {"clear": True})  # 0: a wipe of nothing still sends
        only = fake.submit()  # 1
        await post_json(http, queue, {"delete": [only]})  # the only one: 0 (wipe), 0
        await post_json(http, history, {"clear": True})  # history changes send nothing
        await post_json(http, history, {"delete": [only]})
        fake.resume()  # nothing pending: nothing starts
        kept = fake.submit(run_time_s=0)  # put 1, start 1, finish 0
        await fake.wait_finished(kept)
        fake.pause()
        for _ in range(5):
            fake.submit()  # 1..5: the end mark (the queue never held 5 before)
        found = await statuses(ws, 1)
        while found[-1] != 5:
            found += await statuses(ws, 1)
        assert found == [1, 2, 3, 2, 0, 0, 1, 0, 0, 1, 1, 0, 1, 2, 3, 4, 5]
        assert await get_json(http, f"{fake.url}/prompt") == {"exec_info": {"queue_remaining": 5}}


async def test_ws_status_counts_the_running_prompt(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """queue_remaining = pending + running, the same number GET /prompt answers."""
    async with http.ws_connect(f"{fake.url}/ws") as ws:
        assert await status_of(ws) == 0
        fake.hold_running()
        first, second = fake.submit(), fake.submit()
        await fake.wait_running(first)
        assert await statuses(ws, 3) == [1, 2, 2]  # put, put, start
        assert await get_json(http, f"{fake.url}/api/prompt") == {
            "exec_info": {"queue_remaining": 2}
        }
        fake.interrupt(first)
        fake.release()
        await fake.wait_finished(second)
        assert await statuses(ws, 3) == [1, 1, 0]  # finish, start, finish


async def test_ws_execution_messages_reach_only_the_submitter(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    async with (
        http.ws_connect(f"{fake.url}/ws?clientId=me") as mine,
        http.ws_connect(f"{fake.url}/ws") as other,
    ):
        await mine.receive_json()
        sid = (await other.receive_json())["data"]["sid"]
        assert sid and sid != "me"
        _, answer = await post_json(
            http, f"{fake.url}/prompt", {"prompt": default_graph(), "client_id": "me"}
        )
        prompt_id = answer["prompt_id"]
        seen = []
        while True:
            message = await mine.receive_json()
            seen.append(message["type"])
            if message["type"] == "executing" and message["data"]["node"] is None:
                assert message["data"]["prompt_id"] == prompt_id
                break
        assert seen == [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            *["progress"] * 4,
            "executing",
            "executing",
            "executed",
            "execution_success",
            "status",
            "executing",
        ]
        assert [await status_of(other) for _ in range(3)] == [1, 1, 0]
        assert fake.history_entry(prompt_id) is not None


async def until_status(ws: aiohttp.ClientWebSocketResponse, remaining: int) -> list[Any]:
    """Every message up to and including the next status with this queue_remaining."""
    seen = []
    while True:
        message = await ws.receive_json()
        seen.append(message)
        status = message["data"].get("status") if message["type"] == "status" else None
        if status is not None and status["exec_info"]["queue_remaining"] == remaining:
            return seen


def progress_of(messages: list[Any]) -> list[tuple[int, int, str, str]]:
    return [
        (m["data"]["value"], m["data"]["max"], m["data"]["prompt_id"], m["data"]["node"])
        for m in messages
        if m["type"] == "progress"
    ]


async def test_ws_progress_goes_to_everyone_or_to_the_submitter_only(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """As ComfyUI: progress of a prompt without a client id reaches every socket, of one
    with a client id only that client's socket."""
    fake.progress_steps = 3
    graph = {"7": {"class_type": "EmptyImage", "inputs": {}}, **default_graph()}
    async with (
        http.ws_connect(f"{fake.url}/ws?clientId=mine") as mine,
        http.ws_connect(f"{fake.url}/ws") as other,
    ):
        await mine.receive_json()
        await other.receive_json()
        anyone = fake.submit(graph, run_time_s=0)
        await fake.wait_finished(anyone)
        expected = [(value, 3, anyone, "7") for value in (1, 2, 3)]
        assert progress_of(await until_status(mine, 0)) == expected
        assert progress_of(await until_status(other, 0)) == expected

        ours = fake.submit(graph, run_time_s=0, extra_data={"client_id": "mine"})
        await fake.wait_finished(ours)
        fake.clear_queue()  # an end mark: status 0 after the prompt's own
        assert progress_of(await until_status(mine, 0)) == [(v, 3, ours, "7") for v in (1, 2, 3)]
        assert progress_of(await until_status(other, 0)) == []
        assert progress_of(await until_status(other, 0)) == []


async def test_ws_progress_stops_at_an_interrupt(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(f"{fake.url}/ws") as ws:
        await ws.receive_json()
        long_one = fake.submit(run_time_s=600)
        seen = []
        while not progress_of(seen):
            seen.append(await ws.receive_json())
        assert progress_of(seen) == [(1, 4, long_one, "1")]  # the first step, at the start
        fake.interrupt()
        rest = await until_status(ws, 0)
        assert progress_of(rest) == []
        assert [m["type"] for m in rest] == ["execution_interrupted", "status"]
    entry = await fake.wait_finished(long_one)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


# ---------------------------------------------------------------------- accounting


async def test_costs_are_counted_per_user_agent_and_route(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.pause()
    for _ in range(50):
        fake.submit()
    read: dict[str, int] = {}
    for agent, paths in {"poller-a": ["/queue", "/api/queue"], "poller-b": ["/prompt"]}.items():
        for path in paths:
            async with http.get(fake.url + path, headers={"User-Agent": agent}) as response:
                read[agent] = read.get(agent, 0) + len(await response.read())
    stats = fake.stats
    assert stats.clients() == ["poller-a", "poller-b"]
    queue = stats.routes("poller-a")["GET /queue"]
    assert (queue.requests, queue.response_bytes) == (2, read["poller-a"])
    assert queue.cpu_s > 0  # two 50-prompt queues were serialised
    assert list(stats.routes("poller-b")) == ["GET /prompt"]
    assert stats.total("poller-b").response_bytes == read["poller-b"]
    assert stats.total().requests == 3
    assert stats.routes("nobody") == {}


def test_clients_beyond_the_cap_are_counted_together() -> None:
    stats = ServerStats(max_clients=2)
    for client in "abcd":
        stats.record(client, "GET /queue", response_bytes=10, cpu_s=0.5, started_s=0, finished_s=1)
    assert stats.clients() == ["(other)", "a", "b"]
    assert stats.total("(other)") == RouteStats(requests=2, response_bytes=20, cpu_s=1.0)
    assert [poll.client for poll in stats.polls()] == ["a", "b", "(other)", "(other)"]
    stats.reset()
    assert (stats.clients(), stats.polls()) == ([], [])


async def test_stats_route_is_outside_the_api_and_not_counted(
    http: aiohttp.ClientSession,
) -> None:
    """/_fake/stats is neither counted, faulted nor behind the required headers."""
    async with FakeComfyUI(required_headers={"Authorization": "Bearer s3cret"}) as fake:
        fake.inject("http_500")  # every ComfyUI route
        good = {"Authorization": "Bearer s3cret", "User-Agent": "me"}
        async with http.get(f"{fake.url}/queue", headers=good) as response:
            assert response.status == 500
            size = len(await response.read())
        for _ in range(2):
            async with http.get(f"{fake.url}/_fake/stats") as response:
                assert response.status == 200
                body = await response.json()
        assert body == fake.stats.snapshot()
        (costs,) = body["clients"]["me"].values()
        assert (costs["requests"], costs["response_bytes"]) == (1, size)
        assert list(body["clients"]) == ["me"]
        assert body["total"]["requests"] == 1
        assert sum(fake.requests.values()) == 1
        async with http.delete(f"{fake.url}/_fake/stats") as response:
            assert response.status == 204
        assert fake.stats.snapshot() == {
            "clients": {},
            "total": {"requests": 0, "response_bytes": 0, "cpu_s": 0.0},
        }
        fake.clear_faults()
        async with http.get(f"{fake.url}/api/_fake/stats", headers=good) as response:
            assert response.status == 404  # not a ComfyUI route


async def test_poll_log_tells_who_polled_when_and_is_bounded(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.stats.max_polls_per_client = 3
    for agent in ("replica-1", "replica-2", "replica-1"):
        for path in ("/queue", "/history?max_items=5"):
            await get_json_as(http, fake.url + path, agent)
    one = fake.stats.polls("replica-1")
    assert [poll.route for poll in one] == ["GET /history", "GET /queue", "GET /history"]
    assert all(poll.client == "replica-1" for poll in one)
    assert all(poll.started_s <= poll.finished_s for poll in one)
    everyone = fake.stats.polls()
    assert [poll.client for poll in everyone] == ["replica-1"] + ["replica-2"] * 2 + [
        "replica-1"
    ] * 2
    # These clients took turns: no two requests of different clients overlap.
    for earlier, later in itertools.pairwise(everyone):
        assert earlier.finished_s <= later.started_s
    async with http.get(f"{fake.url}/_fake/polls", params={"client": "replica-2"}) as response:
        body = await response.json()
    assert body["clock"] == "monotonic"
    assert [(p["client"], p["route"]) for p in body["polls"]] == [
        ("replica-2", "GET /queue"),
        ("replica-2", "GET /history"),
    ]
    assert fake.stats.total("replica-1").requests == 4  # the costs are not bounded


async def get_json_as(http: aiohttp.ClientSession, url: str, agent: str) -> Any:
    async with http.get(url, headers={"User-Agent": agent}) as response:
        assert response.status == 200
        return await response.json()


async def test_websocket_frames_count_for_their_client(fake: FakeComfyUI) -> None:
    """Named by User-Agent, or by clientId when there is none; frames count as bytes."""
    received = {"watcher": 0, "anon": 0}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as bare,
        bare.ws_connect(f"{fake.url}/ws", headers={"User-Agent": "watcher"}) as named,
        bare.ws_connect(f"{fake.url}/ws?clientId=anon") as anonymous,
    ):
        sockets = {"watcher": named, "anon": anonymous}
        for client, ws in sockets.items():
            received[client] += len(await ws.receive_str())  # the greeting
        fake.submit(run_time_s=0)  # its status and progress reach both
        for client, ws in sockets.items():
            while True:
                text = await ws.receive_str()
                received[client] += len(text)
                message = json.loads(text)
                if message["type"] == "status" and message["data"]["status"] == {
                    "exec_info": {"queue_remaining": 0}
                }:
                    break
    for client, size in received.items():
        ws_costs = fake.stats.routes(client)["GET /ws"]
        assert (ws_costs.requests, ws_costs.response_bytes) == (1, size)
    assert size > 400  # statuses and progress, not only the greeting
    assert fake.stats.polls() == []  # a socket is not a poll


# ---------------------------------------------------------------------- scale


def test_sized_graph_has_the_asked_json_size() -> None:
    for size in (264, 1_000, 100_000):
        graph = sized_graph(size, "big")
        assert len(json.dumps(graph)) == size
        assert [node["class_type"] for node in graph.values()] == [
            "EmptyImage",
            "SaveImage",
            "PrimitiveString",
        ]
    with pytest.raises(ValueError, match="at least 264"):
        sized_graph(263)


async def test_a_sized_graph_runs_like_the_default_one(fake: FakeComfyUI) -> None:
    graph = sized_graph(5_000, "sized")
    entry = await fake.wait_finished(fake.submit(graph, outcome="error"))
    assert entry["prompt"][2] == graph
    assert entry["prompt"][4] == ["2"]
    assert entry["status"]["messages"][-1][1]["node_id"] == "2"


async def test_a_hundred_thousand_pending_prompts(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """fill() shares one graph; deletes over HTTP and a wipe go through a huge heap."""
    fake.pause()
    ids = fake.fill(100_000, sized_graph(1_000))
    assert len(set(ids)) == 100_000
    assert await get_json(http, f"{fake.url}/prompt") == {"exec_info": {"queue_remaining": 100_000}}
    doomed = ids[::100]
    assert (await post_json(http, f"{fake.url}/queue", {"delete": doomed}))[0] == 200
    assert fake.model.pending_count == 100_000 - len(doomed)
    assert not any(fake.model.is_pending(prompt_id) for prompt_id in doomed)
    fake.delete_from_queue(ids[1:50])
    fake.resume()
    first = await fake.wait_finished(ids[50])
    assert first["prompt"][0] == 50  # the lowest number left ran first
    fake.clear_queue()
    assert fake.model.pending_count == 0


async def test_fake_server_command_prefills_graphs_of_a_size(
    http: aiohttp.ClientSession,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "comfywatch", "fake-server", "--port", "0"),
        *("--run-time", "600", "--prefill", "3", "--graph-bytes", "2000"),
        *("--max-history", "5", "--progress-steps", "0"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        assert "3 prompts queued" in line, line
        url = line.split(" on ")[1].split()[0]
        queue = await get_json(http, f"{url}/queue")
        items = queue["queue_running"] + queue["queue_pending"]
        assert sorted(item[0] for item in items) == [0, 1, 2]
        assert all(len(json.dumps(item[2])) == 2000 for item in items)
        stats = await get_json(http, f"{url}/_fake/stats")
        assert stats["total"]["requests"] == 1
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0


# ---------------------------------------------------------------------- faults


async def test_every_fault_is_known() -> None:
    assert set(FAULTS) == {
        "http_500",
        "html",
        "wrong_shape",
        "truncated_json",
        "auth_401",
        "auth_403",
        "redirect_loop",
        "slow_drip",
        "hang",
        "reset",
        "oversize",
    }
    fake = FakeComfyUI()
    with pytest.raises(ValueError, match="unknown fault"):
        fake.inject("teapot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown route"):
        fake.inject("hang", route="GET /queues")
    with pytest.raises(ValueError, match="times"):
        fake.inject("hang", times=0)
    fake.inject("hang", route="get /api/queue")  # the /api form and case are accepted


async def test_fault_http_500_for_a_number_of_times(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.inject("http_500", route="GET /queue", times=2)
    statuses = []
    for _ in range(3):
        async with http.get(f"{fake.url}/queue") as response:
            statuses.append((response.status, response.content_type))
    assert statuses == [(500, "text/plain"), (500, "text/plain"), (200, "application/json")]
    async with http.get(f"{fake.url}/prompt") as response:
        assert response.status == 200  # another route is untouched


@pytest.mark.parametrize("status", [200, 502])
async def test_fault_html(fake: FakeComfyUI, http: aiohttp.ClientSession, status: int) -> None:
    fake.html_status = status
    fake.inject("html")  # every route
    async with http.get(f"{fake.url}/history/x") as response:
        assert (response.status, response.content_type) == (status, "text/html")
        assert "<html" in await response.text()
        with pytest.raises(aiohttp.ContentTypeError):
            await response.json()


async def test_fault_wrong_shape(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.inject("wrong_shape", route="GET /queue")
    body = await get_json(http, f"{fake.url}/queue")
    assert isinstance(body, list)


async def test_fault_truncated_json(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.inject("truncated_json", route="GET /queue")
    async with http.get(f"{fake.url}/queue") as response:
        raw = await response.read()
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(raw)
    assert raw == b'{"queue_running": [], '[: len(raw)]
    with pytest.raises(ValueError):
        json.loads(raw)


@pytest.mark.parametrize(("fault", "status"), [("auth_401", 401), ("auth_403", 403)])
async def test_fault_auth(
    fake: FakeComfyUI, http: aiohttp.ClientSession, fault: Any, status: int
) -> None:
    fake.inject(fault, route="GET /history/{id}")
    async with http.get(f"{fake.url}/api/history/abc") as response:
        assert response.status == status


async def test_fault_redirect_loop(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.inject("redirect_loop", route="GET /queue")
    with pytest.raises(aiohttp.TooManyRedirects):
        await http.get(f"{fake.url}/queue?x=1", max_redirects=3)
    assert fake.requests["GET /queue"] >= 3


async def test_fault_slow_drip_times_out_a_reader(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.drip_interval_s = 60
    fake.inject("slow_drip", route="GET /queue")
    async with http.get(f"{fake.url}/queue") as response:
        assert response.status == 200
        assert await response.content.readexactly(1) == b"{"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await response.read()


async def test_fault_slow_drip_delivers_the_rest_once_cleared(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.drip_interval_s = 60
    fake.inject("slow_drip", route="GET /queue")
    async with http.get(f"{fake.url}/queue") as response:
        first = await response.content.readexactly(1)
        fake.clear_faults()
        rest = await response.read()
    assert json.loads(first + rest) == {"queue_running": [], "queue_pending": []}


async def test_fault_hang_answers_once_cleared(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.inject("hang", route="GET /prompt")
    request = asyncio.create_task(get_json(http, f"{fake.url}/prompt"))
    await fake.wait_requests("GET /prompt")
    assert not request.done()
    fake.clear_faults()
    assert await request == {"exec_info": {"queue_remaining": 0}}


async def test_fault_hang_times_out_a_client(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    fake.inject("hang", route="GET /queue", times=1)
    with pytest.raises(TimeoutError):
        await http.get(f"{fake.url}/queue", timeout=aiohttp.ClientTimeout(total=0.2))
    await get_json(http, f"{fake.url}/queue")  # times=1: the next one answers


async def test_fault_reset_cuts_the_body(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.inject("reset", route="GET /queue")
    async with http.get(f"{fake.url}/queue") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_fault_reset_after_post_prompt_still_queues(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The real handler runs: the client cannot tell whether its prompt went in."""
    fake.pause()
    fake.inject("reset", route="POST /prompt", times=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await post_json(http, f"{fake.url}/prompt", {"prompt": default_graph()})
    assert len(fake.queue_snapshot()["queue_pending"]) == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_fault_oversize(
    fake: FakeComfyUI, http: aiohttp.ClientSession, chunked: bool
) -> None:
    fake.oversize_bytes = 3 * 1024 * 1024
    fake.oversize_chunked = chunked
    fake.inject("oversize", route="GET /history/{id}")
    async with http.get(f"{fake.url}/history/x") as response:
        assert response.headers["Content-Type"] == JSON_CT
        if chunked:
            assert "Content-Length" not in response.headers
        else:
            assert response.headers["Content-Length"] == str(3 * 1024 * 1024)
        body = await response.read()
    assert len(body) == 3 * 1024 * 1024
    assert isinstance(json.loads(body), dict)


async def test_fault_oversize_default_and_a_client_that_gives_up(
    fake: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    assert fake.oversize_bytes == 80 * 1024 * 1024
    fake.inject("oversize", route="GET /queue", times=1)
    async with http.get(f"{fake.url}/queue") as response:
        assert response.headers["Content-Length"] == str(80 * 1024 * 1024)
        assert (await response.content.read(1024)).startswith(b'{"')
        response.close()  # a size-limited client stops reading
    await get_json(http, f"{fake.url}/queue")


async def test_stop_drops_stuck_requests_and_leaks_no_task(http: aiohttp.ClientSession) -> None:
    before = asyncio.all_tasks()
    fake = FakeComfyUI()
    await fake.start()
    fake.drip_interval_s = 60
    fake.inject("hang", route="GET /queue")
    fake.inject("slow_drip", route="GET /prompt")
    fake.inject("oversize", route="GET /history")

    async def read(path: str) -> bytes:
        async with http.get(f"{fake.url}{path}") as response:
            return await response.read()

    hanging = asyncio.create_task(read("/queue"))
    dripping = asyncio.create_task(read("/prompt"))
    unread = await http.get(f"{fake.url}/history")  # never read: the server blocks writing
    await fake.wait_requests("GET /queue")
    await fake.wait_requests("GET /prompt")
    async with http.ws_connect(f"{fake.url}/ws") as ws:
        await ws.receive_json()
        await fake.stop()
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE)

    results = await asyncio.gather(hanging, dripping, return_exceptions=True)
    assert all(isinstance(result, aiohttp.ClientError) for result in results), results
    with pytest.raises(aiohttp.ClientPayloadError):
        await unread.read()
    unread.release()
    assert asyncio.all_tasks() == before


# ---------------------------------------------------------------------- serve()


async def test_serve_prints_its_url_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    stop = asyncio.Event()
    stop.set()
    await serve("127.0.0.1", 0, 0.5, stop)
    err = capsys.readouterr().err
    assert re.fullmatch(r"fake ComfyUI 0\.3\.64 listening on http://127\.0\.0\.1:\d+ .*\n", err)
