"""The Dockerfile's install steps, carried out for real, and the image's commands run.

No Docker here: the test reads the Dockerfile and performs its ``ENV``, ``WORKDIR``,
``COPY`` and ``RUN`` steps itself, with the image's absolute paths (``/opt``, ``/tmp``,
``/etc/comfywatch``, ``/var/lib/comfywatch``) moved under a temp folder. So a fresh virtual
environment gets the dependencies from pyproject.toml, then the project with ``--no-deps``,
from the files the image copies and nothing else. Then the image's ``HEALTHCHECK`` and
``CMD`` run from that environment, with the example config mounted as the README's
``docker run`` mounts it.

pip reaches the package index as configured for this machine and keeps its cache (the image
sets ``PIP_NO_CACHE_DIR``; the test does not).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Roots of the image's file system that the test moves under its temp folder.
IMAGE_PATH = re.compile(r"(?<![\w.\-/$])/(opt|tmp|etc|var)(?=/|\b)")
#: ENV settings the test leaves out.
SKIPPED_ENV = {"PIP_NO_CACHE_DIR"}  # reuse the pip cache between runs
STEP_TIMEOUT_S = 600
WAIT_S = 60.0


@dataclass
class Image:
    """What the Dockerfile built: its environment, and the commands it declares."""

    root: Path
    env: dict[str, str]
    cwd: Path
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command the way the image would (its PATH, its ENV, its WORKDIR)."""
        result = subprocess.run(
            list(argv),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
        if check:
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result

    def path(self, image_path: str) -> Path:
        return Path(rebase(image_path, self.root))


def rebase(text: str, root: Path) -> str:
    return IMAGE_PATH.sub(lambda m: f"{root}/{m.group(1)}", text)


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def build(tmp_path: Path) -> Image:
    """Carry out the Dockerfile's steps under ``tmp_path``; return the result."""
    root = tmp_path / "image"
    bin_dir = tmp_path / "host-bin"  # the image's `python3` (and `python`) on PATH
    bin_dir.mkdir(parents=True)
    for name in ("python3", "python"):
        (bin_dir / name).symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("NOTIFY_SOCKET", None)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    image = Image(root=root, env=env, cwd=root)
    for base in ("tmp", "opt", "etc", "var/lib"):  # what the base image has
        (root / base).mkdir(parents=True)

    build_args: dict[str, str] = {}
    for keyword, args in instructions((REPO / "Dockerfile").read_text()):
        if keyword == "ARG":
            name, _, default = args.partition("=")
            build_args[name] = default
        elif keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], args)
            assert base.startswith("python:3."), args  # what `docker build` pulls by default
        elif keyword == "ENV":
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: only KEY=VALUE is supported here"
                if key in SKIPPED_ENV:
                    continue
                image.env[key] = rebase(value, root).replace("$PATH", image.env["PATH"])
        elif keyword == "WORKDIR":
            image.cwd = image.path(args)
            image.cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), args
            target = image.cwd / dest
            for source in sources:
                copy_into(REPO / source, target, many=len(sources) > 1 or dest.endswith("/"))
        elif keyword == "RUN":
            if "useradd" in args or "groupadd" in args:
                image.skipped.append(args)  # creating users needs root
                continue
            image.run("/bin/sh", "-c", rebase(args, root))
        elif keyword == "CMD":
            image.cmd = json.loads(args)
        elif keyword == "HEALTHCHECK":
            _, _, command = args.partition("CMD ")
            image.healthcheck = json.loads(command)
        else:
            assert keyword in {"USER", "VOLUME", "EXPOSE", "STOPSIGNAL", "LABEL"}, keyword
    return image


def copy_into(source: Path, target: Path, *, many: bool) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    if source.is_dir():
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    else:
        destination = target / source.name if many or target.is_dir() else target
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def run_cmd_and_healthcheck(image: Image) -> tuple[int, str, list[int]]:
    """Start the image's CMD, run its HEALTHCHECK until it passes, stop with STOPSIGNAL."""
    proc = await asyncio.create_subprocess_exec(
        *image.cmd,
        env=image.env,
        cwd=image.cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    output = asyncio.create_task(proc.stdout.read())
    codes: list[int] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while not codes or codes[-1] != 0:
                check = await asyncio.create_subprocess_exec(
                    *image.healthcheck,
                    env=image.env,
                    cwd=image.cwd,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                codes.append(await check.wait())
                assert proc.returncode is None, "the daemon exited"
                if codes[-1] != 0:
                    await asyncio.sleep(0.2)  # a retry interval, as Docker's
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return code, (await output).decode(), codes


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_dockerfile_install_steps_give_working_commands(tmp_path: Path) -> None:
    image = build(tmp_path)
    assert len(image.skipped) == 1  # only the user set-up
    assert image.cmd == ["comfywatch", "run"]
    assert image.healthcheck == ["comfywatch", "healthcheck"]

    # The package runs from the new environment, not from this checkout.
    where = image.run("python", "-c", "import comfywatch; print(comfywatch.__file__)")
    assert where.stdout.startswith(str(image.root)), where.stdout
    assert "site-packages" in where.stdout
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.run("comfywatch", "--version").stdout.strip() == f"comfywatch {version}"

    # docker run -v "$PWD/config:/etc/comfywatch:ro": the example config checks out, found
    # through COMFYWATCH_CONFIG as in the image, and by --config.
    config_dir = image.path("/etc/comfywatch")
    shutil.copytree(REPO / "config", config_dir, dirs_exist_ok=True)
    config = config_dir / "comfywatch.toml"
    assert image.env["COMFYWATCH_CONFIG"] == str(config)
    checked = image.run("comfywatch", "check-config")
    assert f"config: {config}" in checked.stdout and "local:" in checked.stdout
    image.run("comfywatch", "check-config", "--config", str(REPO / "config" / "comfywatch.toml"))

    # The same config with the database and the spool on the (moved) volume and the HTTP
    # endpoint on.
    text = config.read_text()
    text, replaced = re.subn(
        r'(?m)^database = "sqlite:////var/lib/comfywatch/comfywatch.db"$',
        f'database = "sqlite:///{image.path("/var/lib/comfywatch")}/comfywatch.db"',
        text,
    )
    assert replaced == 1
    text, replaced = re.subn(
        r'(?m)^jobs_dir = "/var/lib/comfywatch/spool"$',
        f'jobs_dir = "{image.path("/var/lib/comfywatch/spool")}"',
        text,
    )
    assert replaced == 1
    text, replaced = re.subn(
        r'(?m)^# http = "127.0.0.1:9464"$', f'http = "127.0.0.1:{free_port()}"', text
    )
    assert replaced == 1
    config.write_text(text)
    assert image.cwd == image.path("/var/lib/comfywatch")  # the image's last WORKDIR

    migrated = image.run("comfywatch", "migrate")
    assert migrated.stdout.startswith("database schema: empty -> ")
    again = image.run("comfywatch", "migrate")
    assert re.fullmatch(r"database schema: (\w+) -> \1\n", again.stdout), again.stdout

    code, output, checks = asyncio.run(run_cmd_and_healthcheck(image))
    assert code == 0, output
    assert checks[-1] == 0
    events = [json.loads(line)["event"] for line in output.splitlines()]
    assert "daemon_started" in events and events[-1] == "daemon_stopped"
    # Nothing listens any more: the healthcheck says so.
    assert image.run(*image.healthcheck, check=False).returncode != 0
