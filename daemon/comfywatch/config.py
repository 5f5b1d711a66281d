"""Configuration: TOML files to validated, immutable settings, with job drop-ins.

``load_settings(path)`` reads the main file and every ``jobs_dir/*.toml`` drop-in, checks
them with pydantic models (unknown keys, types, ranges), resolves what depends on the
file's place and the environment (relative paths, secrets, commands on ``PATH``) and
returns one frozen :class:`Settings`. Every problem is a :class:`ConfigError` naming the
file, the dotted key and, where it can be found, the line. Secrets (header values,
webhook keys, database passwords) never appear in an error message or a ``repr``.

``config_fingerprint(settings)`` costs a few ``os.stat`` calls, so the daemon can compare
it with ``settings.fingerprint`` on every tick and reload when a file changed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import difflib
import ipaddress
import json
import os
import re
import shutil
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError

from comfywatch.errors import ConfigError
from comfywatch.states import TERMINAL_STATES, JobState

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RETRY_SCHEDULE_S",
    "CommandHookSettings",
    "DaemonSettings",
    "HookSettings",
    "JobSpec",
    "RedactedHeaders",
    "ServerSettings",
    "Settings",
    "WebhookHookSettings",
    "config_fingerprint",
    "default_config_path",
    "format_key",
    "key_lines",
    "line_of_key",
    "load_settings",
    "redact_url",
]

CONFIG_ENV_VAR = "COMFYWATCH_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/comfywatch/comfywatch.toml")
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (
    5.0,
    300.0,
    1800.0,
    7200.0,
    18000.0,
    36000.0,
    36000.0,
)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format marker, not a secret

KeyPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits in a TOML document: ``("jobs", 3, "server")``."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")  # names are stored in VARCHAR(255)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_RE = re.compile(r"[^\s,\]}#]+")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_SCHEME_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
_TOML_ERROR_POS_RE = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_ERROR_END_RE = re.compile(r"\s*\(at end of document\)$")
_TERMINAL_NAMES: tuple[str, ...] = tuple(sorted(state.value for state in TERMINAL_STATES))
_MAIN_KEYS = ("daemon", "servers", "hooks", "jobs")
_DROP_IN_KEYS = ("jobs",)


# --------------------------------------------------------------------------- results


class RedactedHeaders(Mapping[str, str]):
    """Read-only HTTP headers whose ``repr`` shows the names only: values are credentials."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: '***'" for name in self._items) + "}"


