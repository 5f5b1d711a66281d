"""Several daemons on one PostgreSQL database (``[daemon] replicas``): leases taken,
renewed, taken over and fenced in the store; a replica's heartbeat; migrations that wait
for each other and refuse a newer schema; the config's rules. Runs against the local
server on 127.0.0.1:5432 in a database of its own; skipped where none answers (never on CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from comfywatch.config import load_settings
from comfywatch.errors import ConfigError, StoreError
from comfywatch.leases import assign
from comfywatch.metrics import Metrics
from comfywatch.replicas import Replica
from comfywatch.states import JobState, Reason
from comfywatch.store import Change, Fence, NewJob, ProgressUpdate, Store

from .conftest import write_config
from .daemon_proc import run_cli
from .tcp_proxy import TcpProxy

WAIT_S = 30.0  # a bound on waits for conditions, never reached when things work


@pytest.fixture
async def pg(pg_url: str) -> str:
    """A database of its own on the local PostgreSQL server; its URL."""
    return pg_url


@pytest.fixture
async def stores(pg: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on the same database (two replicas), migrated."""
    a, b = Store.open(pg), Store.open(pg)
    try:
        await a.migrate()
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _eventually_take(store: Store, me: str, server: str, lease_s: float) -> int:
    deadline = time.monotonic() + WAIT_S
    while (epoch := await store.take_lease(me, server, lease_s)) is None:
        assert time.monotonic() < deadline, f"{me} never took {server}"
        await asyncio.sleep(0.05)
    return epoch


async def _state(store: Store, job_id: int) -> str:
    record = await store.job_record(job_id)
    assert record is not None
    return record.job.state


