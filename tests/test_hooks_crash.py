"""Completion hooks across SIGKILL: each delivered at least once, none before its commit.

``comfywatch run`` runs as a real child process (``tests/daemon_proc.py``) against the fake
ComfyUI and a webhook receiver, both served by the test's own event loop on 127.0.0.1, and
a command hook (a Python script). It is killed with SIGKILL again and again while jobs finish
and hooks fire, then left to finish with ``--until-done``.

Both kinds of receiver look at the database (the standard library's ``sqlite3``, read-only,
a connection of their own: WAL lets them read while the daemon writes) at the moment a
delivery reaches them. The job the event names must already be terminal there, in the state
the event reports, with a delivery row for this hook under this ``webhook-id``: so no hook
is ever sent for a terminal state that was not committed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from comfywatch.testing import FakeComfyUI, Outcome

from .conftest import jobs_toml, toml_value, write_config
from .daemon_proc import DaemonProcess, connect, integrity_problems, job_states

ACTIVE = ("registered", "queued", "running")
TERMINAL = frozenset(
    {"success", "error", "interrupted", "cancelled", "lost", "not_found", "timeout"}
)

#: Short enough that retries happen within the test.
SCHEDULE_S = [0.05, 0.1, 0.2, 0.5, 1, 1, 1, 1]
#: The receiver answers 500 to this share of requests...
FAIL_RATE = 0.3
#: ...but to no webhook-id more than this many times. The daemon records at most that many
#: failed attempts per delivery (fewer than the schedule has delays), so none can go dead.
MAX_FAILURES = 3

WEBHOOKS = ("notify", "audit")
COMMANDS = ("archive",)
#: The terminal states each hook is configured for.
ON: dict[str, frozenset[str]] = {
    "notify": TERMINAL,  # `on` left out: every terminal state
    "audit": frozenset({"success"}),
    "archive": frozenset({"error", "interrupted"}),
}
DEFAULT_HOOKS = ("notify", "audit", "archive")

KILLED_LIVES = 12
BATCH = 8

#: What a delivery row says, read in the receivers: (prompt_id, job state, hook, event_type).
COMMITTED_SQL = (
    "SELECT j.prompt_id, j.state, d.hook, d.event_type FROM hook_deliveries d"
    " JOIN jobs j ON j.id = d.job_id WHERE d.event_id = ?"
)

#: The command hook. At the moment it runs it reads the committed delivery row its event id
#: names, then appends one JSON line about this attempt to a log. The first attempt of about
#: half the event ids fails (exit status 1), so commands are retried too.
ARCHIVE_HOOK = f"""
import hashlib, json, os, sqlite3, sys, zlib

db, log_path = sys.argv[1], sys.argv[2]
body = sys.stdin.buffer.read()
event = json.loads(body)
event_id = os.environ["COMFYWATCH_EVENT_ID"]
conn = sqlite3.connect(f"file:{{db}}?mode=ro", uri=True, timeout=30)
try:
    row = conn.execute({COMMITTED_SQL!r}, (event_id,)).fetchone()
finally:
    conn.close()
try:
    with open(log_path, "rb") as earlier:
        first = event_id.encode() not in earlier.read()
except FileNotFoundError:
    first = True
code = 1 if first and zlib.crc32(event_id.encode()) % 2 == 0 else 0
line = {{
    "event_id": event_id,
    "server": os.environ["COMFYWATCH_SERVER"],
    "prompt_id": os.environ["COMFYWATCH_PROMPT_ID"],
    "state": os.environ["COMFYWATCH_STATE"],
    "payload": [event["type"], event["data"]["prompt_id"], event["data"]["state"]],
    "committed": row,
    "body_sha256": hashlib.sha256(body).hexdigest(),
    "exit": code,
}}
fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, (json.dumps(line) + "\\n").encode())
os.close(fd)
sys.exit(code)
"""


def committed_problem(db: Path, hook: str, event_id: str, payload: dict[str, Any]) -> str | None:
    """What is wrong with sending ``payload`` now, judged by what the database holds."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        row = conn.execute(COMMITTED_SQL, (event_id,)).fetchone()
    data = payload.get("data") or {}
    state = data.get("state")
    sent = (data.get("prompt_id"), state, hook, payload.get("type"))
    if row is None:
        return f"{hook} {event_id} for {sent}: no committed delivery row"
    if tuple(row) != sent:
        return f"{hook} {event_id}: sent {sent}, committed {tuple(row)}"
    if state not in TERMINAL or payload.get("type") != f"job.{state}":
        return f"{hook} {event_id}: sent {sent} for a state that is not terminal"
    return None


