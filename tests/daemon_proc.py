"""``comfywatch run`` as a real child process, with its JSON log lines read as they come.

The tests that kill, stop and starve the daemon use this: the child talks to a fake ComfyUI
served by the test's own event loop over a real socket, writes a real SQLite file, and
prints one JSON event per line on stdout. :class:`DaemonProcess` keeps draining that pipe
(so the child never blocks on a full pipe) and lets a test wait, with a bound, for an event.
It also has the small synchronous helpers those tests read the database with: ``sqlite3`` for
a SQLite file, asyncpg (on a thread of its own) for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: Bound for start-up and exit waits: generous, for a loaded 2-core machine. Not a timing
#: assertion: a healthy run takes a fraction of it, it only stops a hang from lasting forever.
WAIT_S = 60.0

Event = dict[str, Any]


class DaemonProcess:
    """One ``python -m comfywatch run`` child and everything it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: list[str]) -> None:
        self.proc = proc
        self.argv = argv
        #: Every stdout line parsed as JSON (a line that is not JSON is kept as ``raw``).
        self.events: list[Event] = []
        self._stderr: list[bytes] = []
        self._changed = asyncio.Condition()
        self._eof = False
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    @classmethod
    async def start(
        cls,
        config: Path,
        *args: str,
        umask: int = -1,
        env: Mapping[str, str] | None = None,
    ) -> DaemonProcess:
        """Start ``comfywatch run --config CONFIG --log-format json ARGS``.

        ``umask`` (when not -1) is set in the child before it runs anything.
        """
        argv = [
            sys.executable,
            "-m",
            "comfywatch",
            "run",
            "--config",
            str(config),
            "--log-format",
            "json",
            *args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            umask=umask,
        )
        return cls(proc, argv)

    # -- output -------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while line := await stream.readline():
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            event: Event = parsed if isinstance(parsed, dict) else {"event": None, "raw": text}
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def _read_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while chunk := await stream.read(65_536):
            self._stderr.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.get("event") == name]

    def describe(self) -> str:
        """The tail of what the child printed, for assertion messages."""
        tail = "\n".join(json.dumps(e) for e in self.events[-25:])
        return f"argv: {self.argv}\nstdout (last lines):\n{tail}\nstderr:\n{self.stderr[-4000:]}"

    async def wait_event(
        self,
        name: str | None,
        where: Callable[[Event], bool] = lambda _: True,
        *,
        start: int = 0,
        timeout_s: float = WAIT_S,
    ) -> int:
        """Wait for an event named ``name`` (at index >= ``start``; ``None``: a line that is
        not JSON, as ``raw``); return its index.

        Fails at once if the process exits without printing it.
        """

        def find() -> int | None:
            for index in range(start, len(self.events)):
                event = self.events[index]
                if event.get("event") == name and where(event):
                    return index
            return None

        try:
            async with asyncio.timeout(timeout_s), self._changed:
                while (found := find()) is None:
                    if self._eof:
                        raise AssertionError(
                            f"the daemon exited ({self.proc.returncode}) without logging "
                            f"{name!r}\n{self.describe()}"
                        )
                    await self._changed.wait()
                return found
        except TimeoutError:
            raise AssertionError(
                f"no {name!r} event within {timeout_s} s\n{self.describe()}"
            ) from None

    async def until(
        self, condition: Awaitable[object], what: str, timeout_s: float = WAIT_S
    ) -> None:
        """Wait for ``condition`` (something outside the daemon); fail if the daemon exits."""
        waiter = asyncio.ensure_future(condition)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (waiter, exited):
                task.cancel()
            await asyncio.gather(waiter, exited, return_exceptions=True)
        if waiter not in done:
            state = "exited" if exited in done else f"was still running after {timeout_s} s"
            raise AssertionError(f"expected: {what}; the daemon {state}\n{self.describe()}")
        waiter.result()

    # -- life cycle ---------------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = WAIT_S) -> int:
        """Wait for the child to exit and its output to be read; return its exit status."""
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(
                f"the daemon did not exit within {timeout_s} s\n{self.describe()}"
            ) from None
        return code

    async def kill(self) -> int:
        """SIGKILL (no clean-up of any kind in the child) and reap it."""
        self.send(signal.SIGKILL)
        return await self.wait()

    async def close(self) -> None:
        """Make sure nothing is left running (for ``finally`` blocks)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def run_cli(*args: str, timeout_s: float = WAIT_S) -> tuple[int, str, str]:
    """Run another ``python -m comfywatch`` command to completion."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfywatch",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- reading the database with the standard library ----------------------------------------


class Rows(list[tuple[Any, ...]]):
    """A query's rows, read to the end (``fetchone``/``fetchall`` as ``sqlite3`` has them)."""

    def fetchone(self) -> tuple[Any, ...] | None:
        return self[0] if self else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self)


class PgConnection:
    """PostgreSQL read the way the tests read a SQLite file: ``execute(sql, params)`` with
    ``?`` placeholders, synchronous, autocommit. One asyncpg connection, on an event loop of
    its own on a thread of its own (the caller's event loop is not touched)."""

    def __init__(self, url: str) -> None:
        import asyncpg

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        dsn = url.replace("+asyncpg", "", 1)
        self._conn = self._run(asyncpg.connect(dsn, timeout=30))

    def _run(self, coro: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout=60)

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Rows:
        return Rows(tuple(row.values()) for row in self.dicts(sql, params))

    def dicts(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        """The rows as column -> value."""
        parts = sql.split("?")
        sql = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))
        return [dict(row.items()) for row in self._run(self._conn.fetch(sql, *params))]

    def close(self) -> None:
        try:
            self._run(self._conn.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


@contextlib.contextmanager
def connect(
    where: Path | str, *, timeout_s: float = 30.0
) -> Iterator[sqlite3.Connection | PgConnection]:
    """The database at ``where`` (a SQLite file's path, or a database URL): for SQLite a
    plain ``sqlite3`` connection in autocommit mode (the test decides on BEGIN), for
    PostgreSQL a :class:`PgConnection`.

    The SQLite file must exist: a test never creates the database behind the daemon's back.
    """
    if isinstance(where, str):
        if not where.startswith("sqlite"):
            pg = PgConnection(where)
            try:
                yield pg
            finally:
                pg.close()
            return
        where = Path(where.split("///", 1)[1])
    conn = sqlite3.connect(
        f"file:{where}?mode=rw", uri=True, timeout=timeout_s, isolation_level=None
    )
    try:
        yield conn
    finally:
        conn.close()


def integrity_problems(conn: sqlite3.Connection | PgConnection) -> list[Any]:
    """What ``PRAGMA integrity_check`` and ``foreign_key_check`` report (empty when sound).
    PostgreSQL checks foreign keys as it writes: nothing to ask it."""
    if isinstance(conn, PgConnection):
        return []
    problems: list[Any] = [
        row for row in conn.execute("PRAGMA integrity_check") if tuple(row) != ("ok",)
    ]
    problems.extend(conn.execute("PRAGMA foreign_key_check"))
    return problems


def job_states(conn: sqlite3.Connection | PgConnection) -> dict[str, str]:
    """prompt_id -> state of every job."""
    return dict(conn.execute("SELECT prompt_id, state FROM jobs"))


def output_count(entry: Mapping[str, Any]) -> int:
    """How many output records a ComfyUI history entry holds (one per list item)."""
    outputs = entry.get("outputs") or {}
    return sum(
        len(items)
        for node in outputs.values()
        for items in node.values()
        if isinstance(items, list)
    )
