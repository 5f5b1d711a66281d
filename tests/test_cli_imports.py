"""What the command line imports: ``--version`` and ``--help`` none of the heavy libraries,
the queries no Alembic. Facts read from ``python -X importtime``, never timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfywatch.store import Store

from .conftest import write_config

#: Heavy imports that ``--version`` and ``--help`` do without.
HEAVY = {"sqlalchemy", "alembic", "aiohttp", "pydantic", "aiosqlite", "structlog", "rich", "shtab"}


def imported(*args: str, packages: bool = True) -> tuple[int, set[str], str]:
    """Run ``python -X importtime -m comfywatch ARGS``: (exit status, top-level packages
    imported, or every module with ``packages=False``, stdout)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "comfywatch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    names = {name.split(".")[0] for name in modules} if packages else modules
    assert "comfywatch" in names  # the report was read
    return done.returncode, names, done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        *(
            [command, "--help"]
            for command in (
                "run",
                "check-config",
                "migrate",
                "healthcheck",
                "jobs",
                "show",
                "hooks",
                "prune",
                "fake-server",
                "submit",
                "wait",
                "watch",
                "completion",
            )
        ),
        ["hooks", "retry", "--help"],
        ["hooks", "test", "--help"],
        ["hooks", "new-secret", "--help"],
    ],
)
def test_version_and_help_import_no_heavy_library(args: list[str]) -> None:
    code, names, out = imported(*args)
    assert code == 0 and ("comfywatch" in out or "usage:" in out)
    assert names.isdisjoint(HEAVY), sorted(names & HEAVY)


def test_new_secret_imports_no_heavy_library() -> None:
    code, names, out = imported("hooks", "new-secret")
    assert code == 0 and out.startswith("whsec_")
    assert names.isdisjoint(HEAVY), sorted(names & HEAVY)


async def test_queries_import_no_alembic_and_no_async_driver(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"local": "http://127.0.0.1:9"})
    store = Store.open(f"sqlite:///{tmp_path / 'comfywatch.db'}")
    try:
        await store.migrate()
    finally:
        await store.close()
    for args in (["jobs", "--json"], ["show", "nothing"], ["hooks"]):
        code, names, _ = imported(*args, "--config", str(config))
        assert code in (0, 1), args  # `show nothing`: 1, no such job
        assert "sqlalchemy" in names, args
        assert names.isdisjoint({"alembic", "aiosqlite", "aiohttp"}), (args, names)
        # Core queries on Core tables: the ORM stays unloaded.
        _, modules, _ = imported(*args, "--config", str(config), packages=False)
        assert "sqlalchemy.orm" not in modules, args
    code, names, out = imported("prune", "--older-than", "1d", "--config", str(config))
    assert code == 0 and out.startswith("deleted 0 jobs")
    assert "alembic" not in names and "aiohttp" not in names
