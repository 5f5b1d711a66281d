"""Parse ComfyUI queue and history documents into typed values (pure, no I/O).

Remote data is untrusted: every function here accepts arbitrary JSON and either returns a
typed value or raises :class:`~comfywatch.errors.ParseError`, never anything else. Strings
that are stored are capped; secrets in ``extra_data`` are stripped before anything is kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from comfywatch.errors import ParseError
from comfywatch.states import JobState

JSON = Any

#: Caps on what one history entry may put in the database.
MAX_TEXT_CHARS = 16_384
MAX_TRACEBACK_CHARS = 65_536
MAX_NAME_CHARS = 1_024
MAX_OUTPUT_RECORDS = 10_000
MAX_ENTRY_JSON_CHARS = 1_048_576

_TERMINAL_MESSAGES: Mapping[str, JobState] = {
    "execution_success": JobState.SUCCESS,
    "execution_error": JobState.ERROR,
    "execution_interrupted": JobState.INTERRUPTED,
}

#: ``extra_data`` keys that carry credentials (ComfyUI 0.3.45-0.3.67 put API keys there).
_SECRET_KEY = re.compile(
    r"(api[_-]?key|auth|token|secret|password|passwd|credential|cookie)", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One output of one node: a file record, or a plain value (text, booleans, ...)."""

    node_id: str
    kind: str
    position: int
    filename: str | None = None
    subfolder: str | None = None
    type: str | None = None
    #: For file records: any fields beyond filename/subfolder/type; else ``None``.
    extra: dict[str, JSON] | None = None
    #: For non-file records: the value as ComfyUI gave it.
    value: JSON = None

    @property
    def is_file(self) -> bool:
        return self.filename is not None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The node that failed (or was interrupted) and what it raised."""

    node_id: str | None
    node_type: str | None
    exception_type: str | None
    exception_message: str | None
    traceback: str | None


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """A finished prompt as its history entry tells it."""

    prompt_id: str
    outcome: JobState
    status_str: str | None
    completed: bool | None
    number: int | None
    created_at_ms: int | None
    started_at_ms: int | None
    finished_at_ms: int | None
    error: ErrorInfo | None
    outputs: tuple[OutputRecord, ...]
    #: The raw entry with secrets stripped (and oversized parts elided), ready to store.
    entry: dict[str, JSON] = field(repr=False)


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """Who is running and who is waiting on one server, as one ``GET /queue`` showed it."""

    running: frozenset[str]
    pending: frozenset[str]
    #: Queue ``number`` per prompt id (restarts at 0 with the server process).
    numbers: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Progress:
    """A WebSocket ``progress`` message: step ``value`` of ``max`` of node ``node``."""

    prompt_id: str
    node: str | None
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class PromptQueued:
    """A ``POST /prompt`` answer (200): the prompt's id and number, and the outputs that
    failed validation and will not run (``node_errors``; empty when all is well)."""

    prompt_id: str
    number: int | None
    node_errors: dict[str, JSON]


@dataclass(frozen=True, slots=True)
class PromptRefusal:
    """A ``POST /prompt`` refusal (400): ComfyUI's ``error`` and ``node_errors``."""

    error: dict[str, JSON]
    node_errors: dict[str, JSON]


#: Largest progress ``value`` or ``max`` kept (the columns are 32-bit integers).
MAX_PROGRESS = 2**31 - 1


