"""The rules config values follow, as annotated types the settings models are declared with.

Each type validates what a TOML file holds (strictly: ``"8"`` is not a number) and, where
the program wants another shape, converts it (lists to tuples, tables to read-only
mappings, state names to :class:`JobState`). Validators never repeat the value in their
message: it may be a credential. Also the shared model base (:class:`Table`), the
defaults, and the marker for attributes the loader fills in (:data:`FROM_LOADER`).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import core_schema

from comfywatch.config.redact import RedactedHeaders
from comfywatch.states import TERMINAL_STATES, JobState

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
DEFAULT_HISTORY_FETCHES = 8
TERMINAL_NAMES: tuple[str, ...] = tuple(sorted(state.value for state in TERMINAL_STATES))

_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------- the model base


class Table(BaseModel):
    """A frozen settings model that is also the schema of its TOML table."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,  # values can be secrets
    )

    def __str__(self) -> str:
        return repr(self)


class FromLoader:
    """Marks an attribute the loader sets (a table's name, a decoded secret): not a key."""

    def __repr__(self) -> str:
        return "FROM_LOADER"


FROM_LOADER = FromLoader()


def loader_fields(model: type[BaseModel]) -> frozenset[str]:
    """The attributes of ``model`` marked :data:`FROM_LOADER`."""
    return frozenset(
        name for name, info in model.model_fields.items() if FROM_LOADER in info.metadata
    )


def file_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The keys a TOML table for ``model`` may hold, in declaration order."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        if FROM_LOADER not in info.metadata:
            alias = info.validation_alias
            keys.append(alias if isinstance(alias, str) else name)
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class Parsed:
    """Validates the file's value as ``source``, then makes it an ``into`` with ``convert``.

    A value that already is an ``into`` (settings built in code) is taken as it is.
    """

    source: Any
    into: type[Any]
    convert: Callable[[Any], Any] | None = None

    def __get_pydantic_core_schema__(
        self, _annotation: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        convert = self.convert or self.into

        def validate(value: Any, validate_source: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if isinstance(value, self.into):
                return value
            return convert(validate_source(value))

        return core_schema.no_info_wrap_validator_function(
            validate, handler.generate_schema(self.source)
        )


# ----------------------------------------------------------------------- validators


def suggest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def check_no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def check_header_name(value: str) -> str:
    if not _HEADER_NAME_RE.fullmatch(value):
        raise ValueError("not a valid HTTP header name")
    return value


def check_header_value(value: str) -> str:
    if any(char in value for char in "\r\n\x00"):
        raise ValueError("header values must not contain line breaks or NUL characters")
    return value


def check_terminal_state(value: str) -> str:
    if value not in TERMINAL_NAMES:
        raise ValueError(
            f"{value!r} is not a terminal state{suggest(value, TERMINAL_NAMES)}; "
            f"expected one of: {', '.join(TERMINAL_NAMES)}"
        )
    return value


def to_states(names: Iterable[str]) -> frozenset[JobState]:
    return frozenset(JobState(name) for name in names)


def check_prompt_id(value: str) -> str:
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
        raise ValueError("must not contain control characters")
    return value


def check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError("not a valid environment variable name")
    return value


def check_http_url(value: str, *, allow_query: bool) -> str:
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


def check_server_url(value: str) -> str:
    return check_http_url(value, allow_query=False).rstrip("/")


def check_webhook_url(value: str) -> str:
    return check_http_url(value, allow_query=True)


class ListenAddress(NamedTuple):
    """Where the HTTP endpoint listens; an IPv6 host is kept without brackets."""

    host: str
    port: int


def parse_listen(value: str) -> ListenAddress:
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
    return ListenAddress(host, port)


# ------------------------------------------------------------------------ the types

Text = Annotated[str, AfterValidator(check_no_nul)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(check_no_nul)]
PositiveS = Annotated[float, Field(gt=0)]
DelayS = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
HistoryFetches = Annotated[int, Field(ge=1, le=256)]
EnvName = Annotated[str, AfterValidator(check_env_name)]
ServerUrl = Annotated[str, AfterValidator(check_server_url)]  # no trailing slash
WebhookUrl = Annotated[str, AfterValidator(check_webhook_url)]
ServerRef = Annotated[str, Field(min_length=1)]
PromptId = Annotated[
    str, Field(min_length=1, max_length=255), AfterValidator(check_prompt_id)
]  # stored in VARCHAR(255)

_HookName = Annotated[str, Field(min_length=1)]
_StateName = Annotated[str, AfterValidator(check_terminal_state)]
_HeaderName = Annotated[str, AfterValidator(check_header_name)]
_HeaderValue = Annotated[str, AfterValidator(check_header_value)]

Headers = Annotated[RedactedHeaders, Parsed(dict[_HeaderName, _HeaderValue], RedactedHeaders)]
Labels = Annotated[Mapping[str, str], Parsed(dict[str, str], MappingProxyType)]
HookNames = Annotated[tuple[str, ...], Parsed(list[_HookName], tuple)]
RetrySchedule = Annotated[tuple[float, ...], Parsed(list[DelayS], tuple)]
Argv = Annotated[tuple[str, ...], Parsed(Annotated[list[Text], Field(min_length=1)], tuple)]
TerminalStates = Annotated[
    frozenset[JobState],
    Parsed(Annotated[list[_StateName], Field(min_length=1)], frozenset, to_states),
]
Listen = Annotated[ListenAddress, Parsed(str, ListenAddress, parse_listen)]
#: A path as written in the file; the loader makes it absolute (relative to the file).
FilePath = Annotated[Path, Parsed(NonEmptyText, Path)]
