"""The settings the rest of the program sees: frozen, validated, secrets hidden in ``repr``.

Each model is at once the schema of its TOML table (its attributes are the table's keys,
:mod:`comfywatch.config.schema` gives their rules and defaults) and the value handed to
the components. Attributes marked ``FROM_LOADER`` are not keys: the loader fills them in
(a table's name, a decoded secret, where a job came from). Paths, the database URL and
commands hold what the file says until the loader resolves them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import Field

from comfywatch.config.redact import RedactedHeaders, redact_url, url_origin
from comfywatch.config.schema import (
    DEFAULT_HISTORY_FETCHES,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_RETRY_SCHEDULE_S,
    FROM_LOADER,
    Argv,
    Count,
    DelayS,
    EnvName,
    FilePath,
    Headers,
    HistoryFetches,
    HookNames,
    Labels,
    Listen,
    NonEmptyText,
    PositiveS,
    PromptId,
    RetrySchedule,
    ServerRef,
    ServerUrl,
    Table,
    TerminalStates,
    WebhookUrl,
)
from comfywatch.states import TERMINAL_STATES

__all__ = [
    "CommandHookSettings",
    "DaemonSettings",
    "HookSettings",
    "JobSpec",
    "ServerSettings",
    "Settings",
    "WebhookHookSettings",
]

_Name = Annotated[str, FROM_LOADER]


class ServerSettings(Table):
    """One ComfyUI server to watch: a ``[servers.<name>]`` table."""

    name: _Name
    url: ServerUrl  # http(s)://host[:port][/prefix]
    headers: Headers = Field(default_factory=RedactedHeaders)  # sent on every request
    queue_timeout_s: PositiveS | None = None
    run_timeout_s: PositiveS | None = None
    request_timeout_s: PositiveS = 10.0
    max_response_bytes: Count = DEFAULT_MAX_RESPONSE_BYTES
    max_history_fetches: HistoryFetches = DEFAULT_HISTORY_FETCHES  # the loader: [daemon]'s
    #: Listen on ComfyUI's WebSocket for queue changes and poll at once (polling stays
    #: the source of truth; this only shortens the time to notice a finished prompt).
    websocket: bool = True
    #: The longest between two reads of the whole queue while tracked jobs wait in it
    #: (``running`` and ``run_timeout_s`` may lag by this much; see README).
    queue_refresh_s: PositiveS = 300.0


class WebhookHookSettings(Table):
    """POST the finished job as JSON, signed per Standard Webhooks when a secret is set."""

    name: _Name
    type: Literal["webhook"]
    url: WebhookUrl
    secret_file: FilePath | None = None  # where the secret came from (watched for changes)
    secret_env: EnvName | None = None
    on: TerminalStates = TERMINAL_STATES
    timeout_s: PositiveS = 10.0
    headers: Headers = Field(default_factory=RedactedHeaders)
    retry_schedule_s: RetrySchedule = DEFAULT_RETRY_SCHEDULE_S
    secret: Annotated[bytes | None, FROM_LOADER] = None  # the key, not the "whsec_..." text

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "url":
                yield name, url_origin(self.url)
            elif name == "secret":
                yield name, None if value is None else "***"
            else:
                yield name, value


class CommandHookSettings(Table):
    """Run ``argv`` (no shell) with the finished job as JSON on stdin."""

    name: _Name
    type: Literal["command"]
    argv: Argv  # once loaded, argv[0] is an absolute path
    on: TerminalStates = TERMINAL_STATES
    timeout_s: PositiveS = 60.0
    retry_schedule_s: RetrySchedule = DEFAULT_RETRY_SCHEDULE_S
    max_output_bytes: Annotated[int, Field(ge=0)] = DEFAULT_MAX_OUTPUT_BYTES


HookSettings: TypeAlias = WebhookHookSettings | CommandHookSettings


class JobSpec(Table):
    """One prompt to track: a ``[[jobs]]`` table of the main file or of a spool file."""

    server: ServerRef
    prompt_id: PromptId
    labels: Labels = Field(default_factory=lambda: MappingProxyType({}))
    hooks: HookNames = ()  # the loader: daemon.default_hooks when the job names none
    source: Annotated[str, FROM_LOADER]  # the file it came from


class DaemonSettings(Table):
    """The ``[daemon]`` table."""

    # Loaded, sqlite URLs carry an absolute path: sqlite:////abs/path.db
    database_url: NonEmptyText = Field("sqlite:///comfywatch.db", validation_alias="database")
    poll_interval_s: PositiveS = 1.0
    jobs_dir: FilePath | None = None  # the spool: files renamed in are registered once
    keep_registered_files: bool = True  # move them to jobs_dir/done/ (else delete them)
    not_found_after_s: DelayS = 60.0
    default_hooks: HookNames = ()
    http: Listen | None = None
    retention_days: PositiveS | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    max_history_fetches: HistoryFetches = DEFAULT_HISTORY_FETCHES  # for servers that set none
    hook_concurrency: Count = 8
    # Several daemons on one PostgreSQL database, each server polled by one at a time.
    replicas: bool = False
    lease_s: PositiveS = 15.0  # how long a server's lease lasts without a renewal

    @property
    def http_host(self) -> str | None:
        """The host of ``http`` (IPv6 without brackets), or None when it is not served."""
        return None if self.http is None else self.http.host

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(self.database_url) if name == "database_url" else value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon needs, validated; built once per (re)load and passed down."""

    path: Path  # the main file, absolute
    daemon: DaemonSettings
    servers: Mapping[str, ServerSettings]
    hooks: Mapping[str, HookSettings]
    jobs: tuple[JobSpec, ...]
    # config_fingerprint() as of just before the files were read: compare to reload.
    fingerprint: tuple[object, ...] = field(default=(), repr=False, compare=False)
