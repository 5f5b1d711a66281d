"""The ``comfywatch`` command line: ``main``, which parses the arguments and runs a command.

Light on purpose: ``--version`` and ``--help`` import argparse and the state names only.
Each command group's module is imported when one of its commands runs: ``daemon`` (run,
check-config, migrate), ``jobs`` (jobs, show), ``hooks``, ``prune``, ``health``
(healthcheck), ``register`` (a spool file), ``submit`` (a workflow, then a spool file),
``wait``, ``live`` (watch: rich), ``completion`` (shtab) and ``fake`` (fake-server). The
queries read the database without Alembic (:mod:`comfywatch.store.readonly`); only the
daemon and ``fake-server`` need aiohttp.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from comfywatch.cli.output import EX_CONFIG, EX_UNAVAILABLE, err
from comfywatch.cli.parser import build_parser
from comfywatch.errors import ConfigError, StoreError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        err(f"configuration error: {exc}")
        return EX_CONFIG
    except StoreError as exc:
        err(str(exc))
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command in ("jobs", "show"):
        from comfywatch.cli import jobs

        return jobs.list_jobs(args) if command == "jobs" else jobs.show_job(args)
    if command == "hooks":
        from comfywatch.cli import hooks

        return hooks.hooks(args)
    if command == "prune":
        from comfywatch.cli import prune

        return prune.prune(args)
    if command == "healthcheck":
        from comfywatch.cli import health

        return health.healthcheck(args)
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
