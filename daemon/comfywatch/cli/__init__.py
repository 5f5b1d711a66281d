"""The ``comfywatch`` command line: ``main``, which parses the arguments and runs a command.

Light on purpose: ``--version`` and ``--help`` import argparse and the state names only.
Each command group's module is imported when one of its commands runs: ``daemon`` (run,
check-config, migrate), ``jobs`` (jobs, show), ``hooks``, ``prune``, ``health``
(healthcheck), ``register`` (a spool file), ``submit`` (a workflow, then a spool file),
``wait``, ``replicas``, ``secret`` (hooks new-secret), ``live`` (watch: rich), ``completion``
(shtab) and ``fake`` (fake-server). The queries read the database without Alembic
(:mod:`comfywatch.store.readonly`); only the daemon and ``fake-server`` need aiohttp.

A reader that stops early (``comfywatch jobs --json | head -1``) ends the command quietly
with exit status 141, as a Unix tool killed by SIGPIPE reports in a shell.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from comfywatch.cli.output import EX_CONFIG, EX_PIPE, EX_UNAVAILABLE, err
from comfywatch.cli.parser import build_parser
from comfywatch.errors import ConfigError, LockLost, StoreError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _stdout_closed()


def _main(argv: Sequence[str] | None) -> int:
    """Parse and run; stdout is flushed here, so that a closed pipe is seen here."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, --version, a usage error
        sys.stdout.flush()
        raise
    try:
        status = _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            err(f"configuration error: {problem}")
        return EX_CONFIG
    except (StoreError, LockLost) as exc:
        err(str(exc))
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return status


def _stdout_closed() -> int:
    """The reader of stdout went away: say nothing more (not even at exit, when Python
    flushes stdout again: it now writes to /dev/null) and exit 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout
        pass
    return EX_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command in ("jobs", "show"):
        from comfywatch.cli import jobs

        return jobs.list_jobs(args) if command == "jobs" else jobs.show_job(args)
    if command == "hooks" and args.hooks_command == "new-secret":
        from comfywatch.cli import secret

        return secret.new_secret(args)
    if command == "hooks":
        from comfywatch.cli import hooks

        return hooks.hooks(args)
    if command == "prune":
        from comfywatch.cli import prune

        return prune.prune(args)
    if command == "healthcheck":
        from comfywatch.cli import health

        return health.healthcheck(args)
    if command == "replicas":
        from comfywatch.cli import replicas

        return replicas.list_replicas(args)
    if command == "register":
        from comfywatch.cli import register

        return register.register(args)
    if command == "submit":
        from comfywatch.cli import submit

        return submit.submit(args)
    if command == "wait":
        from comfywatch.cli import wait

        return wait.wait(args)
    if command == "watch":
        from comfywatch.cli import live

        return live.watch(args)
    if command == "completion":
        from comfywatch.cli import completion

        return completion.completion(args)
    if command == "fake-server":
        from comfywatch.cli import fake

        return fake.fake_server(args)
    from comfywatch.cli import daemon

    handlers = {"run": daemon.run, "check-config": daemon.check_config, "migrate": daemon.migrate}
    return handlers[command](args)
