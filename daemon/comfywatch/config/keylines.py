"""Where each key of a TOML file sits: key paths to line numbers, and key paths as text.

tomllib gives values, not positions; :func:`key_lines` recovers the line of every table
header, key and array element so that a config error can name ``file:line``. Also
:func:`format_key`, which writes a key path the way a user would (``jobs[3].server``).
"""

from __future__ import annotations

import contextlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["KeyPath", "format_key", "key_lines", "line_of_key"]

KeyPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits in a TOML document: ``("jobs", 3, "server")``."""

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_RE = re.compile(r"[^\s,\]}#]+")


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
