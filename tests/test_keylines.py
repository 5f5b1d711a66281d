"""The key -> line index: every table, key and array element found on its own line."""

from __future__ import annotations

import json
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comfywatch.config.keylines import KeyPath, format_key, key_lines, line_of_key

SCAN_TEXT = """\
title = "x"            # 1
[daemon]               # 2
poll_interval_s = 1    # 3
text = '''             # 4
[not.a.table]
fake = 1
'''
after = 2              # 8
[servers.local]        # 9
url = "http://x"       # 10
headers = { A = "b", "C" = "]" }   # 11
[servers."my.server"]  # 12
a.b = 1                # 13
[[jobs]]               # 14
server = "a"           # 15
[[jobs]]               # 16
# a comment = 3
prompt_id = "p"        # 18
labels.batch = "z"     # 19
nums = [               # 20
  1,                   # 21
  [2, 3],              # 22
  "a,b",               # 23
]
[jobs.extra]           # 25
k = 1                  # 26
"""


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        (("title",), 1),
        (("daemon",), 2),
        (("daemon", "poll_interval_s"), 3),
        (("daemon", "text"), 4),
        (("daemon", "after"), 8),
        (("daemon", "fake"), 2),  # inside the string: falls back to the table
        (("not",), None),
        (("servers", "local"), 9),
        (("servers", "local", "url"), 10),
        (("servers", "local", "headers"), 11),
        (("servers", "local", "headers", "C"), 11),
        (("servers", "local", "missing"), 9),
        (("servers", "my.server"), 12),
        (("servers", "my.server", "a", "b"), 13),
        (("jobs",), 14),
        (("jobs", 0), 14),
        (("jobs", 0, "server"), 15),
        (("jobs", 1), 16),
        (("jobs", 1, "server"), 16),
        (("jobs", 1, "prompt_id"), 18),
        (("jobs", 1, "labels", "batch"), 19),
        (("jobs", 1, "nums"), 20),
        (("jobs", 1, "nums", 0), 21),
        (("jobs", 1, "nums", 1), 22),
        (("jobs", 1, "nums", 2), 23),
        (("jobs", 1, "extra"), 25),
        (("jobs", 1, "extra", "k"), 26),
        (("jobs", 2), 14),
        (("hooks", "x"), None),
    ],
)
def test_key_lines(loc: tuple[str | int, ...], line: int | None) -> None:
    assert line_of_key(key_lines(SCAN_TEXT), loc) == line


def test_key_lines_survives_garbage() -> None:
    """Text tomllib rejects still gives an answer, never an exception."""
    for text in ['[a\nb = "', "x = [1, {", '"unterminated = 1', "[[", "= 1", "a.\n"]:
        assert isinstance(key_lines(text), dict)


def test_format_key() -> None:
    assert format_key(("servers", "local", "url")) == "servers.local.url"
    assert format_key(("jobs", 3, "server")) == "jobs[3].server"
    assert format_key(("hooks", "n", "on", 1)) == "hooks.n.on[1]"
    assert format_key(("servers", "my.server", "url")) == 'servers."my.server".url'
    assert format_key(()) == ""


TRICKY_TEXT = '''\
a = """one "quoted" \\""" [not.a.table]
b = 1"""""
c = 'lit # [x] = 1'    # 3
d = "esc \\" # [y]"     # 4
"k\\u0065y" = 5          # 5
'lit.key' = 6          # 6
[ servers . "x y" ]    # 7
url = "u"              # 8
point = { x = 1, y = [1, 2] }  # 9
jobs = [               # 10
  { server = "a" },    # 11
  { server = "b" },    # 12
]
esc = [                # 14
  "x \\" ], [",         # 15
  'y',                 # 16
]
'''


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        (("a",), 1),
        (("b",), None),  # inside a's string, which ends with two quotes of content
        (("c",), 3),
        (("d",), 4),
        (("key",), 5),
        (("lit.key",), 6),
        (("servers", "x y"), 7),
        (("servers", "x y", "url"), 8),
        (("servers", "x y", "point"), 9),
        (("servers", "x y", "point", "y"), 9),  # inside inline tables: the key's line
        (("servers", "x y", "jobs", 0), 11),
        (("servers", "x y", "jobs", 1), 12),
        (("servers", "x y", "jobs", 1, "server"), 12),
        (("servers", "x y", "esc", 0), 15),
        (("servers", "x y", "esc", 1), 16),  # the escaped quote did not end the string
    ],
)
def test_strings_and_quoted_keys_do_not_fool_it(loc: KeyPath, line: int | None) -> None:
    """Brackets, quotes, ``#`` and ``=`` inside strings are not syntax; quoted keys decode."""
    data = tomllib.loads(TRICKY_TEXT)
    assert data["a"] == 'one "quoted" """ [not.a.table]\nb = 1""'
    assert line_of_key(key_lines(TRICKY_TEXT), loc) == line