#: Nesting deeper than this in stored JSON is replaced by a marker.
MAX_JSON_DEPTH = 64
_INT64 = 2**63 - 1
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text any database accepts: lone surrogates (from undecodable file names) and NUL
    characters become U+FFFD."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def clean_json(value: JSON, depth: int = 0) -> JSON:
    """A JSON value any database stores: text cleaned, NaN/infinities as null, 64-bit
    integers, nesting capped at MAX_JSON_DEPTH."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_INT64 - 1 <= value <= _INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_JSON_DEPTH:
        return "[nested too deep]"
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v, depth + 1) for v in value]
    return clean_text(str(value))


def _cap(text: str, limit: int) -> str:
    text = clean_text(text)
    if len(text) <= limit:
        return text
    marker = f"... [{len(text) - limit} characters cut]"
    return text[: max(0, limit - len(marker))] + marker


def _opt_str(value: JSON, limit: int = MAX_NAME_CHARS) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _cap(value, limit)
    if isinstance(value, bool | int | float):
        return _cap(str(value), limit)
    return None


def _opt_int(value: JSON) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_INT64 - 1 <= value <= _INT64 else None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return None


def parse_queue(body: JSON) -> QueueSnapshot:
    """Read a ``GET /queue`` answer; items are ``[number, prompt_id, graph, extra, outputs]``."""
    if not isinstance(body, dict):
        raise ParseError(f"queue: expected an object, got {type(body).__name__}")
    lists: dict[str, set[str]] = {}
    numbers: dict[str, int] = {}
    for key in ("queue_running", "queue_pending"):
        items = body.get(key)
        if not isinstance(items, list):
            raise ParseError(f"queue: {key} is missing or not a list")
        ids: set[str] = set()
        for item in items:
            if not isinstance(item, list) or len(item) < 2 or not isinstance(item[1], str):
                raise ParseError(f"queue: malformed item in {key}")
            ids.add(item[1])
            number = _opt_int(item[0])
            if number is not None:
                numbers[item[1]] = number
        lists[key] = ids
    running = frozenset(lists["queue_running"])
    return QueueSnapshot(
        running=running,
        pending=frozenset(lists["queue_pending"] - running),
        numbers=numbers,
    )


def parse_progress(data: JSON) -> Progress:
    """Read the ``data`` of a ``progress`` message: ``{"value", "max", "prompt_id", "node"}``."""
    if not isinstance(data, dict):
        raise ParseError(f"progress: expected an object, got {type(data).__name__}")
    prompt_id = data.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ParseError("progress: no prompt_id")
    value, top = _opt_int(data.get("value")), _opt_int(data.get("max"))
    if (
        value is None
        or top is None
        or not (0 <= value <= MAX_PROGRESS and 0 <= top <= MAX_PROGRESS)
    ):
        raise ParseError("progress: value and max must be whole numbers >= 0")
    return Progress(
        prompt_id=_cap(prompt_id, MAX_NAME_CHARS),
        node=_opt_str(data.get("node")),
        value=value,
        max=top,
    )


def parse_prompt_queued(body: JSON) -> PromptQueued:
    """Read a ``POST /prompt`` answer: ``{"prompt_id", "number", "node_errors"}``."""
    if not isinstance(body, dict):
        raise ParseError(f"expected an object, got {type(body).__name__}")
    prompt_id = body.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ParseError("no prompt_id in the answer")
    node_errors = body.get("node_errors")
    return PromptQueued(
        prompt_id=clean_text(prompt_id),
        number=_opt_int(body.get("number")),
        node_errors=clean_json(node_errors) if isinstance(node_errors, dict) else {},
    )


def parse_prompt_refusal(body: JSON) -> PromptRefusal:
    """Read a ``POST /prompt`` refusal; whatever its shape, an ``error`` with a message."""
    error = body.get("error") if isinstance(body, dict) else None
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"type": "unknown", "message": str(error) if error else "refused", "details": ""}
    return PromptRefusal(
        error=clean_json(error),
        node_errors=clean_json(node_errors) if isinstance(node_errors, dict) else {},
    )


def parse_history_response(prompt_id: str, body: JSON) -> HistoryRecord | None:
    """Read a ``GET /history/{id}`` answer: ``None`` for ``{}`` (not finished, or forgotten)."""
    if not isinstance(body, dict):
        raise ParseError(f"history: expected an object, got {type(body).__name__}")
    if prompt_id not in body:
        # ComfyUI answers {} for every unknown id; anything else is someone else's entry.
        return None
    return parse_history_entry(prompt_id, body[prompt_id])


def parse_history_entry(prompt_id: str, entry: JSON) -> HistoryRecord:
    """Classify one history entry. The outcome comes from the terminal message, not status_str."""
    if not isinstance(entry, dict):
        raise ParseError(f"history entry for {prompt_id!r} is not an object")
    status = entry.get("status")
    if status is None:
        status = {}
    if not isinstance(status, dict):
        raise ParseError(f"history entry for {prompt_id!r}: status is not an object")
    status_str = _opt_str(status.get("status_str"), 64)
    completed_raw = status.get("completed")
    completed = completed_raw if isinstance(completed_raw, bool) else None
    run = _read_messages(status.get("messages"))
    if run.terminal is None:
        success = status_str == "success" or (status_str is None and completed is True)
        outcome = JobState.SUCCESS if success else JobState.ERROR
    else:
        outcome = run.terminal
    number, created_at_ms = _prompt_facts(entry.get("prompt"))
    return HistoryRecord(
        prompt_id=prompt_id,
        outcome=outcome,
        status_str=status_str,
        completed=completed,
        number=number,
        created_at_ms=created_at_ms,
        started_at_ms=run.started_at_ms,
        finished_at_ms=run.finished_at_ms,
        error=run.error,
        outputs=_outputs(entry.get("outputs")),
        entry=sanitize_entry(entry),
    )


@dataclass(frozen=True, slots=True)
class _Run:
    """What an entry's status messages tell of the run."""

    started_at_ms: int | None = None
    #: From the last terminal message (``None``: there was none).
    terminal: JobState | None = None
    finished_at_ms: int | None = None
    error: ErrorInfo | None = None


