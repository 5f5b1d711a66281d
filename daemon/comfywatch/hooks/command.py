"""Command hooks: ``argv`` run without a shell, the event on stdin, within a timeout.

The command runs in a session of its own, so that on timeout its whole process group is
killed; stdout and stderr are captured together (capped). Exit status 0 is a success;
anything else may be retried. OS errors are turned into short error texts here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable, Mapping

from comfywatch.comfy import describe_error
from comfywatch.config import CommandHookSettings
from comfywatch.hooks.payload import TEST_EVENT_TYPE
from comfywatch.hooks.policy import AttemptResult
from comfywatch.store import DeliveryRow, JobRow

#: After SIGKILL, how long to wait for a command's pipes to close before closing them.
KILL_GRACE_S = 5.0
_SERVICE_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_CHUNK = 65_536


def command_env(
    base: Mapping[str, str], delivery: DeliveryRow, job: JobRow, *, hidden: Iterable[str]
) -> dict[str, str]:
    """``base`` (the daemon's environment) without the ``hidden`` variables (webhook secrets
    are not the command's business) and systemd's, plus ``COMFYWATCH_*`` for this event
    (``COMFYWATCH_TEST=1`` for the sample events of ``comfywatch hooks test`` only)."""
    env = dict(base)
    # systemd's channel is the daemon's own: a command must not speak for it.
    for name in (*hidden, *_SERVICE_MANAGER_VARIABLES, "COMFYWATCH_TEST"):
        env.pop(name, None)
    if delivery.event_type == TEST_EVENT_TYPE:
        env["COMFYWATCH_TEST"] = "1"
    env.update(
        COMFYWATCH_SERVER=job.server,
        COMFYWATCH_PROMPT_ID=job.prompt_id,
        COMFYWATCH_STATE=job.state.value,
        COMFYWATCH_EVENT_ID=delivery.event_id,
    )
    return env


async def run_command(
    hook: CommandHookSettings, *, env: Mapping[str, str], body: bytes
) -> AttemptResult:
    """Run ``hook``'s command once with ``body`` (and a newline) on its stdin."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        return AttemptResult(ok=False, error=f"cannot start: {describe_error(exc)}")
    except ValueError:  # e.g. a NUL byte in an argument or a variable
        return AttemptResult(ok=False, error="cannot start: invalid argument or environment")
    return await _supervise(proc, hook, body + b"\n")


def _exit_error(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


class _Capture:
    """The first ``cap`` bytes of a stream; the rest is read and counted, not kept."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_CHUNK):
            self.total += len(chunk)
            room = self.cap - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def text(self) -> str | None:
        if self.total == 0:
            return None
        text = self.kept.decode("utf-8", errors="replace")
        dropped = self.total - len(self.kept)
        if dropped:
            text += f"\n[output truncated: {dropped} more bytes not kept]"
        return text


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write ``data`` to a command's stdin and close it; a command need not read it."""
    if stdin is None:  # pragma: no cover - always a pipe here
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()


async def _supervise(
    proc: asyncio.subprocess.Process, hook: CommandHookSettings, stdin_data: bytes
) -> AttemptResult:
    """Feed, read and wait for a command within its timeout.

    The exit status decides. A command still running at the deadline has timed out; its
    process group is killed. So is a group whose leader exited in time while a process it
    left behind keeps the output pipe open (the exit status still decides then).
    """
    capture = _Capture(hook.max_output_bytes)
    assert proc.stdout is not None
    helpers = [
        asyncio.create_task(capture.drain(proc.stdout)),
        asyncio.create_task(_feed(proc.stdin, stdin_data)),
    ]
    finished = False
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(hook.timeout_s):
                # wait() returns once the process has exited and its pipes are closed.
                await proc.wait()
                await asyncio.gather(*helpers)
                finished = True
        returncode = proc.returncode  # None: still running at the deadline
    finally:
        if not finished:
            if proc.returncode is None or not all(h.done() for h in helpers):
                _kill_group(proc)
            await _reap(proc)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    output = capture.text()
    if returncode is None:
        return AttemptResult(
            ok=False,
            error=f"timed out after {hook.timeout_s:g}s (process group killed)",
            response=output,
        )
    error = _exit_error(returncode)
    return AttemptResult(ok=error is None, error=error, response=output)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a command's process group.

    pgid == pid (start_new_session), and that id cannot have been reused: either the leader
    is not reaped yet, or its group still has a member holding our pipe open.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a killed command to exit and its pipes to close; a pipe still held open
    after ``KILL_GRACE_S`` (by a process that left the group) is closed on our side."""
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except TimeoutError:
        transport = getattr(proc, "_transport", None)  # Process has no public close()
        if transport is not None:
            transport.close()
