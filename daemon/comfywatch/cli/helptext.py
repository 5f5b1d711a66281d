"""What ``--help`` says about each command: a description and an example.

Kept apart from the grammar (:mod:`comfywatch.cli.parser`) so that each reads on its own.
A new command adds its entry here; ``tests/test_cli_help.py`` checks that every command
and action has one, and that every option has a help text.
"""

from __future__ import annotations

import argparse

__all__ = ["COMMANDS", "describe"]

_CONFIG_NOTE = """\
--config, --log-level and --log-format go before or after the command. The config file
is --config PATH, else $COMFYWATCH_CONFIG, else /etc/comfywatch/comfywatch.toml."""

#: Command path ("" for ``comfywatch`` itself, "hooks retry" for an action) ->
#: (description, epilog). Each epilog shows at least one example.
COMMANDS: dict[str, tuple[str, str]] = {
    "": (
        "Track ComfyUI prompts to the end; record them in SQLite; fire hooks.",
        f"""\
examples:
  comfywatch --config comfywatch.toml check-config
  comfywatch run --config comfywatch.toml
  comfywatch register --server local 35bd62e6-a6fd-4a32-84d4-365d80bd79d5 --wait
  comfywatch jobs --state error

{_CONFIG_NOTE}
`comfywatch COMMAND --help` tells more about each command.""",
    ),
    "run": (
        """\
Run the daemon until SIGTERM or SIGINT (a graceful stop). It migrates the database,
registers the config's [[jobs]] and the spool files of jobs_dir, watches the servers and
delivers the hooks. SIGHUP, or any change of the config file, reloads the config.""",
        """\
examples:
  comfywatch run --config /etc/comfywatch/comfywatch.toml
  comfywatch run --config ci.toml --until-done   # a batch: exit 0 once all is done""",
    ),
    "check-config": (
        """\
Validate the config file and print its database, servers, hooks and [[jobs]]. Every
mistake is reported (file:line: key: message), then the exit status is 78. Likely
mistakes that are not errors (a missing jobs_dir, files there the daemon ignores, no
servers, jobs whose labels or hooks differ from the database's) are warnings on stderr.
The spool is not read.""",
        """\
example:
  comfywatch check-config --config /etc/comfywatch/comfywatch.toml""",
    ),
    "migrate": (
        """\
Create the database schema, or upgrade it to this version's. The daemon does the same at
start; run it by hand after an upgrade when the query commands say so.""",
        """\
example:
  comfywatch migrate --config /etc/comfywatch/comfywatch.toml""",
    ),
    "healthcheck": (
        """\
Exit 0 if the running daemon is healthy: its /healthz answers 200 when daemon.http is
set, else the database is readable and at this version's schema. Exit 1 otherwise.""",
        """\
example:
  comfywatch healthcheck || systemctl restart comfywatch""",
    ),
    "replicas": (
        """\
List the live replicas sharing the database ([daemon] replicas = true): each one's host,
process, version and last heartbeat, the servers whose lease it holds (it polls them and
sends their jobs' hooks), each lease's epoch and expiry. A table, or a JSON array with
--json. The database is read only, never changed.""",
        """\
examples:
  comfywatch replicas
  comfywatch replicas --json | jq -r '.[] | "\\(.id) \\(.servers | length)"'""",
    ),
    "jobs": (
        """\
List tracked jobs, newest registration first: a table, or a JSON array with --json (the
objects of `show --json`). The table shows the last progress, when each job was
registered, queued, started and finished (UTC) and how long it ran. The filters combine:
all must match. --watch redraws the table until Ctrl-C. The database is read only, never
changed.""",
        """\
examples:
  comfywatch jobs --state error --state timeout
  comfywatch jobs --server local --label batch=catalog-42 --limit 20
  comfywatch jobs --state running --watch --interval 1
  comfywatch jobs --json | jq -r '.[] | select(.state == "success") | .prompt_id'""",
    ),
    "show": (
        """\
Show one job in full: its states and times, its source (the file or command that
registered it), its last progress, the error of a failed prompt, its outputs and its
hook deliveries. A unique prefix of the prompt id is enough, as with git: an ambiguous
one lists the candidates (exit status 2), an unknown one is exit status 1.""",
        """\
examples:
  comfywatch show 35bd62e6-a6fd-4a32-84d4-365d80bd79d5
  comfywatch show 35bd62e6
  comfywatch show 35bd62e6-a6fd-4a32-84d4-365d80bd79d5 --server gpu-2 --json""",
    ),
    "hooks": (
        """\
List hook deliveries, newest first (without an action), or act on them: `retry` sends
dead deliveries again, `new-secret` prints a signing secret for a new webhook.""",
        """\
examples:
  comfywatch hooks --state dead
  comfywatch hooks retry --all-dead
  comfywatch hooks new-secret > /etc/comfywatch/notify.secret""",
    ),
    "hooks retry": (
        """\
Send dead deliveries again (after fixing the receiver): each goes back to pending with a
fresh retry schedule and the same webhook-id. Exit 1 if none of the ids was dead.""",
        """\
examples:
  comfywatch hooks retry 17 18
  comfywatch hooks retry --all-dead""",
    ),
    "hooks new-secret": (
        """\
Print a fresh webhook signing secret: whsec_ and the base64 of 32 random bytes, as
Standard Webhooks has it. Give it to the hook (secret_file or secret_env) and to the
receiver, which verifies the webhook-signature header with it. Needs no config.""",
        """\
example:
  (umask 077; comfywatch hooks new-secret > /etc/comfywatch/notify.secret)""",
    ),
    "hooks test": (
        """\
Send a sample event, signed as a real one, to the hook NAME through the
daemon's own delivery code, and print what the receiver answered. The
event's type is job.test and command hooks get COMFYWATCH_TEST=1, so
receivers can tell it from real events. Nothing is written to the database.
Exit status 0 if the hook took it (2xx, or exit status 0), 1 if not.""",
        """\
example:
  comfywatch hooks test notify --state error""",
    ),
    "register": (
        """\
Register jobs through the spool: check them against the config (exit 2 if the daemon
would reject them), write a file into jobs_dir atomically and print its path. With
--wait, wait for the daemon: exit 0 once the jobs are committed, 1 if the file was
rejected, 75 if it is still waiting after --timeout. Exit 73 if the file cannot be
written.""",
        """\
examples:
  comfywatch register --server local 35bd62e6-a6fd-4a32-84d4-365d80bd79d5 --wait
  comfywatch register --server local ID1 ID2 --label batch=catalog-42 --hooks notify""",
    ),
    "submit": (
        """\
POST the API-format workflow WORKFLOW (a JSON file, or - for stdin) to the
server's /prompt, register the prompt through the spool as `comfywatch
register` does, and print its prompt id. A workflow the server refuses is
explained per node and input (exit status 1). With --wait, follow the job
in the database the daemon writes, with a progress bar, and exit as
`comfywatch wait` does.""",
        """\
example:
  comfywatch submit portrait.json --server local --label batch=b1 --wait

The workflow must be in ComfyUI's API format: enable the dev mode options in
ComfyUI's settings, then use "Export (API)" (or "Save (API Format)").""",
    ),
    "wait": (
        """\
Wait until every PROMPT_ID is terminal, reading the database the daemon
writes (read-only). A job still waiting in the spool is waited for.
Exit status: 0 if every job succeeded, 1 if any ended otherwise, 2 for a
prompt id neither in the database nor in the spool, 124 on timeout.""",
        """\
example:
  comfywatch wait 2ef07158-5d3a-4e4b-9d63-2d1c4fb8f8a1 --timeout 600""",
    ),
    "prune": (
        """\
Delete terminal jobs that finished longer ago than --older-than, with their outputs and
hook deliveries. Kept: jobs still owing a hook delivery, and jobs listed in the config's
[[jobs]] (the daemon would register them again, as new jobs). --dry-run lists both what
would go and what is kept, and changes nothing.""",
        """\
examples:
  comfywatch prune --older-than 30d --dry-run
  comfywatch prune --older-than 12h""",
    ),
    "watch": (
        """\
A live view, redrawn every --interval: each server (up or down, queue length, last poll,
from the daemon's /metrics) and the running, waiting and recently finished jobs, with
their progress (from the database, read-only). q or Ctrl-C quits.""",
        """\
examples:
  comfywatch watch
  comfywatch watch --interval 0.5 --recent 20 --metrics-url http://127.0.0.1:9108/metrics""",
    ),
    "completion": (
        """\
Print a completion script for SHELL (bash, zsh or fish), generated from this command
line: commands, options, state names and file names complete with Tab.""",
        """\
examples:
  source <(comfywatch completion bash)                  # this shell only
  comfywatch completion bash > ~/.local/share/bash-completion/completions/comfywatch
  comfywatch completion zsh > "${fpath[1]}/_comfywatch"
  comfywatch completion fish > ~/.config/fish/completions/comfywatch.fish""",
    ),
    "fake-server": (
        """\
Run a fake ComfyUI until SIGTERM or SIGINT, for trying comfywatch and your hooks without
a GPU, and for benchmarks. Each prompt "runs" for --run-time seconds; an
extra_data.comfywatch_fake object in POST /prompt scripts its outcome. GET /_fake/stats
tells what each client cost it. The url of a [servers.NAME] in the config points at it.""",
        """\
examples:
  comfywatch fake-server --run-time 5
  comfywatch fake-server --port 8190   # when 8188 is taken: url = "http://127.0.0.1:8190"
  comfywatch fake-server --port 0 --prefill 1000 --graph-bytes 4096""",
    ),
}


def describe(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give ``parser`` and its commands, recursively, their entries of :data:`COMMANDS`."""
    if path in COMMANDS:
        parser.description, parser.epilog = COMMANDS[path]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                describe(child, f"{path} {name}".strip())
