"""Change notification on PostgreSQL: ``NOTIFY`` sent by the store in the transaction of
the change, ``LISTEN`` on a connection of its own (asyncpg, outside the pool).

Channels and their payloads:

- ``comfywatch_registered``: jobs were registered (the payload: their ids, comma-separated);
- ``comfywatch_deliveries``: hook deliveries became due (made by a terminal change, or
  queued again by ``comfywatch hooks retry``); no payload;
- ``comfywatch_jobs``: a job became terminal (the payload: ``server/prompt_id``).

PostgreSQL delivers a notification only once its transaction commits, so a listener never
hears of a change it cannot read yet. Notifications are hints: whoever listens still looks
at the database now and then (a lost connection loses what was sent meanwhile). SQLite
has no such thing; everything here does nothing there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

log = structlog.get_logger("comfywatch.store")

REGISTERED = "comfywatch_registered"
DELIVERIES = "comfywatch_deliveries"
JOBS = "comfywatch_jobs"
CHANNELS = (REGISTERED, DELIVERIES, JOBS)

#: PostgreSQL refuses payloads of 8000 bytes or more: longer lists are split.
MAX_PAYLOAD = 7_000
#: Delays between attempts to listen again after the connection was lost.
RECONNECT_S = (0.5, 1.0, 2.0, 5.0, 10.0)
CONNECT_TIMEOUT_S = 10.0
#: How long closing a ThreadListener waits for its thread.
CLOSE_WAIT_S = 1.0

Handler = Callable[[str], None]


async def notify(session: AsyncSession, channel: str, payloads: Iterable[str] = ("",)) -> None:
    """``pg_notify`` each of ``payloads`` on ``channel`` in ``session``'s transaction (sent
    when it commits, identical ones once); nothing on other databases."""
    if session.get_bind().dialect.name != "postgresql":
        return
    values = list(dict.fromkeys(payloads))
    if values:
        await session.execute(
            text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": channel, "payloads": values},
        )


def joined(items: Sequence[str], sep: str = ",") -> list[str]:
    """``items`` joined by ``sep`` into payloads short enough for ``pg_notify``."""
    payloads: list[str] = []
    current = ""
    for item in items:
        if current and len(current) + len(sep) + len(item) > MAX_PAYLOAD:
            payloads.append(current)
            current = ""
        current = f"{current}{sep}{item}" if current else item
    if current:
        payloads.append(current)
    return payloads


def listen_url(url: str) -> str | None:
    """The asyncpg DSN of a configured PostgreSQL URL; ``None`` for other databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """``LISTEN`` on the channels of ``handlers`` over one connection of its own, kept up:
    a lost connection is made again (with growing delays), logged once while it is down.
    ``connected`` is set while listening; ``on_connected`` is called each time listening
    (re)starts, for the caller to look at what it may have missed."""

    def __init__(
        self,
        url: str,
        handlers: Mapping[str, Handler],
        *,
        on_connected: Callable[[], None] | None = None,
        quiet: bool = False,
    ) -> None:
        dsn = listen_url(url)
        if dsn is None:
            raise ValueError("LISTEN needs PostgreSQL")
        self._dsn = dsn
        self._handlers = dict(handlers)
        self._on_connected = on_connected
        self._quiet = quiet
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set."""
        import asyncpg  # type: ignore[import-untyped]

        failures = 0
        down_logged = False
        while not stop.is_set():
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
                self._lost.clear()
                conn.add_termination_listener(lambda _c: self._lost.set())
                for channel in self._handlers:
                    await conn.add_listener(channel, self._dispatch)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                if not down_logged and not self._quiet:
                    down_logged = True
                    log.warning("database_listen_failed", error=str(exc)[:300], fallback="polling")
                delay = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                failures += 1
                await _wait_any(stop, None, delay)
                continue
            if down_logged and not self._quiet:
                log.info("database_listen_restored")
            failures, down_logged = 0, False
            self.connected.set()
            if self._on_connected is not None:
                self._on_connected()
            try:
                await _wait_any(stop, self._lost, None)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    conn.terminate()
            if not stop.is_set() and not self._quiet:
                log.warning("database_listen_failed", error="connection lost", fallback="polling")
                down_logged = True

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        handler = self._handlers.get(channel)
        if handler is not None:
            handler(payload)


async def _wait_any(
    first: asyncio.Event, second: asyncio.Event | None, delay_s: float | None
) -> None:
    """Until either event is set, or ``delay_s`` passed."""
    waiters = [asyncio.ensure_future(first.wait())]
    if second is not None:
        waiters.append(asyncio.ensure_future(second.wait()))
    try:
        await asyncio.wait(waiters, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.wait(waiters)


class ThreadListener:
    """A :class:`ChangeListener` on a thread of its own, for synchronous callers (the
    command line): ``handlers`` run on that thread."""

    def __init__(self, url: str, handlers: Mapping[str, Handler]) -> None:
        self._url = url
        self._handlers = handlers
        self._ready = threading.Event()
        self._listener: ChangeListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="comfywatch-listen", daemon=True)

    def start(self, *, ready_within_s: float = CONNECT_TIMEOUT_S) -> bool:
        """Start listening; whether it listens within ``ready_within_s``."""
        self._thread.start()
        return self._ready.wait(ready_within_s)

    @property
    def listening(self) -> bool:
        """Whether notifications are heard now (not while the connection is down)."""
        listener = self._listener
        return listener is not None and listener.connected.is_set()

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended already
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)  # a daemon thread: it ends with the process

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._listener = ChangeListener(
                self._url, self._handlers, on_connected=self._ready.set, quiet=True
            )
            await self._listener.run(self._stop)

        asyncio.run(run())
