"""The command line's grammar: commands, their options and the types of their values.

Imports argparse, the version and the state names only, so that ``--help`` and
``--version`` answer at once. Each command's description and example live in
:mod:`comfywatch.cli.helptext`.

``--config``, ``--log-level`` and ``--log-format`` may come before the command or after it
(or after a nested action: ``hooks --config X retry 7``). The top-level parser holds their
defaults; the commands' copies default to ``SUPPRESS``, so that a command's parser adds
only what was written after it and never overwrites what came before.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

from comfywatch import __version__
from comfywatch.cli.helptext import describe
from comfywatch.states import DeliveryState, JobState

#: The units of an age or a duration, in seconds.
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, saying where to read more; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _duration_s(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w`` in seconds; a bare number is refused
    (``30`` could mean any unit), but for ``0``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match or (not match.group(2) and float(match.group(1)) != 0):
        raise argparse.ArgumentTypeError(
            f"expected a number and a unit (s, m, h, d or w), like 30d, 12h or 90m; got {text!r}"
        )
    return float(match.group(1)) * _UNITS_S.get(match.group(2), 0)


def _common_options(*, default: object) -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="config file (default: $COMFYWATCH_CONFIG, then /etc/comfywatch/comfywatch.toml)",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default,
        help="log level of the commands that log (default: daemon.log_level)",
    )
    common.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=default,
        help="log format of the commands that log (default: daemon.log_format)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="comfywatch", parents=[_common_options(default=None)])
    parser.add_argument("--version", action="version", version=f"comfywatch {__version__}")
    # SUPPRESS: a command's parser sets only the options written after the command.
    common = _common_options(default=argparse.SUPPRESS)
    nested = common  # the same for actions (hooks retry)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon until stopped")
    run.add_argument(
        "--until-done",
        action="store_true",
        help="exit 0 once every job is terminal and every hook delivered or dead",
    )
    sub.add_parser("check-config", parents=[common], help="validate the config and list jobs")
    sub.add_parser("migrate", parents=[common], help="create or upgrade the database schema")
    sub.add_parser(
        "healthcheck",
        parents=[common],
        help="exit 0 if the running daemon is healthy (its /healthz, else the database)",
    )

    replicas = sub.add_parser(
        "replicas",
        parents=[common],
        help="list the live replicas, their servers and lease expiries",
    )
    replicas.add_argument("--json", action="store_true", help="print a JSON array")

    jobs = sub.add_parser("jobs", parents=[common], help="list tracked jobs")
    jobs.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        metavar="STATE",
        help="only jobs in this state (repeat for several): " + _names(JobState),
    )
    jobs.add_argument("--server", metavar="NAME", help="only jobs of this server")
    jobs.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="only jobs with this label (repeat: all must match)",
    )
    jobs.add_argument("--limit", type=_limit, default=None, metavar="N", help=_LIMIT_HELP)
    jobs.add_argument("--json", action="store_true", help="print a JSON array")
    jobs.add_argument(
        "--watch", action="store_true", help="redraw the table every --interval until Ctrl-C"
    )
    jobs.add_argument(
        "--interval",
        type=_positive_s,
        default=2.0,
        metavar="S",
        help="seconds between redraws with --watch (default 2)",
    )

    show = sub.add_parser("show", parents=[common], help="show one job in full")
    show.add_argument(
        "prompt_id", metavar="PROMPT_ID", help="a prompt id, or a prefix of exactly one"
    )
    show.add_argument(
        "--server", metavar="NAME", help="the job's server, when the id is tracked on several"
    )
    show.add_argument("--json", action="store_true", help="print the job as JSON")

    hooks = sub.add_parser("hooks", parents=[common], help="list or retry hook deliveries")
    hooks_sub = hooks.add_subparsers(dest="hooks_command", metavar="ACTION")
    hooks.add_argument(
        "--state",
        choices=[s.value for s in DeliveryState],
        metavar="STATE",
        help="only deliveries in this state: " + _names(DeliveryState),
    )
    hooks.add_argument("--limit", type=_limit, default=None, metavar="N", help=_LIMIT_HELP)
    hooks.add_argument("--json", action="store_true", help="print a JSON array")
    retry = hooks_sub.add_parser("retry", parents=[nested], help="send dead deliveries again")
    retry.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="delivery ids (column ID of `hooks`)"
    )
    retry.add_argument("--all-dead", action="store_true", help="every dead delivery")
    hooks_sub.add_parser(
        "new-secret", help="print a fresh whsec_ secret for a webhook and its receiver"
    )
    _add_hooks_test(hooks_sub, nested)

    _add_register(sub, common)
    _add_submit(sub, common)
    _add_wait(sub, common)

    prune = sub.add_parser("prune", parents=[common], help="delete old terminal jobs")
    prune.add_argument(
        "--older-than",
        type=_duration_s,
        required=True,
        metavar="AGE",
        help="finished longer ago than AGE: a number and a unit, 30d, 12h, 90m, 45s or 2w",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted and what is kept"
    )

    _add_fake_server(sub)
    _add_watch(sub, common)
    _add_completion(sub)
    describe(parser)
    return parser


def _add_register(sub: Any, common: argparse.ArgumentParser) -> None:
    """``comfywatch register``: write a spool file for the running daemon."""
    register = sub.add_parser(
        "register", parents=[common], help="register jobs: write a file into jobs_dir"
    )
    register.add_argument("--server", required=True, metavar="NAME", help="a server of the config")
    register.add_argument(
        "prompt_ids", nargs="+", metavar="PROMPT_ID", help="prompt ids ComfyUI gave"
    )
    _add_labels_and_hooks(register, "these jobs")
    register.add_argument("--wait", action="store_true", help="wait for the daemon's verdict")
    register.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long --wait waits, in seconds (default 60)",
    )


def _add_labels_and_hooks(parser: argparse.ArgumentParser, jobs: str) -> None:
    """``--label`` and ``--hooks``, as ``register`` and ``submit`` take them."""
    parser.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help=f"a label for {jobs} (repeat for several)",
    )
    parser.add_argument(
        "--hooks",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="A,B",
        help=f'hooks for {jobs} ("" for none; default: default_hooks)',
    )


def _add_hooks_test(hooks_sub: Any, nested: argparse.ArgumentParser) -> None:
    """``comfywatch hooks test``: one sample event to one hook, now."""
    test = hooks_sub.add_parser(
        "test",
        parents=[nested],
        help="send a sample event to a hook now and show its answer",
    )
    test.add_argument("name", metavar="NAME", help="the hook, as named in [hooks.NAME]")
    test.add_argument(
        "--state",
        choices=[s.value for s in JobState if s.terminal],
        default=JobState.SUCCESS.value,
        help="the job state the sample event carries in data.state (default: success)",
    )


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _add_watch(sub: Any, common: argparse.ArgumentParser) -> None:
    """``comfywatch watch``: the live terminal view."""
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="a live view of the servers and of running and recent jobs",
    )
    watch.add_argument(
        "--interval",
        type=_positive_s,
        default=1.0,
        metavar="S",
        help="seconds between redraws (default 1)",
    )
    watch.add_argument(
        "--recent",
        type=_count,
        default=10,
        metavar="N",
        help="finished jobs shown, newest first (default 10)",
    )
    watch.add_argument(
        "--metrics-url",
        metavar="URL",
        help='the daemon\'s /metrics (default: from [daemon] http; "" for none)',
    )


def _add_completion(sub: Any) -> None:
    """``comfywatch completion SHELL``: a completion script generated from this grammar."""
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
    )
    completion.add_argument(
        "shell", choices=["bash", "zsh", "fish"], help="the shell to complete in"
    )


def _add_submit(sub: Any, common: argparse.ArgumentParser) -> None:
    """``comfywatch submit``: queue a workflow on a server and track it."""
    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="queue an API-format workflow on a server and track it",
    )
    submit.add_argument("workflow", metavar="WORKFLOW", help="API-format workflow JSON, or -")
    submit.add_argument("--server", required=True, help="the server to queue it on (by name)")
    _add_labels_and_hooks(submit, "the job")
    submit.add_argument(
        "--wait", action="store_true", help="wait until the job ends, showing its progress"
    )
    submit.add_argument(
        "--timeout",
        type=_positive_s,
        default=None,
        metavar="S",
        help="with --wait: give up after S seconds (exit status 124; default: no limit)",
    )


def _add_wait(sub: Any, common: argparse.ArgumentParser) -> None:
    """``comfywatch wait``: block until jobs are terminal."""
    wait = sub.add_parser(
        "wait",
        parents=[common],
        help="wait until jobs end; the exit status tells how they ended",
    )
    wait.add_argument("prompt_ids", nargs="+", metavar="PROMPT_ID", help="the jobs to wait for")
    wait.add_argument("--server", help="only the jobs on this server (ids on several servers)")
    wait.add_argument(
        "--timeout",
        type=_positive_s,
        default=None,
        metavar="S",
        help="give up after S seconds (exit status 124; default: no limit)",
    )


def _names(states: Iterable[Enum]) -> str:
    return ", ".join(str(state.value) for state in states)


def _whole(text: str, *, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def _count(text: str) -> int:
    return _whole(text, least=0)


def _limit(text: str) -> int:
    return _whole(text, least=1)


_LIMIT_HELP = "at most N rows, newest first (default: all)"


def _port(text: str) -> int:
    value = _whole(text, least=0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 0 to 65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _add_fake_server(sub: Any) -> None:
    """``comfywatch fake-server`` and its options (the benchmark ones included)."""
    fake = sub.add_parser("fake-server", help="run a fake ComfyUI for trying comfywatch")
    fake.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    fake.add_argument(
        "--port",
        type=_port,
        default=8188,
        metavar="N",
        help="TCP port (default 8188, ComfyUI's; 0 picks a free one, printed at start)",
    )
    fake.add_argument(
        "--run-time",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds each prompt 'runs' (default 2)",
    )
    fake.add_argument(
        "--max-history",
        type=_count,
        default=10_000,
        metavar="N",
        help="history entries kept, as ComfyUI's MAXIMUM_HISTORY_SIZE (default 10000)",
    )
    fake.add_argument(
        "--progress-steps",
        type=_count,
        default=4,
        metavar="N",
        help="'progress' WebSocket messages per prompt (default 4; 0 for none)",
    )
    fake.add_argument(
        "--prefill", type=_count, default=0, metavar="N", help="queue N prompts at start"
    )
    fake.add_argument(
        "--graph-bytes",
        type=_count,
        default=None,
        metavar="B",
        help="size of each prefilled prompt's graph as JSON (default: a small graph)",
    )
