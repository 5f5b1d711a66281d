"""The command line's grammar: commands, their options and the types of their values.

Imports argparse, the version and the state names only, so that ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from comfywatch import __version__
from comfywatch.states import DeliveryState, JobState


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h or 90m, got {text!r}")
    unit = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _common_options(*, default: object) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=default,
        help="config file (default: $COMFYWATCH_CONFIG, then /etc/comfywatch/comfywatch.toml)",
    )
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default
    )
    common.add_argument("--log-format", choices=["auto", "json", "console"], default=default)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfywatch",
        description="Track ComfyUI prompts to the end; record them in SQLite; fire hooks.",
    )
    parser.add_argument("--version", action="version", version=f"comfywatch {__version__}")
    common = _common_options(default=None)
    # For sub-subcommands (hooks retry): an option given before the action must survive.
    nested = _common_options(default=argparse.SUPPRESS)
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

    jobs = sub.add_parser("jobs", parents=[common], help="list tracked jobs")
    jobs.add_argument("--state", action="append", choices=[s.value for s in JobState])
    jobs.add_argument("--server")
    jobs.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    jobs.add_argument("--limit", type=int, default=None)
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

    show = sub.add_parser(
        "show",
        parents=[common],
        help="show one job in full",
        description="Show one job in full: times, source, error, outputs and hook deliveries.",
        epilog="example: comfywatch show 2ef07158  (a unique prefix of the prompt id is enough)",
    )
    show.add_argument(
        "prompt_id", metavar="PROMPT_ID", help="a prompt id, or a prefix of exactly one"
    )
    show.add_argument("--server")
    show.add_argument("--json", action="store_true")

    hooks = sub.add_parser("hooks", parents=[common], help="list or retry hook deliveries")
    hooks_sub = hooks.add_subparsers(dest="hooks_command", metavar="ACTION")
    hooks.add_argument("--state", choices=[s.value for s in DeliveryState])
    hooks.add_argument("--limit", type=int, default=None)
    hooks.add_argument("--json", action="store_true")
    retry = hooks_sub.add_parser("retry", parents=[nested], help="send dead deliveries again")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--all-dead", action="store_true")
    _add_hooks_test(hooks_sub, nested)

    _add_register(sub, common)
    _add_submit(sub, common)
    _add_wait(sub, common)

    prune = sub.add_parser("prune", parents=[common], help="delete old terminal jobs")
    prune.add_argument("--older-than", type=_duration_s, required=True, metavar="AGE")
    prune.add_argument("--dry-run", action="store_true")

    _add_fake_server(sub)
    _add_watch(sub, common)
    _add_completion(sub)
    return parser


def _add_register(sub: Any, common: argparse.ArgumentParser) -> None:
    """``comfywatch register``: write a spool file for the running daemon."""
    register = sub.add_parser(
        "register", parents=[common], help="register jobs: write a file into jobs_dir"
    )
    register.add_argument("--server", required=True)
    register.add_argument("prompt_ids", nargs="+", metavar="PROMPT_ID")
    register.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    register.add_argument(
        "--hooks",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="A,B",
        help='hooks for these jobs ("" for none; default: default_hooks)',
    )
    register.add_argument("--wait", action="store_true", help="wait for the daemon's verdict")
    register.add_argument("--timeout", type=float, default=60.0, metavar="S", help="for --wait")


def _add_hooks_test(hooks_sub: Any, nested: argparse.ArgumentParser) -> None:
    """``comfywatch hooks test``: one sample event to one hook, now."""
    test = hooks_sub.add_parser(
        "test",
        parents=[nested],
        help="send a sample event to a hook now and show its answer",
        description=(
            "Send a sample event, signed as a real one, to the hook NAME through the\n"
            "daemon's own delivery code, and print what the receiver answered. The\n"
            "event's type is job.test and command hooks get COMFYWATCH_TEST=1, so\n"
            "receivers can tell it from real events. Nothing is written to the database.\n"
            "Exit status 0 if the hook took it (2xx, or exit status 0), 1 if not."
        ),
        epilog="example:\n  comfywatch hooks test notify --state error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        description="A live view of each server and of the running, waiting and recent jobs.",
        epilog="example: comfywatch watch --interval 0.5 --recent 20",
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
        description="Print a completion script for SHELL, generated from this command line.",
        epilog="example: source <(comfywatch completion bash)",
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
        description=(
            "POST the API-format workflow WORKFLOW (a JSON file, or - for stdin) to the\n"
            "server's /prompt, register the prompt through the spool as `comfywatch\n"
            "register` does, and print its prompt id. A workflow the server refuses is\n"
            "explained per node and input (exit status 1). With --wait, follow the job\n"
            "in the database the daemon writes, with a progress bar, and exit as\n"
            "`comfywatch wait` does."
        ),
        epilog=(
            "example:\n"
            "  comfywatch submit portrait.json --server local --label batch=b1 --wait\n\n"
            "The workflow must be in ComfyUI's API format: enable the dev mode options in\n"
            'ComfyUI\'s settings, then use "Export (API)" (or "Save (API Format)").'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("workflow", metavar="WORKFLOW", help="API-format workflow JSON, or -")
    submit.add_argument("--server", required=True, help="the server to queue it on (by name)")
    submit.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label for the job (repeatable)",
    )
    submit.add_argument(
        "--hooks",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="A,B",
        help='hooks for the job ("" for none; default: default_hooks)',
    )
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
        description=(
            "Wait until every PROMPT_ID is terminal, reading the database the daemon\n"
            "writes (read-only). A job still waiting in the spool is waited for.\n"
            "Exit status: 0 if every job succeeded, 1 if any ended otherwise, 2 for a\n"
            "prompt id neither in the database nor in the spool, 124 on timeout."
        ),
        epilog="example:\n  comfywatch wait 2ef07158-5d3a-4e4b-9d63-2d1c4fb8f8a1 --timeout 600",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _add_fake_server(sub: Any) -> None:
    """``comfywatch fake-server`` and its options (the benchmark ones included)."""
    fake = sub.add_parser("fake-server", help="run a fake ComfyUI for trying comfywatch")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8188)
    fake.add_argument("--run-time", type=float, default=2.0, help="seconds each prompt 'runs'")
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
