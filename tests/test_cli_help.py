"""The command line's grammar: every command described with an example, every option
explained, values checked before anything runs, the shared options anywhere."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfywatch.cli import build_parser


def commands(
    parser: argparse.ArgumentParser, path: str = "comfywatch"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every command and action under it, with its path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, f"{path} {name}")


ALL = dict(commands(build_parser()))


def test_the_walk_finds_every_command() -> None:
    assert {
        "comfywatch run",
        "comfywatch check-config",
        "comfywatch jobs",
        "comfywatch hooks retry",
        "comfywatch hooks new-secret",
        "comfywatch prune",
        "comfywatch fake-server",
    } <= set(ALL)


@pytest.mark.parametrize("path", sorted(ALL))
def test_every_command_has_a_description_and_an_example(path: str) -> None:
    parser = ALL[path]
    assert parser.description and len(parser.description) > 40, path
    assert parser.epilog and "example" in parser.epilog, path
    examples = [line for line in parser.epilog.splitlines() if line.startswith("  ")]
    assert any(path in line for line in examples), path  # a command line to copy
    # Printed as written: the help keeps the examples' line breaks.
    assert examples[0] in parser.format_help(), path


@pytest.mark.parametrize("path", sorted(ALL))
def test_every_option_and_argument_has_a_help_text(path: str) -> None:
    for action in ALL[path]._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (path, action.dest)


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "X", "jobs"],
        ["jobs", "--config", "X"],
        ["--config", "Y", "jobs", "--config", "X"],  # the later one counts
        ["--config", "X", "hooks", "retry", "7"],
        ["hooks", "--config", "X", "retry", "7"],
        ["hooks", "retry", "7", "--config", "X"],
        ["--config", "X", "check-config"],
        ["--config", "X", "prune", "--older-than", "1d"],
    ],
)
def test_shared_options_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.config == Path("X")


def test_shared_options_default_to_none_wherever_they_may_be_given() -> None:
    for argv in (["jobs"], ["hooks", "retry", "1"], ["fake-server"]):
        args = build_parser().parse_args(argv)
        assert (args.config, args.log_level, args.log_format) == (None, None, None), argv
    args = build_parser().parse_args(["--log-level", "debug", "migrate", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("debug", "json")


@pytest.mark.parametrize(
    ("age", "seconds"),
    [("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 90 * 60), ("45s", 45), ("2w", 14 * 86400),
     ("1.5d", 1.5 * 86400), ("0", 0)],
)  # fmt: skip
def test_ages_take_a_unit(age: str, seconds: float) -> None:
    args = build_parser().parse_args(["prune", "--older-than", age])
    assert args.older_than == seconds


BAD_VALUES = [
    ["prune", "--older-than", "30"],  # days? hours? refused
    ["prune", "--older-than", "30y"],
    ["prune", "--older-than", "-1d"],
    ["jobs", "--limit", "-1"],
    ["jobs", "--limit", "0"],
    ["hooks", "--limit", "-5"],
    ["jobs", "--state", "finished"],
    ["fake-server", "--port", "99999"],
    ["fake-server", "--port", "-1"],
    ["fake-server", "--run-time", "-1"],
    ["fake-server", "--run-time", "inf"],
    ["fake-server", "--run-time", "nan"],
]


@pytest.mark.parametrize("argv", BAD_VALUES)
def test_bad_values_are_usage_errors_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"comfywatch {argv[0]}: error: argument {argv[1]}"), err
    assert f"see comfywatch {argv[0]} --help" in err
