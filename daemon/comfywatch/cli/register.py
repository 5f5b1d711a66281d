"""``register``: write a spool file into ``jobs_dir`` and, with ``--wait``, report the
daemon's verdict (the logic lives in :mod:`comfywatch.spool.register`)."""

from __future__ import annotations

import argparse

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import (
    EX_CANTCREAT,
    EX_FAILURE,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    err,
    say,
)


def register(args: argparse.Namespace) -> int:
    from comfywatch.spool.register import Outcome, jobs_file_text, submit, wait_for_verdict

    settings = settings_of(args)
    try:
        text = jobs_file_text(
            args.server, args.prompt_ids, labels=dict(args.label), hooks=args.hooks
        )
        path = submit(settings, text)
    except ValueError as exc:  # InvalidJobs: what the daemon would reject
        err(f"register: {exc}")
        return EX_USAGE
    except OSError as exc:
        err(f"register: cannot write into {settings.daemon.jobs_dir}: {exc.strerror or exc}")
        return EX_CANTCREAT
    if not args.wait:
        say(str(path))
        return EX_OK
    verdict = wait_for_verdict(path, args.timeout)
    if verdict.outcome is Outcome.ACCEPTED:
        say(f"registered: {verdict.path or 'the file was deleted'}")
        return EX_OK
    if verdict.outcome is Outcome.REJECTED:
        err(f"register: rejected, set aside as {verdict.path}:\n{verdict.error}")
        return EX_FAILURE
    err(f"register: {path} is still waiting after {args.timeout:g} s (is the daemon running?)")
    return EX_TEMPFAIL
