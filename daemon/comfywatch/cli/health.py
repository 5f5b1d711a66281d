"""``healthcheck``: the running daemon's ``/healthz`` when it serves HTTP, else whether
the database is readable and at this version's schema."""

from __future__ import annotations

import argparse
import asyncio

from comfywatch.cli.context import configure_logging, settings_of
from comfywatch.cli.output import EX_FAILURE, EX_OK, err
from comfywatch.store.readonly import SCHEMA_HEAD, read, schema_revision


def healthcheck(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configure_logging(args, settings)
    d = settings.daemon
    if d.http_host is not None and d.http_port is not None:
        return asyncio.run(_healthz(d.http_host, d.http_port))
    current = read(d.database_url, schema_revision, check_schema=False)
    if current != SCHEMA_HEAD:
        err(f"database schema at {current}, expected {SCHEMA_HEAD}")
        return EX_FAILURE
    print("database ok")
    return EX_OK


async def _healthz(http_host: str, http_port: int) -> int:
    import aiohttp

    host = f"[{http_host}]" if ":" in http_host else http_host
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{host}:{http_port}/healthz") as response,
        ):
            body = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        err(f"unhealthy: {type(exc).__name__}")
        return EX_FAILURE
    print(body)
    return EX_OK if response.status == 200 else EX_FAILURE