def _repr(obj: DataclassInstance, **shown: str) -> str:
    """A dataclass repr where the fields named in ``shown`` are replaced by that text."""
    parts: list[str] = []
    for item in dataclasses.fields(obj):
        if not item.repr:
            continue
        text = shown.get(item.name)
        parts.append(f"{item.name}={text if text is not None else repr(getattr(obj, item.name))}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """One ComfyUI server to watch."""

    name: str
    url: str  # http(s)://host[:port][/prefix], no trailing slash
    headers: Mapping[str, str]  # sent on every request; values never shown
    queue_timeout_s: float | None
    run_timeout_s: float | None
    request_timeout_s: float
    max_response_bytes: int
    max_history_fetches: int
    #: Listen on ComfyUI's WebSocket for queue changes and poll at once (polling stays
    #: the source of truth; this only shortens the time to notice a finished prompt).
    websocket: bool = True


@dataclass(frozen=True, slots=True)
class WebhookHookSettings:
    """POST the finished job as JSON, signed per Standard Webhooks when a secret is set."""

    name: str
    type: Literal["webhook"]
    url: str
    secret: bytes | None  # the decoded key, not the "whsec_..." text
    on: frozenset[JobState]
    timeout_s: float
    headers: Mapping[str, str]
    retry_schedule_s: tuple[float, ...]
    secret_file: Path | None = None  # where the secret came from (watched for changes)
    secret_env: str | None = None

    def __repr__(self) -> str:
        return _repr(
            self,
            url=repr(url_origin(self.url)),
            secret="'***'" if self.secret is not None else "None",
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class CommandHookSettings:
    """Run ``argv`` (no shell) with the finished job as JSON on stdin."""

    name: str
    type: Literal["command"]
    argv: tuple[str, ...]  # argv[0] is an absolute path
    on: frozenset[JobState]
    timeout_s: float
    retry_schedule_s: tuple[float, ...]
    max_output_bytes: int


HookSettings: TypeAlias = WebhookHookSettings | CommandHookSettings


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One prompt to track, from the main file or a drop-in."""

    server: str
    prompt_id: str
    labels: Mapping[str, str]
    hooks: tuple[str, ...]  # daemon.default_hooks already applied when the job names none
    source: str  # the file it came from
    line: int | None = None  # the line of its [[jobs]] table, when known


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The ``[daemon]`` table, with paths resolved and defaults applied."""

    database_url: str  # sqlite URLs carry an absolute path: sqlite:////abs/path.db
    poll_interval_s: float
    jobs_dir: Path | None
    not_found_after_s: float
    default_hooks: tuple[str, ...]
    http_host: str | None  # IPv6 without brackets
    http_port: int | None
    retention_days: float | None
    log_level: str  # debug | info | warning | error
    log_format: str  # auto | json | console
    hook_concurrency: int
    max_history_fetches: int = 8  # the default for servers that set none

    def __repr__(self) -> str:
        return _repr(self, database_url=repr(redact_url(self.database_url)))

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon needs, validated; built once per (re)load and passed down."""

    path: Path  # the main file, absolute
    daemon: DaemonSettings
    servers: Mapping[str, ServerSettings]
    hooks: Mapping[str, HookSettings]
    jobs: tuple[JobSpec, ...]
    drop_ins: tuple[Path, ...] = ()  # the drop-in files read, in order
    # config_fingerprint() as of just before the files were read: compare to reload.
    fingerprint: tuple[object, ...] = field(default=(), repr=False, compare=False)


# --------------------------------------------------------------------- file models


def _check_no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME_RE.fullmatch(value):
        raise ValueError("not a valid HTTP header name")
    return value


def _check_header_value(value: str) -> str:
    if any(char in value for char in "\r\n\x00"):
        raise ValueError("header values must not contain line breaks or NUL characters")
    return value


def _check_terminal_state(value: str) -> str:
    if value not in _TERMINAL_NAMES:
        raise ValueError(
            f"{value!r} is not a terminal state{_suggest(value, _TERMINAL_NAMES)}; "
            f"expected one of: {', '.join(_TERMINAL_NAMES)}"
        )
    return value


def _check_prompt_id(value: str) -> str:
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
        raise ValueError("must not contain control characters")
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError("not a valid environment variable name")
    return value


def _check_listen(value: str) -> str:
    _parse_listen(value)
    return value


def _check_server_url(value: str) -> str:
    return _check_http_url(value, allow_query=False).rstrip("/")


def _check_webhook_url(value: str) -> str:
    return _check_http_url(value, allow_query=True)


_Text = Annotated[str, AfterValidator(_check_no_nul)]
_NonEmpty = Annotated[str, Field(min_length=1), AfterValidator(_check_no_nul)]
_PositiveS = Annotated[float, Field(gt=0)]
_DelayS = Annotated[float, Field(ge=0)]
_HeaderName = Annotated[str, AfterValidator(_check_header_name)]
_HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
_Headers = dict[_HeaderName, _HeaderValue]
_StateName = Annotated[str, AfterValidator(_check_terminal_state)]
_HookName = Annotated[str, Field(min_length=1)]
_HistoryFetches = Annotated[int, Field(ge=1, le=256)]
_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _all_terminal_names() -> list[str]:
    return list(_TERMINAL_NAMES)


def _default_retry_schedule() -> list[float]:
    return list(DEFAULT_RETRY_SCHEDULE_S)


class _DaemonTable(BaseModel):
    model_config = _MODEL_CONFIG

    database: _NonEmpty = "sqlite:///comfywatch.db"
    poll_interval_s: _PositiveS = 1.0
    jobs_dir: _NonEmpty | None = None
    not_found_after_s: _DelayS = 60.0
    default_hooks: list[_HookName] = Field(default_factory=list)
    http: Annotated[str, AfterValidator(_check_listen)] | None = None
    retention_days: _PositiveS | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    max_history_fetches: _HistoryFetches = 8
    hook_concurrency: Annotated[int, Field(ge=1)] = 8


class _ServerTable(BaseModel):
    model_config = _MODEL_CONFIG

    url: Annotated[str, AfterValidator(_check_server_url)]
    headers: _Headers = Field(default_factory=dict)
    queue_timeout_s: _PositiveS | None = None
    run_timeout_s: _PositiveS | None = None
    request_timeout_s: _PositiveS = 10.0
    max_response_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_RESPONSE_BYTES
    max_history_fetches: _HistoryFetches | None = None
    websocket: StrictBool = True


class _WebhookTable(BaseModel):
    model_config = _MODEL_CONFIG

    type: Literal["webhook"]
    url: Annotated[str, AfterValidator(_check_webhook_url)]
    secret_file: _NonEmpty | None = None
    secret_env: Annotated[str, AfterValidator(_check_env_name)] | None = None
    on: Annotated[list[_StateName], Field(min_length=1)] = Field(
        default_factory=_all_terminal_names
    )
    timeout_s: _PositiveS = 10.0
    headers: _Headers = Field(default_factory=dict)
    retry_schedule_s: list[_DelayS] = Field(default_factory=_default_retry_schedule)


class _CommandTable(BaseModel):
    model_config = _MODEL_CONFIG

    type: Literal["command"]
    argv: Annotated[list[_Text], Field(min_length=1)]
    on: Annotated[list[_StateName], Field(min_length=1)] = Field(
        default_factory=_all_terminal_names
    )
    timeout_s: _PositiveS = 60.0
    retry_schedule_s: list[_DelayS] = Field(default_factory=_default_retry_schedule)
    max_output_bytes: Annotated[int, Field(ge=0)] = DEFAULT_MAX_OUTPUT_BYTES


class _JobTable(BaseModel):
    model_config = _MODEL_CONFIG

    server: Annotated[str, Field(min_length=1)]
    prompt_id: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_check_prompt_id)]
    labels: dict[str, str] = Field(default_factory=dict)
    hooks: list[_HookName] | None = None


