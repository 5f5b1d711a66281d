"""``submit``: queue an API-format workflow on a server, register the prompt through the
spool (as ``register`` does), and with ``--wait`` follow it to its end with a progress bar
(reading the database, as ``wait`` does).

The registration is checked before anything is sent (an unknown server or hook queues
nothing), and the prompt goes without a client id, so that ComfyUI sends its ``progress``
to every WebSocket, the daemon's included.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfywatch.cli.context import settings_of
from comfywatch.cli.output import (
    EX_CANTCREAT,
    EX_FAILURE,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    err,
    printable,
)

if TYPE_CHECKING:
    from comfywatch.config import ServerSettings, Settings
    from comfywatch.history import PromptQueued

#: What to tell someone who gave a workflow in ComfyUI's UI format.
API_FORMAT_HOWTO = (
    "ComfyUI's POST /prompt takes the API format: in ComfyUI, enable the dev mode "
    'options in the settings, then use "Export (API)" (or "Save (API Format)") and '
    "submit that file"
)


class WorkflowError(ValueError):
    """The workflow file cannot be sent: unreadable, not JSON, or not in the API format."""


def read_workflow(name: str) -> dict[str, Any]:
    """The API-format graph in the file ``name`` (``-``: stdin)."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{name} is not UTF-8 text") from None
    try:
        graph = json.loads(text)
    except ValueError as exc:
        raise WorkflowError(f"{name} is not JSON: {exc}") from None
    if not isinstance(graph, dict):
        raise WorkflowError(
            f"{name}: expected an API-format workflow (a JSON object of nodes), "
            f"got a JSON {type(graph).__name__}"
        )
    if isinstance(graph.get("nodes"), list) and isinstance(graph.get("links"), list):
        raise WorkflowError(
            f'{name} is a workflow in the UI format (it has "nodes" and "links"). '
            + API_FORMAT_HOWTO
        )
    return graph


def describe_node_errors(node_errors: Mapping[str, Any]) -> list[str]:
    """ComfyUI's ``node_errors``, per node and input, one line each (indented)."""
    lines: list[str] = []
    for node_id in sorted(node_errors, key=_node_order):
        node = node_errors[node_id]
        node = node if isinstance(node, dict) else {}
        class_type = node.get("class_type")
        head = f"  node {node_id}" + (f" ({class_type})" if class_type else "")
        outputs = [str(o) for o in node.get("dependent_outputs") or () if str(o) != node_id]
        if outputs:
            head += f", needed by output {', '.join(outputs)}"
        lines.append(head + ":")
        errors = node.get("errors")
        for error in errors if isinstance(errors, list) else ():
            lines.append(f"    - {_error_text(error)}")
    return lines


def describe_refusal(
    server: str, error: Mapping[str, Any], node_errors: Mapping[str, Any]
) -> list[str]:
    """What a ``POST /prompt`` refusal says, readably: the error, then each node's."""
    message = str(error.get("message") or error.get("type") or "refused")
    details = str(error.get("details") or "")
    head = f"{server} refused the workflow: {message}"
    if details and details != message and not node_errors:
        head += f" ({details})"
    return [head, *describe_node_errors(node_errors)]


def _node_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _error_text(error: Any) -> str:
    """One of a node's errors: ``input: message: details (received value)``."""
    if not isinstance(error, dict):
        return str(error)
    extra_info = error.get("extra_info")
    extra: dict[str, Any] = extra_info if isinstance(extra_info, dict) else {}
    input_name = extra.get("input_name")
    message = str(error.get("message") or error.get("type") or "error")
    details = str(error.get("details") or "")
    text = f"{input_name}: {message}" if input_name else message
    if details and details != input_name:
        text += f": {details}"
    if "received_value" in extra and extra["received_value"] is not None:
        text += f" (received {json.dumps(extra['received_value'])})"
    return text


def submit(args: argparse.Namespace) -> int:
    from comfywatch.errors import PromptRefused, ServerError
    from comfywatch.spool.register import check, jobs_file_text
    from comfywatch.spool.register import submit as write_jobs_file

    settings = settings_of(args)
    try:
        graph = read_workflow(args.workflow)
    except WorkflowError as exc:
        err(f"submit: {exc}")
        return EX_USAGE
    labels = dict(args.label)

    def jobs_file(prompt_id: str) -> str:
        return jobs_file_text(args.server, [prompt_id], labels=labels, hooks=args.hooks)

    prompt_id = str(uuid.uuid4())
    try:  # what the daemon would reject is refused before anything is queued
        check(settings, jobs_file(prompt_id))
    except ValueError as exc:
        err(f"submit: {exc}")
        return EX_USAGE
    try:
        queued = _post(settings.servers[args.server], graph, prompt_id)
    except PromptRefused as exc:
        head, *lines = describe_refusal(exc.server, exc.error, exc.node_errors)
        _explain(f"submit: {head}", lines)
        return EX_FAILURE
    except ServerError as exc:
        err(f"submit: {printable(str(exc))}")
        return EX_UNAVAILABLE
    if queued.node_errors:
        _explain(
            f"submit: {args.server} will not run the outputs that failed validation:",
            describe_node_errors(queued.node_errors),
        )
    prompt_id = queued.prompt_id
    try:
        write_jobs_file(settings, jobs_file(prompt_id))
    except (ValueError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(printable(prompt_id), flush=True)
        err(
            printable(
                f"submit: queued as {prompt_id}, but not registered: {reason}; register it "
                f"with: comfywatch register --server {args.server} {prompt_id}"
            )
        )
        return EX_CANTCREAT
    print(printable(prompt_id), flush=True)
    if not args.wait:
        return EX_OK
    return _wait(settings, args.server, prompt_id, args.timeout)


def _explain(head: str, lines: list[str]) -> None:
    """``head`` as an error message, then ``lines`` below it (all on stderr)."""
    err(printable(head))
    for line in lines:
        print(printable(line), file=sys.stderr)


def _post(server: ServerSettings, graph: dict[str, Any], prompt_id: str) -> PromptQueued:
    import asyncio

    from comfywatch.comfy import ComfyClient

    async def post() -> PromptQueued:
        client = ComfyClient(server)
        try:
            return await client.post_prompt(graph, prompt_id=prompt_id)
        finally:
            await client.close()

    return asyncio.run(post())


def _wait(settings: Settings, server: str, prompt_id: str, timeout_s: float | None) -> int:
    from comfywatch.cli.progress_view import ProgressView
    from comfywatch.cli.wait import JobWatch, exit_status, follow, outcome_line

    watch = JobWatch(settings, server=server)
    with ProgressView(prompt_id) as view:
        look, timed_out = follow(watch, [prompt_id], timeout_s=timeout_s, on_look=view.show)
    if look.ended(prompt_id):
        for row in look.jobs.get(prompt_id, []):
            err(printable(outcome_line(row)))
    return exit_status(look, [prompt_id], timed_out=timed_out)
