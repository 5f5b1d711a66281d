"""``comfywatch`` on a pseudo-terminal, as a person runs it: what it drew (escape sequences
stripped), keys typed, the terminal's mode, signals. Waits are for conditions, with
deadlines."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

WAIT_S = 30.0
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()][0-9A-Za-z]"  # character sets
    r"|\x1b[=>78]"  # keypad modes, cursor save and restore
)


def plain(raw: bytes) -> str:
    """What a person reads of ``raw``: text without escape sequences."""
    return _ESCAPES.sub("", raw.decode("utf-8", "replace")).replace("\r", "")


class Terminal:
    """A ``python -m comfywatch`` subprocess whose stdin and stdout are a pseudo-terminal
    (stderr is a pipe, to read apart)."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int, slave: int) -> None:
        self.proc = proc
        self.master = master
        #: The terminal's side the program uses, kept open to read its mode.
        self.slave = slave
        self.raw = b""

    @classmethod
    async def start(cls, *args: str, cwd: Path, columns: int = 160, rows: int = 60) -> Terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env["TERM"] = "xterm-256color"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfywatch",
            *args,
            stdin=slave,
            stdout=slave,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        os.set_blocking(master, False)
        return cls(proc, master, slave)

    async def __aenter__(self) -> Terminal:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.wait()
        os.close(self.master)
        os.close(self.slave)

    @property
    def text(self) -> str:
        return plain(self.raw)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            self.raw += chunk

    async def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Read what the program draws until ``check()`` holds."""
        try:
            async with asyncio.timeout(WAIT_S):
                while True:
                    self._drain()
                    if check():
                        return
                    if self.proc.returncode is not None:
                        raise AssertionError(f"exited {self.proc.returncode} before {what}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"no {what} on the terminal: {self.text[-3000:]!r}") from None

    async def wait_text(self, *texts: str) -> None:
        await self.wait_for(repr(texts), lambda: all(t in self.text for t in texts))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def interrupt(self) -> None:
        """What Ctrl-C does: SIGINT to the program."""
        self.proc.send_signal(signal.SIGINT)

    def canonical(self) -> bool:
        """Whether the terminal is in line mode with echo (as a shell leaves it)."""
        lflag = termios.tcgetattr(self.slave)[3]
        return bool(lflag & termios.ICANON) and bool(lflag & termios.ECHO)

    async def wait(self) -> tuple[int, str]:
        """The exit status and stderr, reading the terminal meanwhile (a full terminal
        buffer would block the program's last writes)."""
        assert self.proc.stderr is not None
        errors = asyncio.ensure_future(self.proc.stderr.read())
        exited = asyncio.ensure_future(self.proc.wait())
        async with asyncio.timeout(WAIT_S):
            while not exited.done():
                self._drain()
                await asyncio.sleep(0.02)
            self._drain()
            err = await errors
        return exited.result(), err.decode()
