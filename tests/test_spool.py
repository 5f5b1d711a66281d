"""The spool in-process: real files in a temp jobs_dir, real SQLite, a fake ComfyUI.

Each test drives ``Spool.ingest`` (what the daemon calls once per loop pass) and the
poller's ``tick`` by hand, then looks at the files and the rows.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from comfywatch.config import load_settings
from comfywatch.errors import ConfigError
from comfywatch.service import Daemon
from comfywatch.spool.ingest import BATCH_FILES, BATCH_JOBS
from comfywatch.spool.parse import read_spool_file
from comfywatch.store import JobFilter, JobRecord
from comfywatch.testing import FakeComfyUI

from .conftest import Clock, jobs_toml, write_config

MakeDaemon = Callable[[Path], Awaitable[Daemon]]

HOOK = """
[hooks.mark]
type = "command"
argv = ["true"]
retry_schedule_s = [0.01]
"""


def job(prompt_id: str, **extra: Any) -> dict[str, Any]:
    return {"server": "local", "prompt_id": prompt_id, **extra}


def drop(spool: Path, name: str, text: str) -> Path:
    """Writes ``text`` as a dotfile and renames it in, as producers must."""
    tmp = spool / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    path = spool / name
    tmp.rename(path)
    return path


async def ingest(daemon: Daemon, clock: Clock, budget_s: float = 60.0) -> list[str]:
    """One pass of the spool; the prompt ids newly registered."""
    added = await daemon.ingest_spool(budget_s=budget_s)
    return sorted(j.prompt_id for j in added)


async def records(daemon: Daemon) -> dict[str, JobRecord]:
    found = await daemon.store.jobs(JobFilter(), with_deliveries=True)
    return {r.job.prompt_id: r for r in found}


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def spool_count(daemon: Daemon, result: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "comfywatch_spool_files_total", {"result": result}
    )
    return value or 0.0


async def test_each_file_is_read_once_then_moved_to_done(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    drop(spool, "b.toml", jobs_toml([job("b1"), job("b2", labels={"k": "v"})]))
    drop(spool, "a.toml", jobs_toml([job("a1")]))
    drop(spool, "empty.toml", "")

    assert await ingest(daemon, clock) == ["a1", "b1", "b2"]
    assert files(spool) == ["done"]
    assert files(spool / "done") == ["a.toml", "b.toml", "empty.toml"]
    assert await ingest(daemon, clock) == []  # nothing is read twice
    assert spool_count(daemon, "registered") == 3
    assert spool_count(daemon, "rejected") == 0

    rows = await records(daemon)
    assert set(rows) == {"a1", "b1", "b2"}
    assert rows["b2"].job.labels == {"k": "v"}
    assert rows["b2"].job.source == str(spool / "b.toml")
    assert rows["a1"].job.state == "registered"


async def test_dotfiles_temp_files_and_other_names_are_left_alone(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    broken = "this is not toml ["
    ignored = [".a.toml", ".b.tmp", "c.toml.tmp", "notes.txt", "d.toml~", "e.toml.sample"]
    for name in ignored:
        (spool / name).write_text(broken, encoding="utf-8")
    assert await ingest(daemon, clock) == []
    assert files(spool) == sorted(ignored)
    assert spool_count(daemon, "rejected") == 0


async def test_bad_files_are_set_aside_with_the_loader_message_and_block_nothing(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """Each kind of mistake moves its file to rejected/ with NAME.error holding the
    file:line: key: message the config loader gives; the good files around them register."""
    config = write_config(tmp_path, {"local": fake.url}, extra=HOOK)
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    bad = {
        "b-syntax.toml": '[[jobs]]\nserver = "local\n',
        "c-unknown-key.toml": '[[jobs]]\nserver = "local"\nprompt_id = "x"\npriority = 1\n',
        "d-unknown-server.toml": '[[jobs]]\nserver = "gpu-9"\nprompt_id = "x"\n',
        "e-unknown-hook.toml": '[[jobs]]\nserver = "local"\nprompt_id = "x"\nhooks = ["mrak"]\n',
        "f-bad-prompt-id.toml": '[[jobs]]\nserver = "local"\nprompt_id = "a\\u0007b"\n',
        "g-not-only-jobs.toml": "[daemon]\npoll_interval_s = 1\n",
        "h-not-utf8.toml": "",
    }
    settings = load_settings(config)
    expected: dict[str, str] = {}
    for name, text in bad.items():
        path = drop(spool, name, text)
        if name == "h-not-utf8.toml":
            path.write_bytes(b'[[jobs]]\nserver = "local"\nprompt_id = "\xff"\n')
        with pytest.raises(ConfigError) as info:
            read_spool_file(path, settings)
        expected[name] = str(info.value)
    drop(spool, "a-good.toml", jobs_toml([job("good-1")]))
    drop(spool, "z-good.toml", jobs_toml([job("good-2", hooks=["mark"])]))

    with capture_logs() as logs:
        assert await ingest(daemon, clock) == ["good-1", "good-2"]
    assert files(spool / "done") == ["a-good.toml", "z-good.toml"]
    stems = [name.removesuffix(".toml") for name in bad]
    assert files(spool / "rejected") == sorted(
        [f"{s}.toml" for s in stems] + [f"{s}.error" for s in stems]
    )
    for name, message in expected.items():
        error = (spool / "rejected" / name.replace(".toml", ".error")).read_text()
        assert error == message + "\n"
        assert error.startswith(f"{spool / name}:")
    assert "jobs[0].priority: unknown key" in expected["c-unknown-key.toml"]
    assert (
        ":4: jobs[0].hooks[0]: unknown hook 'mrak' (did you mean 'mark'?)"
        in expected["e-unknown-hook.toml"]
    )
    rejected = [e for e in logs if e["event"] == "spool_file_rejected"]
    assert sorted(e["file"] for e in rejected) == sorted(bad)
    assert spool_count(daemon, "rejected") == len(bad)
    assert spool_count(daemon, "registered") == 2
    assert set(await records(daemon)) == {"good-1", "good-2"}


async def test_a_fixed_file_renamed_back_in_registers(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    drop(spool, "batch.toml", '[[jobs]]\nserver = "lokal"\nprompt_id = "p"\n')
    assert await ingest(daemon, clock) == []
    rejected = spool / "rejected" / "batch.toml"
    rejected.write_text(rejected.read_text().replace("lokal", "local"))
    rejected.rename(spool / "batch.toml")
    assert await ingest(daemon, clock) == ["p"]
    assert files(spool / "done") == ["batch.toml"]
    assert files(spool / "rejected") == ["batch.error"]  # the old reason stays until pruned


async def test_names_in_done_and_rejected_are_never_overwritten(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    for round_ in range(3):
        drop(spool, "same.toml", jobs_toml([job(f"p{round_}")]))
        drop(spool, "bad.toml", f"not toml {round_} [")
        await ingest(daemon, clock)
    (spool / "rejected" / "lone.error").write_text("from before\n")
    drop(spool, "lone.toml", "[")  # its .error name is taken: both get a suffix
    await ingest(daemon, clock)

    assert files(spool / "done") == ["same.1.toml", "same.2.toml", "same.toml"]
    assert [(spool / "done" / n).read_text() for n in files(spool / "done")] == [
        jobs_toml([job("p1")]),
        jobs_toml([job("p2")]),
        jobs_toml([job("p0")]),
    ]
    assert files(spool / "rejected") == [
        "bad.1.error",
        "bad.1.toml",
        "bad.2.error",
        "bad.2.toml",
        "bad.error",
        "bad.toml",
        "lone.1.error",
        "lone.1.toml",
        "lone.error",
    ]
    assert (spool / "rejected" / "bad.2.toml").read_text() == "not toml 2 ["
    assert (spool / "rejected" / "lone.error").read_text() == "from before\n"


async def test_keep_registered_files_false_deletes_them(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url}, daemon={"keep_registered_files": False})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    drop(spool, "a.toml", jobs_toml([job("a")]))
    drop(spool, "b.toml", "[")
    assert await ingest(daemon, clock) == ["a"]
    assert files(spool) == ["rejected"]  # a bad file is still kept, to be read and fixed
    assert files(spool / "rejected") == ["b.error", "b.toml"]


async def test_registering_again_updates_labels_and_never_refires_or_resurrects(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """The same job in a later file (or the same file put back in the inbox, as after a
    crash between commit and move) is an upsert: labels change; the state, the hook
    deliveries and the registration time do not."""
    fake.pause()
    done_id, waiting_id = fake.submit(), fake.submit()
    fake.delete_from_queue([waiting_id])  # it will never run: it stays "registered"
    fake.resume()
    await fake.wait_finished(done_id)
    config = write_config(tmp_path, {"local": fake.url}, extra=HOOK)
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    first = drop(spool, "first.toml", jobs_toml([job(done_id, hooks=["mark"]), job(waiting_id)]))
    assert await ingest(daemon, clock) == sorted([done_id, waiting_id])
    await daemon.poller.tick()
    await daemon.dispatcher.run_once()
    before = await records(daemon)
    assert before[done_id].job.state == "success"
    assert [d.state for d in before[done_id].deliveries] == ["delivered"]

    # The same file again: nothing new, nothing fired, nothing changed.
    (spool / "done" / "first.toml").rename(first)
    assert await ingest(daemon, clock) == []
    assert await records(daemon) == before

    # New labels for both, and another hook asked for the finished one.
    clock.advance(5)
    drop(
        spool,
        "second.toml",
        jobs_toml(
            [job(done_id, labels={"batch": "b2"}, hooks=[]), job(waiting_id, labels={"n": "2"})]
        ),
    )
    assert await ingest(daemon, clock) == []
    await daemon.poller.tick()
    await daemon.dispatcher.run_once()
    after = await records(daemon)
    assert after[done_id].job.labels == {"batch": "b2"}
    assert after[waiting_id].job.labels == {"n": "2"}
    for prompt_id in (done_id, waiting_id):
        old, new = before[prompt_id].job, after[prompt_id].job
        assert (new.state, new.registered_at, new.source) == (
            old.state,
            old.registered_at,
            old.source,
        )
    assert after[done_id].job.hooks == ("mark",)  # a finished job's hooks are history
    assert after[done_id].deliveries == before[done_id].deliveries


async def test_batches_are_bounded(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    """A pass with no time left reads one batch: at most BATCH_FILES files, and no more
    files once BATCH_JOBS jobs are in (a bigger file is never split). The rest waits."""
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    daemon = await make_daemon(config)
    big = [job(f"big-{i}") for i in range(BATCH_JOBS + 10)]
    drop(spool, "0-big.toml", jobs_toml(big))
    for index in range(BATCH_FILES + 5):
        drop(spool, f"1-{index:04}.toml", jobs_toml([job(f"small-{index}")]))

    assert len(await ingest(daemon, clock, budget_s=0)) == len(big)
    assert daemon.spool.waiting == BATCH_FILES + 5
    assert len(await ingest(daemon, clock, budget_s=0)) == BATCH_FILES
    assert daemon.spool.waiting == 5
    assert len(await ingest(daemon, clock, budget_s=0)) == 5
    assert daemon.spool.waiting == 0
    assert len(files(spool / "done")) == BATCH_FILES + 6


async def test_a_file_that_cannot_be_moved_stays_registered_and_is_not_reread_at_once(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url})
    spool = tmp_path / "jobs.d"
    (spool / "done").write_text("a file where the folder should be")
    daemon = await make_daemon(config)
    drop(spool, "a.toml", jobs_toml([job("a")]))
    with capture_logs() as logs:
        assert await ingest(daemon, clock) == ["a"]
        assert await ingest(daemon, clock) == []
    [stuck] = [e for e in logs if e["log_level"] == "error"]
    assert stuck["event"] == "spool_file_stuck" and stuck["file"] == "a.toml"
    assert "registered, but cannot move it" in stuck["error"]
    assert files(spool) == ["a.toml", "done"]  # its jobs are in; it waits for a retry
    assert set(await records(daemon)) == {"a"}


async def test_missing_or_unlistable_inbox_is_reported_once(
    tmp_path: Path, fake: FakeComfyUI, make_daemon: MakeDaemon, clock: Clock
) -> None:
    config = write_config(tmp_path, {"local": fake.url}, daemon={"jobs_dir": "nowhere"})
    daemon = await make_daemon(config)
    with capture_logs() as logs:
        for _ in range(3):
            assert await ingest(daemon, clock) == []
        (tmp_path / "nowhere").write_text("")
        for _ in range(3):
            assert await ingest(daemon, clock) == []
        os.unlink(tmp_path / "nowhere")
        (tmp_path / "nowhere").mkdir()
        drop(tmp_path / "nowhere", "a.toml", jobs_toml([job("a")]))
        assert await ingest(daemon, clock) == ["a"]
    problems = [e["problem"] for e in logs if e["event"] == "spool_unavailable"]
    assert problems == ["does not exist", "is not a directory"]