def _read_messages(messages: JSON) -> _Run:
    """The first ``execution_start`` and the last terminal message among ``messages``."""
    if not isinstance(messages, list):
        return _Run()
    started_at_ms: int | None = None
    terminal: tuple[JobState, dict[str, JSON]] | None = None
    for message in messages:
        if not isinstance(message, list | tuple) or len(message) < 2:
            continue
        name, data = message[0], message[1]
        if not isinstance(data, dict):
            data = {}
        if name == "execution_start" and started_at_ms is None:
            started_at_ms = _opt_int(data.get("timestamp"))
        elif isinstance(name, str) and name in _TERMINAL_MESSAGES:
            terminal = (_TERMINAL_MESSAGES[name], data)
    if terminal is None:
        return _Run(started_at_ms=started_at_ms)
    outcome, data = terminal
    return _Run(
        started_at_ms=started_at_ms,
        terminal=outcome,
        finished_at_ms=_opt_int(data.get("timestamp")),
        error=None if outcome is JobState.SUCCESS else _error_info(data),
    )


def _prompt_facts(prompt: JSON) -> tuple[int | None, int | None]:
    """The queue number and ``extra_data.create_time`` of an entry's ``prompt`` array."""
    if not isinstance(prompt, list) or not prompt:
        return None, None
    created_at_ms: int | None = None
    if len(prompt) > 3 and isinstance(prompt[3], dict):
        created_at_ms = _opt_int(prompt[3].get("create_time"))
    return _opt_int(prompt[0]), created_at_ms


def _error_info(data: Mapping[str, JSON]) -> ErrorInfo:
    traceback = data.get("traceback")
    if isinstance(traceback, list):
        tb_text: str | None = "".join(line for line in traceback if isinstance(line, str))
    else:
        tb_text = _opt_str(traceback, MAX_TRACEBACK_CHARS)
    return ErrorInfo(
        node_id=_opt_str(data.get("node_id")),
        node_type=_opt_str(data.get("node_type")),
        exception_type=_opt_str(data.get("exception_type")),
        exception_message=_opt_str(data.get("exception_message"), MAX_TEXT_CHARS),
        traceback=_cap(tb_text, MAX_TRACEBACK_CHARS) if tb_text else None,
    )