@dataclass
class Hit:
    """One request the receiver got, and what it answered."""

    hook: str
    event_id: str
    body: bytes
    payload: dict[str, Any] | None
    status: int
    held: bool = False


class Receiver:
    """Webhook receiver on a real port: verifies, checks the database, answers mostly 200.

    In hold mode it answers nothing until :meth:`unhold`: the test kills the daemon while
    it waits for the answer, so the delivery was sent but its result never recorded.
    """

    def __init__(self, db: Path, secrets: dict[str, str], rng: random.Random) -> None:
        self.db = db
        self.secrets = secrets
        self.rng = rng
        self.hits: list[Hit] = []
        self.problems: list[str] = []
        self.failures: Counter[str] = Counter()
        self.holding = False
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/{hook}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, hook: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{hook}"

    def hold(self) -> None:
        self.holding = True
        self.held.clear()
        self._release.clear()

    def unhold(self) -> None:
        self.holding = False
        self._release.set()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except ConnectionError:  # the daemon was killed while it sent the body
            return web.Response(status=400)
        hook = request.match_info["hook"]
        event_id = request.headers.get("webhook-id", "")
        payload: dict[str, Any] | None = None
        try:
            payload = Webhook(self.secrets[hook]).verify(body, dict(request.headers))
        except (WebhookVerificationError, KeyError, ValueError) as exc:
            self.problems.append(f"{hook} {event_id}: does not verify: {exc!r}")
        if payload is not None:
            problem = await asyncio.to_thread(committed_problem, self.db, hook, event_id, payload)
            if problem is not None:
                self.problems.append(problem)
        if self.holding:
            self.hits.append(Hit(hook, event_id, body, payload, 503, held=True))
            self.held.set()
            await self._release.wait()  # the daemon is dead by then: nobody hears this
            return web.Response(status=503)
        status = 200
        if self.failures[event_id] < MAX_FAILURES and self.rng.random() < FAIL_RATE:
            self.failures[event_id] += 1
            status = 500
        self.hits.append(Hit(hook, event_id, body, payload, status))
        return web.Response(status=status, text="ok" if status == 200 else "try again")


@dataclass
class Plan:
    """How each prompt ends and which hooks its job names."""

    outcome: dict[str, Outcome] = field(default_factory=dict)
    hooks: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def expected(self, prompt_id: str, state: str) -> set[str]:
        """The hooks owed when the job ends in ``state``."""
        return {hook for hook in self.hooks[prompt_id] if state in ON[hook]}


def drop_in(folder: Path, name: str, plan: Plan, prompt_ids: list[str]) -> None:
    """Register jobs the documented way: a hidden file renamed into jobs.d."""
    jobs: list[dict[str, Any]] = []
    for pid in prompt_ids:
        job: dict[str, Any] = {"server": "local", "prompt_id": pid}
        if plan.hooks[pid] != DEFAULT_HOOKS:
            job["hooks"] = list(plan.hooks[pid])
        jobs.append(job)
    tmp = folder / "jobs.d" / f".{name}.tmp"
    tmp.write_text(jobs_toml(jobs))
    tmp.rename(folder / "jobs.d" / f"{name}.toml")


def check_outbox(
    conn: sqlite3.Connection, plan: Plan, event_ids: dict[tuple[str, str], str]
) -> Counter[str]:
    """The outbox agrees with the jobs: every terminal job has exactly the delivery rows its
    hooks owe for its state (written with it), no other job has any, and an event id never
    changes once written. Returns the delivery rows counted by state."""
    assert integrity_problems(conn) == []
    rows = conn.execute(
        "SELECT j.prompt_id, j.state, d.hook, d.event_id, d.event_type, d.state"
        " FROM hook_deliveries d JOIN jobs j ON j.id = d.job_id"
    ).fetchall()
    owed: dict[str, set[str]] = defaultdict(set)
    for pid, job_state, hook, event_id, event_type, state in rows:
        assert job_state not in ACTIVE, f"delivery {hook} for {pid} while it is {job_state}"
        assert event_type == f"job.{job_state}", (pid, hook, event_type)
        assert hook not in owed[pid], f"two {hook} deliveries for {pid}"
        owed[pid].add(hook)
        assert event_ids.setdefault((pid, hook), event_id) == event_id, (pid, hook)
        assert state in ("pending", "delivered"), (pid, hook, state)
    for pid, state in job_states(conn).items():
        if state not in ACTIVE:
            assert state == plan.outcome[pid], (pid, state)
            assert owed[pid] == plan.expected(pid, state), (pid, state, owed[pid])
    return Counter(row[5] for row in rows)