_HOOK_MODELS: dict[str, type[_WebhookTable] | type[_CommandTable]] = {
    "webhook": _WebhookTable,
    "command": _CommandTable,
}


# ------------------------------------------------------------------ key -> line index


@dataclass(slots=True)
class _Frame:
    path: KeyPath | None  # None: positions inside are not recorded
    is_array: bool
    index: int = 0
    expecting: bool = True  # an array element starts at the next token


class _KeyLineScanner:
    """Finds the line of each table header, key and array element in valid TOML text.

    Not a parser: it relies on tomllib having accepted the text, follows strings,
    comments and brackets so that they cannot be mistaken for keys, and records the
    first line where each key path appears.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.table: KeyPath = ()
        self.arrays: dict[KeyPath, int] = {}  # array-of-tables path -> tables so far

    def run(self) -> None:
        text = self.text
        while self.pos < len(text):
            self._skip_blank()
            if self.pos >= len(text):
                break
            char = text[self.pos]
            if char == "\n":
                self._advance(1)
                continue
            if char == "[":
                self._header()
            elif char != "#":
                self._key_value()
            self._skip_line()

    def _advance(self, count: int) -> None:
        end = min(self.pos + max(count, 1), len(self.text))
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def _skip_blank(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r":
            self.pos += 1

    def _skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self._advance((len(self.text) if end < 0 else end + 1) - self.pos)

    def _record(self, path: KeyPath) -> None:
        """Records ``path`` and the tables it implies (``[a.b]`` defines ``a`` too)."""
        for size in range(len(path), 0, -1):
            if path[:size] in self.lines:
                break
            self.lines[path[:size]] = self.line

    def _resolve(self, keys: list[str]) -> KeyPath:
        """A header's keys as a path, with the current index of each array of tables."""
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self.arrays.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def _header(self) -> None:
        double = self.text.startswith("[[", self.pos)
        self._advance(2 if double else 1)
        keys = self._dotted_key()
        if not keys:
            self.table = ("\x00unknown",)  # never matches a real key
            return
        if double:
            array = (*self._resolve(keys[:-1]), keys[-1])
            index = self.arrays.get(array, 0)
            self.arrays[array] = index + 1
            self._record(array)
            self.table = (*array, index)
        else:
            self.table = self._resolve(keys)
        self._record(self.table)

    def _key_value(self) -> None:
        keys = self._dotted_key()
        self._skip_blank()
        if not keys or self.pos >= len(self.text) or self.text[self.pos] != "=":
            return
        self.pos += 1
        path = (*self.table, *keys)
        self._record(path)
        self._value(path)

    def _dotted_key(self) -> list[str] | None:
        keys: list[str] = []
        while True:
            self._skip_blank()
            key = self._simple_key()
            if key is None:
                return None
            keys.append(key)
            self._skip_blank()
            if self.pos < len(self.text) and self.text[self.pos] == ".":
                self.pos += 1
                continue
            return keys

    def _simple_key(self) -> str | None:
        text, pos = self.text, self.pos
        if pos >= len(text):
            return None
        char = text[pos]
        if char == '"':
            end = pos + 1
            while end < len(text) and text[end] not in '"\n':
                end += 2 if text[end] == "\\" else 1
            if end >= len(text) or text[end] != '"':
                return None
            self.pos = end + 1
            return _decode_basic_string(text[pos : end + 1])
        if char == "'":
            end = text.find("'", pos + 1)
            if end < 0 or "\n" in text[pos:end]:
                return None
            self.pos = end + 1
            return text[pos + 1 : end]
        match = _BARE_KEY_RE.match(text, pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group()

    def _value(self, path: KeyPath) -> None:
        """Skips one value (which may span lines), recording where array elements start."""
        text = self.text
        stack: list[_Frame] = []
        self._skip_blank()
        self._value_start(path, stack)
        while stack and self.pos < len(text):
            char = text[self.pos]
            frame = stack[-1]
            if char in " \t\r\n":
                self._advance(1)
            elif char == "#":
                end = text.find("\n", self.pos)
                self._advance((len(text) if end < 0 else end) - self.pos)
            elif char in "]}":
                stack.pop()
                self._advance(1)
            elif char == ",":
                if frame.is_array:
                    frame.index += 1
                    frame.expecting = True
                self._advance(1)
            elif frame.is_array and frame.expecting:
                frame.expecting = False
                element = None if frame.path is None else (*frame.path, frame.index)
                self._value_start(element, stack)
            elif char in "[{":
                self._value_start(None, stack)
            elif char in "\"'":
                self._skip_string()
            else:
                self._advance(1)

    def _value_start(self, path: KeyPath | None, stack: list[_Frame]) -> None:
        if path is not None:
            self._record(path)
        if self.pos >= len(self.text):
            return
        char = self.text[self.pos]
        if char == "[":
            stack.append(_Frame(path, is_array=True))
            self._advance(1)
        elif char == "{":
            stack.append(_Frame(None, is_array=False))
            self._advance(1)
        elif char in "\"'":
            self._skip_string()
        else:
            match = _SCALAR_RE.match(self.text, self.pos)
            self._advance(match.end() - self.pos if match else 1)

    def _skip_string(self) -> None:
        text, start = self.text, self.pos
        quote = text[start]
        escapes = quote == '"'
        if text.startswith(quote * 3, start):
            end = start + 3
            while end < len(text):
                if escapes and text[end] == "\\":
                    end += 2
                elif text.startswith(quote * 3, end):
                    end += 3
                    extra = 0  # up to two quotes may end the content: """a"""""
                    while extra < 2 and end < len(text) and text[end] == quote:
                        end += 1
                        extra += 1
                    break
                else:
                    end += 1
        else:
            end = start + 1
            while end < len(text) and text[end] not in (quote, "\n"):
                end += 2 if escapes and text[end] == "\\" else 1
            if end < len(text) and text[end] == quote:
                end += 1
        self._advance(min(end, len(text)) - start)


def _decode_basic_string(raw: str) -> str:
    try:
        value = tomllib.loads(f"k = {raw}")["k"]
    except tomllib.TOMLDecodeError:
        return raw[1:-1]
    return str(value)


def key_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path of valid TOML ``text`` to the line where it first appears.

    Table headers map to their own line (``("servers", "local")``), the n-th ``[[jobs]]``
    to ``("jobs", n)``, keys to their ``key =`` line (dotted keys and keys in table headers
    included) and elements of arrays to the line they start on. Best effort: for text
    tomllib rejects it returns what it found so far.
    """
    scanner = _KeyLineScanner(text)
    with contextlib.suppress(IndexError, ValueError):
        scanner.run()
    return scanner.lines


def line_of_key(lines: Mapping[KeyPath, int], loc: KeyPath) -> int | None:
    """The line of ``loc``, else of its nearest enclosing key or table; None if unknown."""
    for size in range(len(loc), 0, -1):
        line = lines.get(loc[:size])
        if line is not None:
            return line
    return None


def format_key(loc: KeyPath) -> str:
    """``("servers", "local", "url")`` -> ``servers.local.url``; ``("jobs", 3)`` -> ``jobs[3]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        text = f"{text}.{name}" if text else name
    return text


# -------------------------------------------------------------------------- helpers


def _suggest(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _check_http_url(value: str, *, allow_query: bool) -> str:
    """Checks an http(s) URL; messages never repeat it (it may carry a token)."""
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ValueError("URL must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("URL must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not contain credentials: send them in headers instead")
    if parts.query and not allow_query:
        raise ValueError("URL must not have a ?query")
    if parts.fragment or value.endswith("#"):
        raise ValueError("URL must not have a #fragment")
    return value


def _parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` / ``"localhost:9464"`` -> (host, port)."""
    usage = 'must be "host:port", e.g. "127.0.0.1:9464" or "[::1]:9464"'
    bracketed = re.fullmatch(r"\[(?P<host>[^\]]+)\]:(?P<port>\d{1,5})", value)
    plain = re.fullmatch(r"(?P<host>[^:\[\]\s/]+):(?P<port>\d{1,5})", value)
    match = bracketed or plain
    if match is None:
        raise ValueError(usage)
    host, port = match["host"], int(match["port"])
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{usage}: [{host}] is not an IPv6 address") from None
    if port > 65535:
        raise ValueError("port must be between 0 and 65535")
    return host, port


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to log or show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def url_origin(url: str) -> str:
    """``https://host:port`` plus ``/...`` when the URL has more (paths can hold tokens)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    return origin + "/..." if parts.path.strip("/") or parts.query else origin


def _decode_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; messages never repeat the secret."""
    value = text.strip()
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(
            "not a Standard Webhooks secret: expected whsec_ followed by base64 "
            "(the secret's value is not shown)"
        )
    body = value[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "the part after whsec_ is not valid base64 (the secret's value is not shown)"
        ) from None
    if not key:
        raise ValueError("the secret is empty after whsec_")
    return key


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a component of the path is not a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


StatKey: TypeAlias = tuple[int, int, int, int, int] | None


def _stat_key(path: Path) -> StatKey:
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _is_drop_in(name: str) -> bool:
    return name.endswith(".toml") and not name.startswith(".")


def _drop_in_names(directory: Path) -> list[str] | None:
    """Sorted drop-in names in ``directory``; None if it does not exist. Raises OSError."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return None
    return sorted(entry.name for entry in entries if _is_drop_in(entry.name))


def _listing_key(directory: Path | None) -> tuple[tuple[str, StatKey], ...] | None:
    if directory is None:
        return None
    try:
        names = _drop_in_names(directory)
    except (OSError, ValueError):
        return None
    if names is None:
        return None
    return tuple((name, _stat_key(directory / name)) for name in names)


# ----------------------------------------------------------------------- documents


@dataclass(slots=True)
class _Document:
    """One parsed TOML file, able to turn a key path into a located ConfigError."""

    path: Path
    text: str
    data: dict[str, Any]
    _lines: dict[KeyPath, int] | None = None

    def line_of(self, loc: KeyPath) -> int | None:
        if self._lines is None:
            self._lines = key_lines(self.text)
        return line_of_key(self._lines, loc)

    def error(self, loc: KeyPath, message: str) -> ConfigError:
        return ConfigError(
            message, file=str(self.path), key=format_key(loc) or None, line=self.line_of(loc)
        )


def _read_document(path: Path, *, kind: str) -> _Document:
    problem: ConfigError | None = None
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else "not a valid path"
        raise ConfigError(f"cannot read {kind}: {reason}", file=str(path)) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = ConfigError(
            f"{kind} is not valid UTF-8 text (byte {exc.start})", file=str(path), line=line
        )
    if problem is not None:
        raise problem
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = _syntax_error(path, text, str(exc))
    except RecursionError:
        problem = ConfigError(f"{kind} nests arrays or tables too deeply", file=str(path))
    if problem is not None:
        raise problem
    return _Document(path=path, text=text, data=data)


def _syntax_error(path: Path, text: str, message: str) -> ConfigError:
    line: int | None = None
    if match := _TOML_ERROR_POS_RE.search(message):
        line = int(match["line"])
        message = f"{message[: match.start()]} (column {match['column']})"
    elif match := _TOML_ERROR_END_RE.search(message):
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        message = f"{message[: match.start()]} (at end of file)"
    return ConfigError(f"TOML syntax error: {message}", file=str(path), line=line)


_M = TypeVar("_M", bound=BaseModel)


def _validate(
    doc: _Document,
    model: type[_M],
    data: object,
    loc: KeyPath,
    *,
    other: tuple[str, type[BaseModel]] | None = None,
) -> _M:
    """Validates one table; the first problem (by line) becomes a ConfigError."""
    if not isinstance(data, dict):
        raise doc.error(loc, f"must be a table (got {_toml_type(data)})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_explain(error, model, other) for error in exc.errors(include_url=False)]
    # Raised outside the except block, so the pydantic error (which quotes input values,
    # secrets included) is not chained to ours. The first problem in file order wins, but
    # a missing key ranks last: a misspelt key nearby ("promt_id") says more.
    located = [((*loc, *sub), message, kind == "missing") for sub, message, kind in problems]
    first_loc, message, _ = min(
        located, key=lambda item: (item[2], doc.line_of(item[0]) or 1 << 30, len(item[0]))
    )
    raise doc.error(first_loc, message)


def _explain(
    error: Any, model: type[BaseModel], other: tuple[str, type[BaseModel]] | None
) -> tuple[KeyPath, str, str]:
    """A pydantic error as (key path in the table, message without the input value, type)."""
    loc, message = _explain_message(error, model, other)
    return loc, message, str(error["type"])


def _explain_message(
    error: Any, model: type[BaseModel], other: tuple[str, type[BaseModel]] | None
) -> tuple[KeyPath, str]:
    loc: KeyPath = tuple(part for part in error["loc"] if part != "[key]")
    kind: str = error["type"]
    message: str = error["msg"]
    if kind == "extra_forbidden" and len(loc) == 1:
        name = str(loc[0])
        if other is not None and name in other[1].model_fields:
            return loc, f"unknown key here: {name!r} belongs to {other[0]} hooks"
        return loc, "unknown key" + _suggest(name, tuple(model.model_fields))
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "value_error":
        return loc, message.removeprefix("Value error, ")
    if kind == "too_short" and error.get("ctx", {}).get("min_length") == 1:
        return loc, "must not be empty"
    message = message.replace("Input should be", "must be", 1)
    if kind.endswith("_type") or (kind == "literal_error" and not isinstance(error["input"], str)):
        message += f" (got {_toml_type(error['input'])})"
    return loc, message


# -------------------------------------------------------------------------- loading


@dataclass(slots=True)
class _Seen:
    source: str
    line: int | None
    key: str


class _Loader:
    """One load: reads the files, validates them and resolves what depends on the host."""

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self.folder = path.parent
        self.env = env

    def load(self) -> Settings:
        main_key = _stat_key(self.path)
        doc = _read_document(self.path, kind="config file")
        self._check_top_level(doc, _MAIN_KEYS)
        raw_daemon = _validate(doc, _DaemonTable, doc.data.get("daemon", {}), ("daemon",))
        servers = self._servers(doc, raw_daemon)
        hooks, secret_keys = self._hooks(doc)
        daemon = self._daemon(doc, raw_daemon, hooks)
        listing_key, drop_ins = self._drop_ins(doc, daemon.jobs_dir)
        jobs = self._jobs(doc, daemon, servers, hooks)
        for path in drop_ins:
            drop_in = _read_document(path, kind="jobs drop-in file")
            self._check_top_level(drop_in, _DROP_IN_KEYS)
            jobs.extend(self._jobs(drop_in, daemon, servers, hooks))
        self._check_unique(jobs)
        return Settings(
            path=self.path,
            daemon=daemon,
            servers=MappingProxyType(servers),
            hooks=MappingProxyType(hooks),
            jobs=tuple(job for job, _ in jobs),
            drop_ins=tuple(drop_ins),
            fingerprint=(main_key, listing_key, tuple(secret_keys)),
        )

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.folder / path

    @staticmethod
    def _check_top_level(doc: _Document, allowed: tuple[str, ...]) -> None:
        only = "; drop-in files may only hold [[jobs]] tables" if allowed == _DROP_IN_KEYS else ""
        for key in doc.data:
            if key not in allowed:
                raise doc.error((key,), f"unknown key{_suggest(key, allowed)}{only}")

    def _table_of_tables(self, doc: _Document, key: str) -> dict[str, Any]:
        tables = doc.data.get(key, {})
        if not isinstance(tables, dict):
            raise doc.error((key,), f"must be a table of named tables, e.g. [{key}.name]")
        for name in tables:
            if not _NAME_RE.fullmatch(name):
                raise doc.error(
                    (key, name),
                    "names may only use letters, digits, '_', '.' and '-' (255 at most)",
                )
        return tables

    def _servers(self, doc: _Document, raw_daemon: _DaemonTable) -> dict[str, ServerSettings]:
        servers: dict[str, ServerSettings] = {}
        for name, table in self._table_of_tables(doc, "servers").items():
            raw = _validate(doc, _ServerTable, table, ("servers", name))
            servers[name] = ServerSettings(
                name=name,
                url=raw.url,
                headers=RedactedHeaders(raw.headers),
                queue_timeout_s=raw.queue_timeout_s,
                run_timeout_s=raw.run_timeout_s,
                request_timeout_s=raw.request_timeout_s,
                max_response_bytes=raw.max_response_bytes,
                max_history_fetches=(
                    raw.max_history_fetches
                    if raw.max_history_fetches is not None
                    else raw_daemon.max_history_fetches
                ),
                websocket=raw.websocket,
            )
        return servers

    def _hooks(self, doc: _Document) -> tuple[dict[str, HookSettings], list[StatKey]]:
        hooks: dict[str, HookSettings] = {}
        secret_keys: list[StatKey] = []
        for name, table in self._table_of_tables(doc, "hooks").items():
            loc: KeyPath = ("hooks", name)
            if not isinstance(table, dict):
                raise doc.error(loc, f"must be a table (got {_toml_type(table)})")
            kind = table.get("type")
            if kind is None:
                raise doc.error((*loc, "type"), 'required key is missing: "webhook" or "command"')
            if kind == "webhook":
                webhook = _validate(
                    doc, _WebhookTable, table, loc, other=("command", _CommandTable)
                )
                hooks[name] = self._webhook(doc, loc, name, webhook, secret_keys)
            elif kind == "command":
                command = _validate(
                    doc, _CommandTable, table, loc, other=("webhook", _WebhookTable)
                )
                hooks[name] = self._command(doc, loc, name, command)
            else:
                got = "" if isinstance(kind, str) else f" (got {_toml_type(kind)})"
                raise doc.error((*loc, "type"), f'must be "webhook" or "command"{got}')
        return hooks, secret_keys

    def _webhook(
        self,
        doc: _Document,
        loc: KeyPath,
        name: str,
        raw: _WebhookTable,
        secret_keys: list[StatKey],
    ) -> WebhookHookSettings:
        secret: bytes | None = None
        secret_path: Path | None = None
        if raw.secret_file is not None and raw.secret_env is not None:
            raise doc.error((*loc, "secret_env"), "set secret_file or secret_env, not both")
        if raw.secret_file is not None:
            key_loc: KeyPath = (*loc, "secret_file")
            secret_path = self._resolve(raw.secret_file)
            secret_keys.append(_stat_key(secret_path))
            secret = self._decode(doc, key_loc, self._read_secret(doc, key_loc, secret_path))
        elif raw.secret_env is not None:
            key_loc = (*loc, "secret_env")
            value = self.env.get(raw.secret_env)
            if value is None:
                raise doc.error(key_loc, f"environment variable {raw.secret_env} is not set")
            secret = self._decode(doc, key_loc, value)
        return WebhookHookSettings(
            name=name,
            type="webhook",
            url=raw.url,
            secret=secret,
            on=frozenset(JobState(state) for state in raw.on),
            timeout_s=raw.timeout_s,
            headers=RedactedHeaders(raw.headers),
            retry_schedule_s=tuple(raw.retry_schedule_s),
            secret_file=secret_path,
            secret_env=raw.secret_env,
        )

    @staticmethod
    def _read_secret(doc: _Document, loc: KeyPath, path: Path) -> str:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise doc.error(loc, f"cannot read secret file {path}: {_os_reason(exc)}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        raise doc.error(loc, f"secret file {path} is not UTF-8 text")

    @staticmethod
    def _decode(doc: _Document, loc: KeyPath, text: str) -> bytes:
        try:
            return _decode_secret(text)
        except ValueError as exc:
            message = str(exc)
        raise doc.error(loc, message)

    def _command(
        self, doc: _Document, loc: KeyPath, name: str, raw: _CommandTable
    ) -> CommandHookSettings:
        program = raw.argv[0]
        key_loc: KeyPath = (*loc, "argv", 0)
        if not program:
            raise doc.error(key_loc, "the command must not be empty")
        if "/" in program:
            path = self._resolve(program)
            try:
                info = path.stat()
            except OSError as exc:
                raise doc.error(key_loc, f"command {path}: {_os_reason(exc)}") from None
            if not stat.S_ISREG(info.st_mode):
                raise doc.error(key_loc, f"command {path} is not a regular file")
            if not os.access(path, os.X_OK):
                raise doc.error(key_loc, f"command {path} is not executable")
        else:
            found = shutil.which(program, path=self.env.get("PATH", os.defpath))
            if found is None:
                raise doc.error(
                    key_loc,
                    f"command {program!r} not found on PATH (give an absolute path instead)",
                )
            path = Path(found).absolute()
        return CommandHookSettings(
            name=name,
            type="command",
            argv=(str(path), *raw.argv[1:]),
            on=frozenset(JobState(state) for state in raw.on),
            timeout_s=raw.timeout_s,
            retry_schedule_s=tuple(raw.retry_schedule_s),
            max_output_bytes=raw.max_output_bytes,
        )

    def _daemon(
        self, doc: _Document, raw: _DaemonTable, hooks: Mapping[str, HookSettings]
    ) -> DaemonSettings:
        loc: KeyPath = ("daemon",)
        try:
            database_url = self._database_url(raw.database)
        except ValueError as exc:
            message = str(exc)
        else:
            message = ""
        if message:
            raise doc.error((*loc, "database"), message)
        self._check_hook_names(doc, (*loc, "default_hooks"), raw.default_hooks, hooks)
        host, port = _parse_listen(raw.http) if raw.http is not None else (None, None)
        jobs_dir = self._resolve(raw.jobs_dir) if raw.jobs_dir is not None else None
        return DaemonSettings(
            database_url=database_url,
            poll_interval_s=raw.poll_interval_s,
            jobs_dir=jobs_dir,
            not_found_after_s=raw.not_found_after_s,
            default_hooks=tuple(raw.default_hooks),
            http_host=host,
            http_port=port,
            retention_days=raw.retention_days,
            log_level=raw.log_level,
            log_format=raw.log_format,
            hook_concurrency=raw.hook_concurrency,
            max_history_fetches=raw.max_history_fetches,
        )

    def _database_url(self, url: str) -> str:
        """sqlite URLs get an absolute path (driver left to the store); others pass as given."""
        match = _URL_SCHEME_RE.fullmatch(url)
        if match is None:
            raise ValueError(
                "must be a SQLAlchemy database URL, e.g. sqlite:///comfywatch.db "
                "or postgresql://user@host/db"
            )
        scheme = match["scheme"].lower()
        if scheme != "sqlite" and not scheme.startswith("sqlite+"):
            return url
        rest = match["rest"]
        if not rest:
            return "sqlite:///:memory:"
        if not rest.startswith("/"):
            raise ValueError(
                "sqlite URLs look like sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        database, sep, query = rest[1:].partition("?")
        if database in ("", ":memory:") or "uri=true" in query.lower():
            return f"sqlite:///{database or ':memory:'}{sep}{query}"
        return f"sqlite:///{self._resolve(database)}{sep}{query}"

    @staticmethod
    def _check_hook_names(
        doc: _Document, loc: KeyPath, names: list[str], hooks: Mapping[str, HookSettings]
    ) -> None:
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name not in hooks:
                known = ", ".join(hooks) or "none are configured"
                raise doc.error(
                    (*loc, index),
                    f"unknown hook {name!r}{_suggest(name, tuple(hooks))}; hooks: {known}",
                )
            if name in seen:
                raise doc.error((*loc, index), f"hook {name!r} is listed twice")
            seen.add(name)

    def _drop_ins(
        self, doc: _Document, directory: Path | None
    ) -> tuple[tuple[tuple[str, StatKey], ...] | None, list[Path]]:
        if directory is None:
            return None, []
        loc: KeyPath = ("daemon", "jobs_dir")
        try:
            names = _drop_in_names(directory)
        except NotADirectoryError:
            raise doc.error(loc, f"{directory} is not a directory") from None
        except OSError as exc:
            raise doc.error(loc, f"cannot list {directory}: {_os_reason(exc)}") from None
        if names is None:
            return None, []  # not there (yet): no drop-ins
        paths = [directory / name for name in names]
        listing = tuple((path.name, _stat_key(path)) for path in paths)
        return listing, paths

    def _jobs(
        self,
        doc: _Document,
        daemon: DaemonSettings,
        servers: Mapping[str, ServerSettings],
        hooks: Mapping[str, HookSettings],
    ) -> list[tuple[JobSpec, _Seen]]:
        tables = doc.data.get("jobs", [])
        if not isinstance(tables, list):
            raise doc.error(("jobs",), "must be an array of tables: write each job as [[jobs]]")
        jobs: list[tuple[JobSpec, _Seen]] = []
        for index, table in enumerate(tables):
            loc: KeyPath = ("jobs", index)
            raw = _validate(doc, _JobTable, table, loc)
            if raw.server not in servers:
                known = ", ".join(servers) or "none are configured"
                raise doc.error(
                    (*loc, "server"),
                    f"unknown server {raw.server!r}{_suggest(raw.server, tuple(servers))}; "
                    f"servers: {known}",
                )
            if raw.hooks is None:
                job_hooks = daemon.default_hooks
            else:
                self._check_hook_names(doc, (*loc, "hooks"), raw.hooks, hooks)
                job_hooks = tuple(raw.hooks)
            line = doc.line_of(loc)
            job = JobSpec(
                server=raw.server,
                prompt_id=raw.prompt_id,
                labels=MappingProxyType(dict(raw.labels)),
                hooks=job_hooks,
                source=str(doc.path),
                line=line,
            )
            where = _Seen(str(doc.path), doc.line_of((*loc, "prompt_id")), format_key(loc))
            jobs.append((job, where))
        return jobs

    def _check_unique(self, jobs: list[tuple[JobSpec, _Seen]]) -> None:
        first: dict[tuple[str, str], _Seen] = {}
        for job, where in jobs:
            key = (job.server, job.prompt_id)
            previous = first.setdefault(key, where)
            if previous is where:
                continue
            place = f"{previous.source}:{previous.line}" if previous.line else previous.source
            raise ConfigError(
                f"duplicate job: server {job.server!r} prompt_id {job.prompt_id!r} "
                f"is already registered at {place} ({previous.key})",
                file=where.source,
                key=f"{where.key}.prompt_id",
                line=where.line,
            )


def load_settings(path: str | Path, *, env: Mapping[str, str] | None = None) -> Settings:
    """Reads and validates the config file at ``path`` and its job drop-ins.

    ``env`` (default ``os.environ``) supplies ``secret_env`` values and the ``PATH`` that
    bare command names are looked up on. Raises ConfigError, and only ConfigError.
    """
    try:
        absolute = Path(path).absolute()
    except (OSError, ValueError):
        raise ConfigError("cannot resolve the config file's path", file=str(path)) from None
    return _Loader(absolute, os.environ if env is None else env).load()


def config_fingerprint(settings: Settings) -> tuple[object, ...]:
    """Cheap (``os.stat`` only) fingerprint of the files ``settings`` came from.

    Covers the main file, the ``jobs_dir`` listing (name, inode, size, mtime, ctime of
    each drop-in) and the webhook secret files. Compare with ``settings.fingerprint``
    (taken just before the files were read) to know whether a reload is due.
    """
    secret_keys = tuple(
        _stat_key(hook.secret_file)
        for hook in settings.hooks.values()
        if isinstance(hook, WebhookHookSettings) and hook.secret_file is not None
    )
    return (
        _stat_key(settings.path),
        _listing_key(settings.daemon.jobs_dir),
        secret_keys,
    )


def default_config_path(env: Mapping[str, str]) -> Path:
    """The ``--config`` default: ``$COMFYWATCH_CONFIG``, else /etc/comfywatch/comfywatch.toml."""
    value = env.get(CONFIG_ENV_VAR, "")
    return Path(value) if value else DEFAULT_CONFIG_PATH
