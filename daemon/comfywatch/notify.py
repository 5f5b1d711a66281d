"""systemd's notify protocol: one datagram to ``$NOTIFY_SOCKET`` per message.

Does nothing when the daemon was not started by systemd (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("comfywatch.notify")


class SystemdNotifier:
    """Sends ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1`` and ``STATUS=``."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        #: How often to ping while idle: half of systemd's WatchdogSec (None: no watchdog).
        self.watchdog_ping_s = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = env if env is not None else os.environ
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=int(usec) if usec.isdigit() and mine else None,
        )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(
        self,
        *,
        ready: bool = False,
        reloading: bool = False,
        stopping: bool = False,
        watchdog: bool = False,
        status: str | None = None,
    ) -> None:
        if self._sock is None or self._address is None:
            return
        lines: list[str] = []
        if reloading:
            # systemd wants the monotonic time of the reload for Type=notify-reload.
            lines += ["RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"]
        if ready:
            lines.append("READY=1")
        if stopping:
            lines.append("STOPPING=1")
        if watchdog:
            lines.append("WATCHDOG=1")
        if status is not None:
            lines.append("STATUS=" + status.replace("\n", " "))
        if not lines:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror or type(exc).__name__)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
