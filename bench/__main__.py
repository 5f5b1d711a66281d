"""``python -m bench``: run the benchmark scenarios, print a table, write JSON.

Scenarios run one after another (each starts and stops its own processes). ``bulk`` and
``cli`` are the modules ``bench.bulk`` and ``bench.cli``; they are skipped with a note when
absent. Options: ``--quick`` (smaller sizes, about 4 minutes), ``--only NAME`` (repeatable
or comma separated), ``--out results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import farm, replicas, scale
from .farm import Result, Sizes

FARM: dict[str, Callable[[Sizes], Awaitable[Result]]] = {
    "quiet": farm.quiet,
    "trickle": farm.trickle,
    "lag": farm.lag,
    "burst": farm.burst,
    "scale": scale.memory,
    "startup": scale.startup,
    "spool": scale.spool,
    "replicas": replicas.replicas,
}
EXTERNAL = ("bulk", "cli")
NAMES = (*FARM, *EXTERNAL)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[list[Any]]) -> str:
    header = ["metric", "target", "comfywatch", "naive", "comfywatch/naive"]
    lines = [header]
    for metric, target, ours, naive in rows:
        both = isinstance(ours, int | float) and isinstance(naive, int | float)
        share = ours / naive if both and naive and not isinstance(ours, bool) else None
        lines.append([metric, target or "", _format(ours), _format(naive), _format(share)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )


def _external(name: str, quick: bool) -> Any:
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        return {"skipped": f"bench.{name} is not present"}
    main = module.main
    argv = ["--quick"] if quick else []
    saved = sys.argv
    sys.argv = [f"bench.{name}", *argv]
    try:
        takes_argv = bool(inspect.signature(main).parameters)
        return main(argv) if takes_argv else main()
    finally:
        sys.argv = saved


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 4 minutes)")
    parser.add_argument("--only", action="append", metavar="NAME", help=f"one of {NAMES}")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    chosen = [n for item in args.only or [] for n in item.split(",") if n]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"unknown scenario {unknown}; choose from {NAMES}")
    args.names = [n for n in NAMES if not chosen or n in chosen]
    return args


def _run_one(name: str, sizes: Sizes, names: list[str]) -> Any:
    if name in EXTERNAL:
        return _external(name, sizes.quick)
    if name == "scale":
        return asyncio.run(scale.memory(sizes, with_startup="startup" in names))
    return asyncio.run(FARM[name](sizes))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sizes = Sizes(quick=args.quick)
    # The restart is measured on the largest "scale" size when both run.
    names = [n for n in args.names if not (n == "startup" and "scale" in args.names)]
    report: dict[str, Any] = {
        "commit": _commit(),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "scenarios": {},
    }
    all_rows: list[list[Any]] = []
    for name in names:
        started = time.monotonic()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        try:
            result = _run_one(name, sizes, args.names)
        except Exception as exc:  # one broken scenario must not lose the others
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        seconds = time.monotonic() - started
        print(f"== {name} took {seconds:.0f} s", file=sys.stderr, flush=True)
        report["scenarios"][name] = {"seconds": seconds, "result": result}
        if isinstance(result, dict) and "rows" in result:
            all_rows += result["rows"]
            print(table(result["rows"]), flush=True)
        else:
            print(f"{name}: {json.dumps(result, default=str)[:500]}", flush=True)
    print("\n" + table(all_rows))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