async def test_a_lease_is_taken_renewed_and_refused_to_others(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    assert await a.take_lease("a", "gpu", 30) == 1
    assert await b.take_lease("b", "gpu", 30) is None  # held and not expired
    assert await a.renew_leases("a", {"gpu": 1}, 30) == {"gpu"}
    assert await b.renew_leases("b", {"gpu": 1}, 30) == set()  # not its lease
    assert await b.release_lease("b", "gpu", 1) is False
    assert await a.release_lease("a", "gpu", 1) is True
    assert await b.take_lease("b", "gpu", 30) == 2  # given back: taken at once, epoch + 1


async def test_a_lost_lease_fences_the_old_owners_writes(stores: tuple[Store, Store]) -> None:
    a, b = stores
    now = time.time()
    await a.register([NewJob("gpu", f"p{i}", {}, (), "test") for i in range(3)], now)
    ids = sorted(j.id for j in await a.active_jobs())
    old = await a.take_lease("a", "gpu", 0.3)
    assert old == 1
    fence_a = Fence("a", {"gpu": old})
    first = Change(ids[0], JobState.RUNNING, started_at_s=now)
    assert await a.record([first], now, fence=fence_a) == [ids[0]]

    # a pauses; its lease runs out and b takes over, with a higher epoch
    new = await _eventually_take(b, "b", "gpu", 30)
    assert new == old + 1
    late = [Change(ids[1], JobState.SUCCESS, Reason.FINISHED, deliveries=["notify"])]
    assert await a.record(late, now + 1, fence=fence_a) == []  # refused: not a's epoch
    assert await _state(a, ids[1]) == "registered"
    assert await a.pending_delivery_count() == 0  # nor its hook
    await a.record_progress([ProgressUpdate(ids[0], "3", 5, 10, now + 1)], fence=fence_a)
    record = await a.job_record(ids[0])
    assert record is not None and record.job.progress_value is None
    assert await a.renew_leases("a", {"gpu": old}, 30) == set()
    assert await a.release_lease("a", "gpu", old) is False

    # the new owner writes; a fence naming another server's lease does not help
    assert await b.record(late, now + 2, fence=Fence("b", {"gpu": new})) == [ids[1]]
    other = [Change(ids[2], JobState.SUCCESS, Reason.FINISHED)]
    assert await a.record(other, now + 2, fence=Fence("a", {"cpu": 1})) == []
    await b.record_progress(
        [ProgressUpdate(ids[0], "3", 5, 10, now + 1)], fence=Fence("b", {"gpu": new})
    )
    record = await b.job_record(ids[0])
    assert record is not None and record.job.progress_value == 5
    # without a fence (a single daemon) writes go ahead as before
    assert await a.record(other, now + 3) == [ids[2]]


async def test_active_jobs_of_some_servers(stores: tuple[Store, Store]) -> None:
    a, _ = stores
    await a.register([NewJob(s, "p", {}, (), "test") for s in ("x", "y", "z")], time.time())
    assert sorted(j.server for j in await a.active_jobs(servers=["x", "z"])) == ["x", "z"]


async def test_replicas_spread_servers_and_rebalance_when_one_joins_and_leaves(
    stores: tuple[Store, Store],
) -> None:
    a_store, b_store = stores
    servers = [f"gpu-{i}" for i in range(8)]
    lost: dict[str, list[set[str]]] = {"a": [], "b": []}
    metrics = Metrics()
    a = Replica(
        a_store,
        servers=servers,
        lease_s=30,
        replica_id="a",
        metrics=metrics,
        on_change=lambda gone: lost["a"].append(gone),
    )
    b = Replica(b_store, servers=servers, lease_s=30, replica_id="b", on_change=lost["b"].append)
    await a.beat()
    assert a.owned() == set(servers)  # alone: everything
    assert metrics.lease_takeovers._value.get() == len(servers)
    await b.beat()
    assert b.owned() == set()  # everything is held by a, which is live
    await a.beat()  # a sees b: gives back b's share, stops polling it first
    share = {s for s, owner in assign(servers, ["a", "b"]).items() if owner == "b"}
    assert share and a.owned() == set(servers) - share
    assert set().union(*lost["a"]) == share
    await b.beat()
    assert b.owned() == share
    assert a.fence().epochs == dict.fromkeys(set(servers) - share, 1)
    assert b.fence().epochs == dict.fromkeys(share, 2)  # taken over: a new epoch

    await b.leave()  # a clean stop gives its leases back at once
    await a.beat()
    assert a.owned() == set(servers)


async def test_a_replica_that_cannot_renew_stops_counting_its_leases(pg: str) -> None:
    host, _, rest = pg.removeprefix("postgresql://").partition("/")
    user, _, address = host.rpartition("@")
    proxy = TcpProxy(*address.split(":")[0:1], int(address.split(":")[1]))
    await proxy.start()
    store = Store.open(f"postgresql://{user}@127.0.0.1:{proxy.port}/{rest}")
    now = [0.0]
    a = Replica(store, servers=["gpu"], lease_s=3, replica_id="a", mono=lambda: now[0])
    try:
        await store.migrate()
        await a.beat()
        assert a.owned() == {"gpu"}
        proxy.cut()  # the database is unreachable from here on
        now[0] = 1.0
        await a.beat()  # fails: the lease still counts, for now
        assert a.owned() == {"gpu"}
        now[0] = 3.0 * 0.8  # the renewal deadline: before the lease expires in the database
        await a.beat()
        assert a.owned() == set()
        assert a.fence().epochs == {}
    finally:
        await store.close()
        await proxy.stop()


async def test_replicas_migrating_together_wait_for_each_other(pg: str) -> None:
    stores = [Store.open(pg) for _ in range(3)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        current, head = await stores[0].schema_revision()
        assert current == head
    finally:
        for s in stores:
            await s.close()


async def test_a_daemon_older_than_the_schema_refuses_to_start(pg: str) -> None:
    store = Store.open(pg)
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(StoreError, match=r"9999.*newer comfywatch.*upgrade this comfywatch"):
            await store.migrate()
    finally:
        await store.close()


def test_replicas_need_postgresql(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"gpu": "http://127.0.0.1:9"}, daemon={"replicas": True})
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    text_ = str(caught.value)
    assert "daemon.replicas" in text_ and str(config) in text_ and "PostgreSQL" in text_


def test_the_lease_must_outlast_several_polls(tmp_path: Path) -> None:
    daemon = {
        "database": "postgresql://postgres@127.0.0.1/test",
        "replicas": True,
        "poll_interval_s": 2,
        "lease_s": 5,
    }
    config = write_config(tmp_path, {"gpu": "http://127.0.0.1:9"}, daemon=daemon)
    with pytest.raises(ConfigError, match=r"daemon\.lease_s.*3 times poll_interval_s"):
        load_settings(config)
    daemon["lease_s"] = 6
    config = write_config(tmp_path, {"gpu": "http://127.0.0.1:9"}, daemon=daemon)
    settings = load_settings(config)
    assert settings.daemon.replicas and settings.daemon.lease_s == 6


async def test_replicas_lists_live_replicas_their_servers_and_lease_expiries(
    stores: tuple[Store, Store], pg: str, tmp_path: Path
) -> None:
    a_store, b_store = stores
    metrics = Metrics()
    a = Replica(a_store, servers=["gpu-0", "gpu-1"], lease_s=30, replica_id="a", metrics=metrics)
    await a.beat()
    b = Replica(b_store, servers=["gpu-0", "gpu-1"], lease_s=30, replica_id="b")
    await b.beat()  # live, holding nothing yet
    owned = metrics.lease_owned
    assert {s: owned.labels(s)._value.get() for s in ("gpu-0", "gpu-1")} == {
        "gpu-0": 1,
        "gpu-1": 1,
    }
    config = write_config(
        tmp_path,
        {"gpu-0": "http://127.0.0.1:9", "gpu-1": "http://127.0.0.1:9"},
        daemon={"database": pg, "replicas": True},
    )
    code, out, err = await run_cli("replicas", "--json", "--config", str(config))
    assert code == 0, err
    listed = json.loads(out)
    assert [r["id"] for r in listed] == ["a", "b"]
    assert [s["server"] for s in listed[0]["servers"]] == ["gpu-0", "gpu-1"]
    assert all(s["epoch"] == 1 and s["expires_at"] for s in listed[0]["servers"])
    assert listed[1]["servers"] == []
    assert listed[0]["pid"] == os.getpid() and listed[0]["heartbeat_at"]
    code, out, _ = await run_cli("replicas", "--config", str(config))
    assert code == 0 and "gpu-0  epoch 1" in out and "(no servers)" in out
    await a.leave()
    code, out, _ = await run_cli("replicas", "--json", "--config", str(config))
    assert [r["id"] for r in json.loads(out)] == ["b"]
    assert owned.labels("gpu-0")._value.get() == 0


async def test_a_single_daemon_older_than_the_schema_refuses_to_start_on_sqlite(
    tmp_path: Path,
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(StoreError, match=r"9999.*newer comfywatch.*upgrade this comfywatch"):
            await store.migrate()
    finally:
        await store.close()