def _outputs(outputs: JSON) -> tuple[OutputRecord, ...]:
    if not isinstance(outputs, dict):
        return ()
    records: list[OutputRecord] = []
    seen: set[tuple[str, str, int]] = set()  # capped names may collide: keep the first
    for node_id, node_outputs in outputs.items():
        node = _cap(str(node_id), MAX_NAME_CHARS)
        if not isinstance(node_outputs, dict):
            if (node, "", 0) not in seen:
                seen.add((node, "", 0))
                records.append(
                    OutputRecord(node_id=node, kind="", position=0, value=clean_json(node_outputs))
                )
                if len(records) >= MAX_OUTPUT_RECORDS:
                    return tuple(records)
            continue
        for kind, values in node_outputs.items():
            kind_name = _cap(str(kind), MAX_NAME_CHARS)
            items = values if isinstance(values, list) else [values]
            for position, item in enumerate(items):
                if (node, kind_name, position) in seen:
                    continue
                seen.add((node, kind_name, position))
                records.append(_output_record(node, kind_name, position, item))
                if len(records) >= MAX_OUTPUT_RECORDS:
                    return tuple(records)
    return tuple(records)


def _output_record(node_id: str, kind: str, position: int, item: JSON) -> OutputRecord:
    if isinstance(item, dict) and isinstance(item.get("filename"), str):
        extra = {
            k: v for k, v in clean_json(item).items() if k not in ("filename", "subfolder", "type")
        }
        return OutputRecord(
            node_id=node_id,
            kind=kind,
            position=position,
            filename=_cap(item["filename"], MAX_NAME_CHARS),
            subfolder=_opt_str(item.get("subfolder")),
            type=_opt_str(item.get("type")),
            extra=extra or None,
        )
    if isinstance(item, str):
        item = _cap(item, MAX_TEXT_CHARS)
    return OutputRecord(node_id=node_id, kind=kind, position=position, value=clean_json(item))


def strip_secrets(extra_data: Mapping[str, JSON]) -> dict[str, JSON]:
    """``extra_data`` without credential-looking keys (``api_key_comfy_org`` and the like)."""
    return {k: v for k, v in extra_data.items() if not _SECRET_KEY.search(str(k))}


def sanitize_entry(entry: Mapping[str, JSON]) -> dict[str, JSON]:
    """The entry as we store it: secrets stripped, text cleaned, size capped by eliding the
    bulky parts."""
    clean: dict[str, JSON] = clean_json(dict(entry))
    prompt = clean.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 3 and isinstance(prompt[3], dict):
        prompt = list(prompt)
        prompt[3] = strip_secrets(prompt[3])
        clean["prompt"] = prompt
    if _json_len(clean) <= MAX_ENTRY_JSON_CHARS:
        return clean
    # Too big: drop the graph and the error's tensor dumps, keep status and outputs.
    if isinstance(prompt, list) and len(prompt) > 2:
        prompt = list(prompt)
        prompt[2] = {"_elided": "graph too large to store"}
        clean["prompt"] = prompt
    status = clean.get("status")
    if isinstance(status, dict) and isinstance(status.get("messages"), list):
        clean["status"] = dict(status, messages=[_slim_message(m) for m in status["messages"]])
    if _json_len(clean) <= MAX_ENTRY_JSON_CHARS:
        return clean
    return {"_elided": "history entry too large to store", "status": _slim_status(status)}


def _slim_message(message: JSON) -> JSON:
    if isinstance(message, list) and len(message) >= 2 and isinstance(message[1], dict):
        data = {
            k: v for k, v in message[1].items() if k not in ("current_inputs", "current_outputs")
        }
        return [message[0], data, *message[2:]]
    return message


def _slim_status(status: JSON) -> JSON:
    if not isinstance(status, dict):
        return None
    return {k: status.get(k) for k in ("status_str", "completed") if k in status}


def _json_len(value: JSON) -> int:
    try:
        return len(json.dumps(value, default=str))
    except (ValueError, RecursionError):
        return MAX_ENTRY_JSON_CHARS + 1
