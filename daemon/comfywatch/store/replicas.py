"""Replica and lease queries (``[daemon] replicas = true``, PostgreSQL only).

Every expiry is set and compared by the database's clock (``clock_timestamp()``), so the
replicas' hosts need not agree on the time. A lease is taken by a conditional ``UPDATE``
(only while free or expired) that raises its epoch; it is renewed or released only by
its owner at the epoch it took. Writes for a server's jobs lock its lease row (``FOR
SHARE``) and go ahead only while owner and epoch are still the writer's
(:func:`fenced_servers`): a takeover waits for them to commit, and a replica that lost
the lease writes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import timedelta

from sqlalchemy import Interval, Table, and_, delete, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from comfywatch.leases import Lease
from comfywatch.store import tables
from comfywatch.store.engine import Database
from comfywatch.store.values import Fence

_REPLICAS: Table = tables.replicas
_LEASES: Table = tables.server_leases


def _db_now() -> ColumnElement[object]:
    return func.clock_timestamp()


def _in(lease_s: float) -> ColumnElement[object]:
    return func.clock_timestamp() + literal(timedelta(seconds=lease_s), Interval())


def _expired() -> ColumnElement[bool]:
    return or_(
        _LEASES.c.owner.is_(None),
        _LEASES.c.expires_at.is_(None),
        _LEASES.c.expires_at <= _db_now(),
    )


class ReplicaQueries(Database):
    """The ``replicas`` and ``server_leases`` tables."""

    async def heartbeat(
        self, replica_id: str, *, host: str, pid: int, version: str, lease_s: float
    ) -> None:
        """Register ``replica_id`` as live for ``lease_s`` more seconds (an upsert)."""
        async with self._session() as session:
            statement = pg_insert(_REPLICAS).values(
                id=replica_id,
                host=host,
                pid=pid,
                version=version,
                started_at=_db_now(),
                heartbeat_at=_db_now(),
                expires_at=_in(lease_s),
            )
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[_REPLICAS.c.id],
                    set_={"heartbeat_at": _db_now(), "expires_at": _in(lease_s)},
                )
            )

    async def leave(self, replica_id: str) -> None:
        """A replica that stops: its leases are free at once, its registration goes."""
        async with self._session() as session:
            await session.execute(
                update(_LEASES)
                .where(_LEASES.c.owner == replica_id)
                .values(owner=None, expires_at=None, updated_at=_db_now())
            )
            await session.execute(delete(_REPLICAS).where(_REPLICAS.c.id == replica_id))

    async def lease_view(self) -> tuple[set[str], dict[str, Lease]]:
        """The live replicas (registration not expired), and every lease."""
        async with self._session(read_only=True) as session:
            live = set(
                await session.scalars(
                    select(_REPLICAS.c.id).where(_REPLICAS.c.expires_at > _db_now())
                )
            )
            rows = await session.execute(
                select(_LEASES.c.server, _LEASES.c.owner, _LEASES.c.epoch, _expired())
            )
            leases = {
                r[0]: Lease(server=r[0], owner=r[1], epoch=int(r[2]), expired=bool(r[3]))
                for r in rows
            }
        return live, leases

    async def renew_leases(
        self, replica_id: str, epochs: Mapping[str, int], lease_s: float
    ) -> set[str]:
        """Extend the leases ``replica_id`` holds at the given epochs; returns the servers
        renewed (a lease taken over since, at a higher epoch, is not)."""
        if not epochs:
            return set()
        async with self._session() as session:
            rows = await session.scalars(
                update(_LEASES)
                .where(
                    _LEASES.c.owner == replica_id,
                    tuple_(_LEASES.c.server, _LEASES.c.epoch).in_(list(epochs.items())),
                )
                .values(expires_at=_in(lease_s), updated_at=_db_now())
                .returning(_LEASES.c.server)
            )
            return set(rows)

    async def take_lease(self, replica_id: str, server: str, lease_s: float) -> int | None:
        """Take ``server``'s lease if it is free or expired; returns the new epoch (one more
        than the last), or ``None`` when another replica holds it."""
        async with self._session() as session:
            await session.execute(
                pg_insert(_LEASES)
                .values(server=server, owner=None, epoch=0, expires_at=None, updated_at=_db_now())
                .on_conflict_do_nothing(index_elements=[_LEASES.c.server])
            )
            epoch = await session.scalar(
                update(_LEASES)
                .where(_LEASES.c.server == server, _expired())
                .values(
                    owner=replica_id,
                    epoch=_LEASES.c.epoch + 1,
                    expires_at=_in(lease_s),
                    updated_at=_db_now(),
                )
                .returning(_LEASES.c.epoch)
            )
            return None if epoch is None else int(epoch)

    async def release_lease(self, replica_id: str, server: str, epoch: int) -> bool:
        """Give ``server``'s lease back (only at the epoch taken); True if it was held."""
        async with self._session() as session:
            released = await session.scalar(
                update(_LEASES)
                .where(
                    _LEASES.c.server == server,
                    _LEASES.c.owner == replica_id,
                    _LEASES.c.epoch == epoch,
                )
                .values(owner=None, expires_at=None, updated_at=_db_now())
                .returning(_LEASES.c.server)
            )
            return released is not None


async def fenced_servers(session: AsyncSession, fence: Fence, servers: Collection[str]) -> set[str]:
    """Those of ``servers`` whose lease is still ``fence``'s (owner and epoch), locked
    ``FOR SHARE`` until the transaction ends: no takeover commits in between."""
    wanted = [(s, e) for s in servers if (e := fence.epochs.get(s)) is not None]
    if not wanted:
        return set()
    rows = await session.scalars(
        select(_LEASES.c.server)
        .where(
            and_(
                _LEASES.c.owner == fence.owner,
                tuple_(_LEASES.c.server, _LEASES.c.epoch).in_(wanted),
            )
        )
        .with_for_update(read=True)
    )
    return set(rows)
