"""``replicas``: the live replicas on the database (``[daemon] replicas``), the servers each
holds the lease of, and when those leases expire; read only."""

from __future__ import annotations

import argparse
import json
from typing import Any

from comfywatch.cli.context import configure_logging, settings_of
from comfywatch.cli.output import EX_OK
from comfywatch.store.readonly import read
from comfywatch.store.reads import select_replicas
from comfywatch.store.values import ReplicaRow
from comfywatch.views import iso


def replica_json(row: ReplicaRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "host": row.host,
        "pid": row.pid,
        "version": row.version,
        "started_at": iso(row.started_at),
        "heartbeat_at": iso(row.heartbeat_at),
        "expires_at": iso(row.expires_at),
        "servers": [
            {"server": server, "epoch": epoch, "expires_at": iso(expires_at)}
            for server, epoch, expires_at in row.leases
        ],
    }


def list_replicas(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configure_logging(args, settings)
    live = [replica_json(row) for row in read(settings.daemon.database_url, select_replicas)]
    if args.json:
        print(json.dumps(live, indent=2))
        return EX_OK
    if not live:
        print("no live replicas")
        return EX_OK
    for replica in live:
        print(
            f"{replica['id']}  host {replica['host']}  pid {replica['pid']}  "
            f"version {replica['version']}  heartbeat {replica['heartbeat_at']}"
        )
        for lease in replica["servers"]:
            print(f"  {lease['server']}  epoch {lease['epoch']}  expires {lease['expires_at']}")
        if not replica["servers"]:
            print("  (no servers)")
    return EX_OK