@pytest.mark.slow
async def test_sigkill_while_hooks_fire_delivers_each_once_or_more_never_early(
    tmp_path: Path, fake: FakeComfyUI
) -> None:
    """SIGKILL at seeded random moments while jobs finish and hooks fire, and while webhook
    requests wait for their answer, then ``--until-done``. After every kill the outbox
    agrees with the jobs. At the end every hook owed by every terminal job was answered 2xx
    (or exit 0) at least once; every request for one (job, hook) carried the same
    ``webhook-id`` and body; every delivery row is delivered; every body verifies; and
    no delivery reached a receiver before its job's terminal state was committed."""
    rng = random.Random(20261128)
    db = tmp_path / "comfywatch.db"
    secrets = {name: "whsec_" + base64.b64encode(os.urandom(32)).decode() for name in WEBHOOKS}
    for name, secret in secrets.items():
        (tmp_path / f"{name}.secret").write_text(secret + "\n")
    archive_log = tmp_path / "archive.log"
    archive_script = tmp_path / "archive_hook.py"
    archive_script.write_text(ARCHIVE_HOOK)
    archive_argv = toml_value(
        [sys.executable, "-I", "-S", str(archive_script), str(db), str(archive_log)]
    )
    plan = Plan()
    event_ids: dict[tuple[str, str], str] = {}  # (prompt_id, hook) -> event id, once written
    kills_with_pending = 0

    def submit_batch(size: int) -> list[str]:
        batch = []
        for _ in range(size):
            roll = rng.random()
            outcome: Outcome = (
                "success" if roll < 0.6 else "error" if roll < 0.85 else "interrupted"
            )
            pid = fake.submit(outcome=outcome, run_time_s=rng.uniform(0.005, 0.04))
            roll = rng.random()
            plan.outcome[pid] = outcome
            plan.hooks[pid] = DEFAULT_HOOKS if roll < 0.7 else ("notify",) if roll < 0.85 else ()
            batch.append(pid)
        return batch

    receiver = Receiver(db, secrets, random.Random(rng.random()))
    lives: list[DaemonProcess] = []
    await receiver.start()
    try:
        extra = textwrap.dedent(
            f"""\
            [hooks.notify]
            type = "webhook"
            url = {toml_value(receiver.url("notify"))}
            secret_file = {toml_value(str(tmp_path / "notify.secret"))}
            timeout_s = 10
            retry_schedule_s = {toml_value(SCHEDULE_S)}

            [hooks.audit]
            type = "webhook"
            url = {toml_value(receiver.url("audit"))}
            secret_file = {toml_value(str(tmp_path / "audit.secret"))}
            on = ["success"]
            timeout_s = 10
            retry_schedule_s = {toml_value(SCHEDULE_S)}

            [hooks.archive]
            type = "command"
            argv = {archive_argv}
            on = ["error", "interrupted"]
            timeout_s = 30
            retry_schedule_s = {toml_value(SCHEDULE_S)}
            """
        )
        config = write_config(
            tmp_path,
            {"local": fake.url},
            daemon={"default_hooks": list(DEFAULT_HOOKS)},
            extra=extra,
        )
        for life in range(KILLED_LIVES):
            # The fake ComfyUI holds the batch until the daemon runs, so kills land while
            # jobs finish and their hooks fire.
            fake.pause()
            drop_in(tmp_path, f"life-{life:02}", plan, submit_batch(BATCH))
            proc = await DaemonProcess.start(config)
            lives.append(proc)
            kind = life % 4
            if kind == 0:
                # Any moment from the very start: imports, migration, registration, ticks.
                fake.resume()
                await asyncio.sleep(rng.uniform(0.05, 3.0))  # the random kill moment
            elif kind == 1:
                # Soon after start-up: the first ticks, the deliveries left pending re-sent.
                await proc.wait_event("daemon_started")
                fake.resume()
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # the random kill moment
            elif kind == 2:
                # Some moment after the first job of this life was recorded.
                started = await proc.wait_event("daemon_started")
                fake.resume()
                await proc.wait_event("job_finished", start=started)
                await asyncio.sleep(rng.uniform(0.0, 0.6))  # the random kill moment
            else:
                # While webhook requests wait for their answers (sent, never recorded), after
                # the first job of this life was recorded.
                receiver.hold()
                started = await proc.wait_event("daemon_started")
                fake.resume()
                await proc.wait_event("job_finished", start=started)
                await proc.until(receiver.held.wait(), "a webhook request reached the receiver")
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # the random kill moment
            code = await proc.kill()
            receiver.unhold()
            assert code == -signal.SIGKILL, f"the daemon exited on its own\n{proc.describe()}"
            if db.exists():
                with connect(db) as conn:
                    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                    # Migrations are one transaction: the whole schema is there or none.
                    if (
                        "hook_deliveries" in tables
                        and check_outbox(conn, plan, event_ids)["pending"]
                    ):
                        kills_with_pending += 1
            fake.resume()

        fake.pause()
        drop_in(tmp_path, "last", plan, submit_batch(BATCH))
        proc = await DaemonProcess.start(config, "--until-done")
        lives.append(proc)
        await proc.wait_event("daemon_started")
        fake.resume()
        assert await proc.wait() == 0, proc.describe()
        assert proc.named("all_done")
    finally:
        receiver.unhold()
        for proc in lives:
            await proc.close()
        await receiver.stop()

    # -- the database: every job ended as it ran, every delivery owed is delivered --------
    with connect(db) as conn:
        assert check_outbox(conn, plan, event_ids) == Counter({"delivered": len(event_ids)})
        assert job_states(conn) == plan.outcome
        stored_hooks = {
            pid: tuple(json.loads(hooks))
            for pid, hooks in conn.execute("SELECT prompt_id, hooks FROM jobs")
        }
        assert stored_hooks == plan.hooks
    owed = {
        (pid, hook) for pid, outcome in plan.outcome.items() for hook in plan.expected(pid, outcome)
    }
    assert set(event_ids) == owed

    # -- webhooks -----------------------------------------------------------------------
    assert receiver.problems == []  # each verified; each job committed terminal on arrival
    by_key: dict[tuple[str, str], list[Hit]] = defaultdict(list)
    for hit in receiver.hits:
        assert hit.payload is not None
        by_key[(hit.payload["data"]["prompt_id"], hit.hook)].append(hit)
    assert set(by_key) == {key for key in owed if key[1] in WEBHOOKS}
    for key, hits in by_key.items():
        assert {hit.event_id for hit in hits} == {event_ids[key]}, key  # one webhook-id
        assert len({hit.body for hit in hits}) == 1, key  # and the same body on every retry
        assert any(hit.status == 200 for hit in hits), key  # answered 2xx at least once
        payload = hits[0].payload
        assert payload is not None
        assert payload["data"]["state"] == plan.outcome[key[0]]
        assert payload["data"]["hooks"] == list(plan.hooks[key[0]])

    # -- the command hook ---------------------------------------------------------------
    lines = [json.loads(line) for line in archive_log.read_text().splitlines()]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        runs[(line["prompt_id"], "archive")].append(line)
    assert set(runs) == {key for key in owed if key[1] in COMMANDS}
    for key, attempts in runs.items():
        pid = key[0]
        state = plan.outcome[pid]
        assert {a["event_id"] for a in attempts} == {event_ids[key]}, key
        assert len({a["body_sha256"] for a in attempts}) == 1, key
        assert any(a["exit"] == 0 for a in attempts), key
        for attempt in attempts:
            assert attempt["server"] == "local" and attempt["state"] == state, attempt
            assert attempt["payload"] == [f"job.{state}", pid, state], attempt
            # Read by the command while it ran: committed before it started.
            assert attempt["committed"] == [pid, state, "archive", f"job.{state}"], attempt

    # -- the test exercised what it claims ----------------------------------------------
    assert len(lives) == KILLED_LIVES + 1
    # Held requests: the daemon died waiting for the answer, so the delivery was pending at
    # the kill and was sent again after a restart, under the same webhook-id.
    held = {hit.event_id for hit in receiver.hits if hit.held}
    assert len(held) >= KILLED_LIVES // 4
    assert kills_with_pending >= KILLED_LIVES // 4
    hits_per_id = Counter(hit.event_id for hit in receiver.hits)
    assert all(hits_per_id[event_id] >= 2 for event_id in held)
    assert sum(1 for hit in receiver.hits if hit.status == 500) >= 5  # retries on failure
    assert sum(1 for line in lines if line["exit"] != 0) >= 3  # failed commands retried
    assert {plan.outcome[pid] for pid, _ in runs} == {"error", "interrupted"}