def test_nested_arrays_of_tables_count_per_parent() -> None:
    text = "[[a]]\n[[a.b]]\nx = 1\n[[a.b]]\nx = 2\n[[a]]\n[[a.b]]\nx = 3\n[a.c]\ny = 4\n"
    lines = key_lines(text)
    assert lines[("a", 0)] == 1
    assert lines[("a", 0, "b", 0, "x")] == 3
    assert lines[("a", 0, "b", 1, "x")] == 5
    assert lines[("a", 1)] == 6
    assert lines[("a", 1, "b", 0, "x")] == 8
    assert lines[("a", 1, "c", "y")] == 10


def test_crlf_line_endings() -> None:
    text = "[daemon]\r\npoll_interval_s = 1\r\n\r\n[servers.local]\r\nurl = 'x'\r\n"
    lines = key_lines(text)
    assert lines[("daemon", "poll_interval_s")] == 2
    assert lines[("servers", "local", "url")] == 5


def test_line_of_key_falls_back_to_the_nearest_known_parent() -> None:
    lines: dict[KeyPath, int] = {("jobs",): 3, ("jobs", 0): 4}
    assert line_of_key(lines, ("jobs", 0, "labels", "x")) == 4
    assert line_of_key(lines, ("jobs", 7)) == 3
    assert line_of_key(lines, ("daemon",)) is None
    assert line_of_key(lines, ()) is None


_KEYS = st.text(st.characters(codec="ascii", exclude_characters="\x7f"), min_size=1, max_size=8)
_TEXT = st.text(st.characters(codec="ascii", exclude_characters="\x7f"), max_size=12)
_VALUES = st.one_of(st.integers(), _TEXT, st.lists(st.one_of(st.integers(), _TEXT), max_size=3))


def _render_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


@given(
    st.dictionaries(
        _KEYS,
        st.dictionaries(_KEYS, _VALUES, max_size=4),
        max_size=4,
    ),
    st.booleans(),
)
def test_every_key_of_a_generated_file_is_on_its_line(
    tables: dict[str, dict[str, object]], blank_lines: bool
) -> None:
    """For any file of tables, keys and arrays, each maps to the line it was written on."""
    rendered: list[str] = []
    expected: dict[KeyPath, int] = {}
    for table, items in tables.items():
        rendered.append(f"[{_render_key(table)}]  # [x] = 1")
        expected[(table,)] = len(rendered)
        for key, value in items.items():
            if isinstance(value, list):  # one element a line
                rendered.append(f"{_render_key(key)} = [")
                expected[(table, key)] = len(rendered)
                for index, element in enumerate(value):
                    rendered.append(f"  {json.dumps(element)},  # ] [")
                    expected[(table, key, index)] = len(rendered)
                rendered.append("]")
            else:
                rendered.append(f"{_render_key(key)} = {json.dumps(value)}")
                expected[(table, key)] = len(rendered)
        if blank_lines:
            rendered.append("")
    text = "\n".join(rendered) + "\n"
    assert tomllib.loads(text) == tables
    lines = key_lines(text)
    for loc, line in expected.items():
        assert lines[loc] == line, (loc, text)
