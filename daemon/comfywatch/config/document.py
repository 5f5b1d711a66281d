"""One config file: read and parsed, its tables validated, every problem a located error.

A :class:`Document` turns a key path into a :class:`ConfigError` naming the file, the
dotted key and the line. :func:`validate_table` checks one table against a settings
model and reports every problem, in file order, worded for people and never quoting the
value (pydantic's own errors do, and values can be secrets). :class:`Problems` gathers
the errors of many checks, so that one reading reports every mistake of a file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pydantic import BaseModel, ValidationError

from comfywatch.config.keylines import KeyPath, format_key, key_lines, line_of_key
from comfywatch.config.schema import file_keys, loader_fields, suggest
from comfywatch.errors import ConfigError, config_errors

__all__ = [
    "Document",
    "Problems",
    "check_top_level",
    "os_reason",
    "parse_document",
    "read_document",
    "toml_type",
    "validate_table",
]

_TOML_ERROR_POS_RE = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_ERROR_END_RE = re.compile(r"\s*\(at end of document\)$")

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")
_P = ParamSpec("_P")
_Problem = tuple[KeyPath, str, str]  # (key path in the table, message, pydantic error type)


@dataclass(slots=True)
class Document:
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


class Problems:
    """The mistakes of one reading, gathered so that all of them are reported at once.

    Each check runs through :meth:`check`: a ConfigError it raises is kept, and the check
    gives ``None``. :meth:`raise_all` raises one ConfigError holding them all (see
    :class:`~comfywatch.errors.ConfigErrors`), the checks in file order (by the line of
    each one's first problem), each check's own problems in the order it gave them.
    """

    def __init__(self) -> None:
        self._found: list[tuple[ConfigError, ...]] = []

    def check(self, check: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T | None:
        try:
            return check(*args, **kwargs)
        except ConfigError as exc:
            self.add(exc)
            return None

    def add(self, error: ConfigError) -> None:
        self._found.append(error.problems)

    def raise_all(self) -> None:
        if not self._found:
            return
        ordered = sorted(self._found, key=lambda found: _line_order(found[0]))
        raise config_errors([problem for found in ordered for problem in found])


def _line_order(error: ConfigError) -> tuple[bool, int]:
    return error.line is None, error.line or 0


def read_document(path: Path, *, kind: str) -> Document:
    """Reads and parses ``path``; ``kind`` ("config file") names it in errors."""
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else "not a valid path"
        raise ConfigError(f"cannot read {kind}: {reason}", file=str(path)) from None
    return parse_document(path, raw, kind=kind)


def parse_document(path: Path, raw: bytes, *, kind: str) -> Document:
    """Parses ``raw``, the contents of ``path`` (read, or about to be written)."""
    problem: ConfigError | None = None
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
    return Document(path=path, text=text, data=data)


def _syntax_error(path: Path, text: str, message: str) -> ConfigError:
    line: int | None = None
    if match := _TOML_ERROR_POS_RE.search(message):
        line = int(match["line"])
        message = f"{message[: match.start()]} (column {match['column']})"
    elif match := _TOML_ERROR_END_RE.search(message):
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        message = f"{message[: match.start()]} (at end of file)"
    return ConfigError(f"TOML syntax error: {message}", file=str(path), line=line)


def check_top_level(doc: Document, allowed: tuple[str, ...], *, hint: str = "") -> None:
    """Every top-level key of ``doc`` is one of ``allowed``; ``hint`` ends the message."""
    unknown = [
        doc.error((key,), f"unknown key{suggest(key, allowed)}{hint}")
        for key in doc.data
        if key not in allowed
    ]
    if unknown:
        raise config_errors(unknown)


def validate_table(
    doc: Document,
    model: type[_M],
    data: object,
    loc: KeyPath,
    *,
    given: Mapping[str, object] | None = None,
    defaults: Mapping[str, object] | None = None,
    other: tuple[str, type[BaseModel]] | None = None,
) -> _M:
    """Validates the table ``data`` at ``loc`` as ``model``; raises its every problem.

    ``given`` supplies the attributes the loader fills in (a key of that name in the file
    is unknown); ``defaults`` replace the model's defaults for keys the table lacks.
    ``other`` names the sibling model whose keys are reported as belonging there.
    """
    if not isinstance(data, dict):
        raise doc.error(loc, f"must be a table (got {toml_type(data)})")
    not_keys = loader_fields(model)
    problems: list[_Problem] = [
        ((key,), _unknown_key(key, model, other), "extra_forbidden")
        for key in data
        if key in not_keys
    ]
    table = {key: value for key, value in data.items() if key not in not_keys}
    try:
        result = model.model_validate({**(defaults or {}), **table, **(given or {})})
    except ValidationError as exc:
        problems.extend(_explain(error, model, other) for error in exc.errors(include_url=False))
    else:
        if not problems:
            return result
    # Raised outside the except block, so the pydantic error (which quotes input values,
    # secrets included) is not chained to ours. In file order, but a missing key comes
    # last: a misspelt key nearby ("promt_id") says more, and comes first.
    # One problem per key (a value may fail more than one rule).
    first: dict[KeyPath, tuple[str, bool]] = {}
    for sub, message, kind in problems:
        first.setdefault((*loc, *sub), (message, kind == "missing"))
    located = sorted(
        first.items(),
        key=lambda item: (item[1][1], doc.line_of(item[0]) or 1 << 30, len(item[0])),
    )
    raise config_errors([doc.error(key, message) for key, (message, _) in located])


def _unknown_key(
    name: str, model: type[BaseModel], other: tuple[str, type[BaseModel]] | None
) -> str:
    if other is not None and name in file_keys(other[1]):
        return f"unknown key here: {name!r} belongs to {other[0]} hooks"
    return "unknown key" + suggest(name, file_keys(model))


def _explain(
    error: Any, model: type[BaseModel], other: tuple[str, type[BaseModel]] | None
) -> _Problem:
    """A pydantic error as (key path in the table, message without the input value, type)."""
    loc: KeyPath = tuple(part for part in error["loc"] if part != "[key]")
    kind: str = error["type"]
    return loc, _message(error, loc, model, other), kind


def _message(
    error: Any, loc: KeyPath, model: type[BaseModel], other: tuple[str, type[BaseModel]] | None
) -> str:
    kind: str = error["type"]
    message: str = error["msg"]
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[0]), model, other) if len(loc) == 1 else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "too_short" and error.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    message = message.replace("Input should be", "must be", 1)
    if kind.endswith("_type") or (kind == "literal_error" and not isinstance(error["input"], str)):
        message += f" (got {toml_type(error['input'])})"
    return message


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for "must be ... (got string)"."""
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


def os_reason(exc: OSError) -> str:
    """Why a file could not be used, in a few words (no path: the caller adds it)."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a component of the path is not a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__
