"""Fixtures: a fake ComfyUI on a real port, config files in a temp folder, a real SQLite file
or a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from comfywatch.config import Settings, load_settings
from comfywatch.service import Daemon
from comfywatch.store import Store
from comfywatch.testing import FakeComfyUI


class Clock:
    """Clocks the test moves by hand. The wall clock (``now``, also what calling the clock
    gives) stands still unless moved; it starts at the real time, since ComfyUI's stamps
    are real. The monotonic clock runs with the real one (the event loop's sleeps do), plus
    every ``advance``."""

    def __init__(self) -> None:
        import time

        self.now = time.time()
        self._mono_offset_s = 0.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        import time

        return time.monotonic() + self._mono_offset_s

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move forward."""
        self.now += seconds
        self._mono_offset_s += seconds

    def step_wall(self, seconds: float) -> None:
        """The wall clock alone is set (back when negative), as NTP or an operator does."""
        self.now += seconds


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    raise TypeError(value)


def jobs_toml(jobs: list[dict[str, Any]]) -> str:
    out = []
    for job in jobs:
        out.append("[[jobs]]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in job.items())
        out.append("")
    return "\n".join(out)


ADMIN_URL = os.environ.get("COMFYWATCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
"""Where the tests create (and drop) their PostgreSQL databases: a role that may create
databases. ``COMFYWATCH_TEST_PG`` overrides it."""

# The database ``write_config`` writes when the test does not name one: the ``backend``
# fixture's for the test's duration, else a SQLite file beside the config.
_default_database = "sqlite:///comfywatch.db"


async def admin_connect() -> Any:
    """An asyncpg connection to :data:`ADMIN_URL`. Where no PostgreSQL answers, the test
    is skipped, saying so; except on CI (``CI=true``), where that is a failure."""
    asyncpg = pytest.importorskip("asyncpg")
    try:
        return await asyncpg.connect(ADMIN_URL.replace("postgresql://", "postgres://"), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"no PostgreSQL at {ADMIN_URL} (set COMFYWATCH_TEST_PG): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must test PostgreSQL", pytrace=False)
        pytest.skip(message)


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database (its URL, driver left to the store), dropped
    afterwards with whatever is still connected to it."""
    admin = await admin_connect()
    name = f"comfywatch_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database of its own (see :func:`pg_database`)."""
    async with pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test once per database backend: the URL of a SQLite file
    (``tmp_path/comfywatch.db``, not created) or of a fresh PostgreSQL database (as
    ``postgresql+asyncpg://``, the form a config names). ``write_config`` writes it unless
    the test names another database."""
    global _default_database
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'comfywatch.db'}"
        else:
            url = await stack.enter_async_context(pg_database())
            url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        _default_database = url
        try:
            yield url
        finally:
            _default_database = "sqlite:///comfywatch.db"


def write_config(
    folder: Path,
    servers: dict[str, str | dict[str, Any]],
    jobs: list[dict[str, Any]] | None = None,
    *,
    daemon: dict[str, Any] | None = None,
    extra: str = "",
) -> Path:
    """Write ``comfywatch.toml`` (and an empty jobs.d) into ``folder``; return its path."""
    settings = {
        "database": _default_database,
        "poll_interval_s": 0.05,
        "jobs_dir": "jobs.d",
        "not_found_after_s": 60,
    }
    settings.update(daemon or {})
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()] + [""]
    for name, server in servers.items():
        table = {"url": server} if isinstance(server, str) else server
        lines.append(f"[servers.{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        lines.append("")
    lines.append(textwrap.dedent(extra))
    lines.append(jobs_toml(jobs or []))
    (folder / "jobs.d").mkdir(exist_ok=True)
    path = folder / "comfywatch.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(run_time_s=0.01) as server:
        yield server


@pytest.fixture
async def fake2() -> AsyncIterator[FakeComfyUI]:
    """A second server, for tests of several at once."""
    async with FakeComfyUI(run_time_s=0.01) as server:
        yield server


DaemonFactory = Callable[[Path], Daemon]


@pytest.fixture
async def make_daemon(clock: Clock) -> AsyncIterator[Callable[[Path], Any]]:
    """Build a started Daemon (migrated, jobs registered) whose clock the test controls."""
    made: list[tuple[Daemon, Store]] = []

    async def build(config: Path) -> Daemon:
        settings: Settings = load_settings(config)
        store = Store.open(settings.daemon.database_url)
        daemon = Daemon(settings, store=store, clock=clock)
        await daemon.start()
        made.append((daemon, store))
        return daemon

    yield build
    for daemon, store in made:
        await daemon.poller.close()
        await daemon.dispatcher.close()
        await store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """The SQLite file of the ``store`` fixture."""
    return tmp_path / "db.sqlite"


@pytest.fixture
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    """A migrated store on a fresh SQLite file; in a test that uses ``backend``, on the
    backend's database."""
    url = "sqlite:///" + str(db_path)
    if "backend" in request.fixturenames:
        url = request.getfixturevalue("backend")
    db = Store.open(url)
    await db.migrate()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    """Start webhook receivers (``Receiver(...)`` arguments); all stopped afterwards."""
    from .receiver import Receiver

    started: list[Receiver] = []

    async def start(*args: Any, **kwargs: Any) -> Receiver:
        receiver = Receiver(*args, **kwargs)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()
