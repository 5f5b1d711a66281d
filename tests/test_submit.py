"""``comfywatch submit``: a workflow posted to a real fake ComfyUI, registered through the
spool, and (``--wait``) followed to its end by a real daemon, all as subprocesses."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from comfywatch.cli.submit import describe_refusal
from comfywatch.testing import FakeComfyUI, default_graph

from .conftest import write_config
from .daemon_proc import DaemonProcess, connect, run_cli
from .helpers import FIXTURES

# Every test once on SQLite, once on PostgreSQL (the daemon's database is the backend's).
pytestmark = pytest.mark.usefixtures("backend")


def workflow_file(folder: Path, graph: Any, name: str = "workflow.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(graph), encoding="utf-8")
    return path


def spool_files(folder: Path) -> list[Path]:
    return sorted((folder / "jobs.d").glob("*.toml"))


async def test_submit_wait_follows_the_job_to_its_end_with_its_progress(
    tmp_path: Path, backend: str
) -> None:
    """The prompt goes without a client id, so the daemon's socket gets its broadcast
    progress; the job is registered with its labels; --wait exits 0 on success."""
    async with FakeComfyUI(run_time_s=1.5, progress_steps=6) as fake:
        config = write_config(tmp_path, {"local": fake.url})
        workflow = workflow_file(tmp_path, default_graph())
        daemon = await DaemonProcess.start(config)
        try:
            await daemon.wait_event("daemon_started")
            await fake.wait_requests("GET /ws")
            code, out, err = await run_cli(
                *("submit", str(workflow), "--server", "local", "--label", "batch=b1"),
                *("--wait", "--config", str(config)),
            )
            assert code == 0, err
            prompt_id = out.strip()
            entry = fake.history_entry(prompt_id)
            assert entry is not None and "client_id" not in entry["prompt"][3]
            assert f"local {prompt_id} success finished" in err
            with connect(backend) as conn:
                row = conn.execute(
                    "SELECT state, labels, source, progress_node, progress_value, progress_max,"
                    " progress_at FROM jobs WHERE prompt_id = ?",
                    (prompt_id,),
                ).fetchone()
            state, labels, source, *progress, progress_at = row
            assert (state, json.loads(labels)) == ("success", {"batch": "b1"})
            assert source.startswith(str(tmp_path / "jobs.d"))  # the spool, as `register`
            assert progress == ["1", 6, 6] and progress_at is not None

            code, out, _ = await run_cli("show", prompt_id, "--json", "--config", str(config))
            shown = json.loads(out)["progress"]
            assert (shown["node"], shown["value"], shown["max"]) == ("1", 6, 6)
            code, out, _ = await run_cli("show", prompt_id, "--config", str(config))
            assert "progress:      6/6 node 1 at " in out
            code, out, _ = await run_cli("jobs", "--config", str(config))
            assert "PROGRESS" in out.splitlines()[0] and " 6/6 " in out
            daemon.send(signal.SIGTERM)
            assert await daemon.wait() == 0, daemon.describe()
        finally:
            await daemon.close()


async def test_submit_without_wait_prints_the_id_and_leaves_a_spool_file(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    workflow = workflow_file(tmp_path, default_graph())
    code, out, err = await run_cli(
        "submit", str(workflow), "--server", "local", "--hooks", "", "--config", str(config)
    )
    assert code == 0, err
    prompt_id = out.strip()
    await fake.wait_finished(prompt_id)
    [spooled] = spool_files(tmp_path)
    text = spooled.read_text()
    assert f'prompt_id = "{prompt_id}"' in text and "hooks = []" in text


async def test_a_ui_format_workflow_is_refused_with_how_to_export_the_api_format(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    ui = {"last_node_id": 2, "last_link_id": 1, "nodes": [{"id": 1}], "links": [], "version": 0.4}
    workflow = workflow_file(tmp_path, ui)
    code, out, err = await run_cli(
        "submit", str(workflow), "--server", "local", "--config", str(config)
    )
    assert (code, out) == (2, "")
    assert "UI format" in err and "Export (API)" in err and "dev mode" in err
    assert fake.requests["POST /prompt"] == 0 and spool_files(tmp_path) == []

    for bad, message in (("[1, 2]", "got a JSON list"), ("{nope", "is not JSON")):
        (tmp_path / "bad.json").write_text(bad)
        code, _, err = await run_cli(
            "submit", str(tmp_path / "bad.json"), "--server", "local", "--config", str(config)
        )
        assert code == 2 and message in err, err


async def test_node_errors_are_printed_per_node_and_input_and_nothing_is_registered(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    graph = default_graph()
    graph["2"]["inputs"]["images"] = ["9", 0]  # node 9 does not exist
    workflow = workflow_file(tmp_path, graph)
    code, out, err = await run_cli(
        "submit", str(workflow), "--server", "local", "--config", str(config)
    )
    assert (code, out) == (1, ""), err
    assert err.splitlines() == [
        "comfywatch: submit: local refused the workflow: Prompt outputs failed validation",
        "  node 2 (SaveImage):",
        "    - Exception when validating node: '9'",
    ]
    assert fake.requests["POST /prompt"] == 1 and spool_files(tmp_path) == []


async def test_what_the_daemon_would_reject_is_refused_before_anything_is_queued(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    config = write_config(tmp_path, {"local": fake.url, "down": "http://127.0.0.1:9"})
    workflow = workflow_file(tmp_path, default_graph())
    for args, message in (
        (["--server", "lcoal"], "server: unknown server 'lcoal' (did you mean 'local'?)"),
        (["--server", "local", "--hooks", "notify"], "hooks[0]: unknown hook 'notify'"),
    ):
        code, _, err = await run_cli("submit", str(workflow), *args, "--config", str(config))
        assert code == 2 and message in err, err
    assert fake.requests["POST /prompt"] == 0
    code, _, err = await run_cli(
        "submit", str(workflow), "--server", "down", "--config", str(config)
    )
    assert code == 69 and "POST /prompt: cannot connect" in err, err
    assert spool_files(tmp_path) == []


REFUSALS: dict[str, list[str]] = {
    "value_below_min": [
        "local refused the workflow: Prompt outputs failed validation",
        "  node 1 (EmptyImage), needed by output 2:",
        "    - width: Value 0 smaller than min of 1 (received 0)",
    ],
    "value_wrong_type": [
        "local refused the workflow: Prompt outputs failed validation",
        "  node 1 (EmptyImage), needed by output 2:",
        "    - width: Failed to convert an input value to a INT value: width, wide, invalid"
        " literal for int() with base 10: 'wide' (received \"wide\")",
    ],
    "missing_required_input": [
        "local refused the workflow: Prompt outputs failed validation",
        "  node 2 (SaveImage):",
        "    - images: Required input is missing",
    ],
    "link_to_missing_node": [
        "local refused the workflow: Prompt outputs failed validation",
        "  node 2 (SaveImage):",
        "    - Exception when validating node: '9'",
    ],
    "unknown_class_type": [
        "local refused the workflow: Cannot execute because node NoSuchNodeType does not"
        " exist. (Node ID '#1')"
    ],
    "no_output_node": ["local refused the workflow: Prompt has no outputs"],
    "loadimage_missing_file": [
        "local refused the workflow: Prompt outputs failed validation",
        "  node 1 (LoadImage), needed by output 2:",
        "    - image: Custom validation failed for node: image - Invalid image file:"
        " does_not_exist_fixture.png",
    ],
    "no_prompt_key": ["local refused the workflow: No prompt provided"],
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_recorded_refusal_reads_per_node_and_input(case: str) -> None:
    """The 400 answers recorded from ComfyUI 0.3.64, as ``submit`` prints them."""
    answer = json.loads((FIXTURES / "post_prompt_refusals.json").read_text())[case]["response"]
    assert describe_refusal("local", answer["error"], answer["node_errors"]) == REFUSALS[case]
