"""The key -> line index: every table, key and array element found on its own line."""

from __future__ import annotations

import pytest

from comfywatch.config.keylines import format_key, key_lines, line_of_key

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
