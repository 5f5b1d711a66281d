"""The processes a benchmark runs: fake ComfyUI servers and the daemon, each its own process.

:class:`FakeServer` runs ``comfywatch fake-server`` and reads its per-client costs;
:class:`Daemon` writes a config into a work folder, runs ``comfywatch run`` with
``NOTIFY_SOCKET`` pointed at a datagram socket of ours (to time ``READY=1``), reads its
CPU time and peak RSS from ``/proc`` and counts its jobs with ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SETUP_AGENT = "bench-setup"
DAEMON_AGENT = "comfywatch"
NAIVE_AGENT = "naive-poller"
TERMINAL = ("success", "error", "interrupted", "cancelled", "lost", "not_found", "timeout")
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, headers={"User-Agent": SETUP_AGENT}) as response:
        response.raise_for_status()
        return await response.json(content_type=None)


class FakeServer:
    """``comfywatch fake-server`` in its own process."""

    def __init__(
        self, name: str, *, prefill: int, run_time_s: float, graph_bytes: int | None = None
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "comfywatch", "fake-server", "--port", str(self.port)]
        argv += ["--run-time", str(run_time_s), "--prefill", str(prefill)]
        argv += ["--max-history", str(max(10_000, prefill + 10)), "--progress-steps", "0"]
        if graph_bytes is not None:
            argv += ["--graph-bytes", str(graph_bytes)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    async def wait_listening(self, session: aiohttp.ClientSession, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake server {self.name} exited {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                await get_json(session, f"{self.url}/_fake/stats")
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"fake server {self.name} did not listen")

    async def queued_ids(self, session: aiohttp.ClientSession) -> list[str]:
        """Ids of the running and pending prompts, in submission order."""
        queue = await get_json(session, f"{self.url}/queue")
        items = sorted(queue["queue_running"] + queue["queue_pending"], key=lambda i: i[0])
        return [str(item[1]) for item in items]

    async def finished_ids(self, session: aiohttp.ClientSession) -> list[str]:
        return list(await get_json(session, f"{self.url}/history"))

    async def remaining(self, session: aiohttp.ClientSession) -> int:
        body = await get_json(session, f"{self.url}/prompt")
        return int(body["exec_info"]["queue_remaining"])

    async def history(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        return dict(await get_json(session, f"{self.url}/history"))

    async def reset_stats(self, session: aiohttp.ClientSession) -> None:
        async with session.delete(f"{self.url}/_fake/stats") as response:
            response.raise_for_status()

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        return dict(await get_json(session, f"{self.url}/_fake/stats"))

    def cpu_s(self) -> float:
        """CPU time of the whole server process (HTTP parsing included)."""
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def client_costs(stats: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Requests, response bytes and CPU of the clients whose name starts with ``prefix``."""
    total = {"requests": 0.0, "response_bytes": 0.0, "cpu_s": 0.0}
    routes: dict[str, int] = {}
    for name, per_route in stats.get("clients", {}).items():
        if not name.startswith(prefix):
            continue
        for route, cost in per_route.items():
            for key in total:
                total[key] += float(cost[key])
            routes[route] = routes.get(route, 0) + int(cost["requests"])
    return {**total, "routes": routes}  # type: ignore[dict-item]


def finished_ms(entry: Mapping[str, Any]) -> int | None:
    """ComfyUI's timestamp of a history entry's terminal message."""
    ends = ("execution_success", "execution_error", "execution_interrupted")
    for kind, body in reversed(entry.get("status", {}).get("messages", [])):
        if kind in ends:
            return int(body["timestamp"])
    return None


@dataclass
class Daemon:
    """``comfywatch run`` on a generated config in ``workdir``."""

    workdir: Path
    servers: Mapping[str, str]
    poll_interval_s: float = 1.0
    websocket: bool = True
    webhook_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = field(default_factory=free_port)
    ready_after_s: float | None = None
    #: The ``[daemon] database`` URL; the default is a SQLite file in ``workdir``.
    database: str = "sqlite:///comfywatch.db"
    #: ``[daemon] replicas = true`` with this ``lease_s`` (PostgreSQL only); None: off.
    lease_s: float | None = None
    #: Names this daemon's config, log and notify socket: several may share ``workdir``
    #: (and so its ``jobs_dir``).
    name: str = "comfywatch"

    @property
    def db_path(self) -> Path:
        return self.workdir / "comfywatch.db"

    @property
    def jobs_dir(self) -> Path:
        return self.workdir / "jobs.d"

    def write_config(self) -> Path:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "[daemon]",
            f'database = "{self.database}"',
            f"poll_interval_s = {self.poll_interval_s}",
            'jobs_dir = "jobs.d"',
            f'http = "127.0.0.1:{self.port}"',
            'log_level = "warning"',
            'log_format = "json"',
            f"default_hooks = {['bench'] if self.webhook_url else []}".replace("'", '"'),
        ]
        if self.lease_s is not None:
            lines += ["replicas = true", f"lease_s = {self.lease_s}"]
        for name, url in self.servers.items():
            lines += [f"[servers.{name}]", f'url = "{url}"']
            lines += [f"websocket = {'true' if self.websocket else 'false'}"]
        if self.webhook_url:
            lines += ["[hooks.bench]", 'type = "webhook"', f'url = "{self.webhook_url}"']
        path = self.workdir / f"{self.name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start(self, ready_timeout_s: float = 600) -> float:
        """Start it and return the seconds until ``READY=1``."""
        config = self.write_config()
        notify_path = self.workdir / f"{self.name}.notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        log = (self.workdir / f"{self.name}.log").open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfywatch", "run", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(ready_timeout_s):
                while True:
                    message = await loop.sock_recv(notify, 4096)
                    if b"READY=1" in message.split(b"\n"):
                        break
        finally:
            notify.close()
        self.ready_after_s = time.monotonic() - started
        return self.ready_after_s

    def cpu_s(self) -> float:
        assert self.proc is not None
        return process_cpu_s(self.proc.pid)

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill(self) -> None:
        """SIGKILL, as a lost host would end it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if not self.db_path.exists():
            return []
        with contextlib.closing(
            sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        ) as db:
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # the schema is not there yet
                return []

    async def count(self, where: str = "1") -> int:
        rows = await asyncio.to_thread(self.query, f"SELECT count(*) FROM jobs WHERE {where}")
        return int(rows[0][0]) if rows else 0

    async def wait_count(self, target: int, where: str = "1", timeout_s: float = 600) -> float:
        """Seconds until ``target`` jobs match ``where`` (raises TimeoutError)."""
        started = time.monotonic()
        while await self.count(where) < target:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"fewer than {target} jobs where {where}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started


TERMINAL_SQL = "state IN (" + ",".join(f"'{s}'" for s in TERMINAL) + ")"


def write_spool(jobs_dir: Path, server: str, prompt_ids: Iterable[str], per_file: int) -> int:
    """Register prompts through ``[[jobs]]`` files (``.name.tmp`` renamed into place)."""
    ids = list(prompt_ids)
    files = 0
    for start in range(0, len(ids), per_file):
        name = f"{server}-{start:07d}"
        text = "".join(
            f'[[jobs]]\nserver = "{server}"\nprompt_id = "{prompt_id}"\n'
            for prompt_id in ids[start : start + per_file]
        )
        temporary = jobs_dir / f".{name}.tmp"
        temporary.write_text(text)
        temporary.rename(jobs_dir / f"{name}.toml")
        files += 1
    return files
