"""The store: every SQL statement comfywatch runs, behind one :class:`Store`.

- ``engine``: engine set-up (SQLite WAL, busy timeout, ``BEGIN IMMEDIATE``), transactions,
  the one-daemon lock, errors translated into :class:`~comfywatch.errors.StoreError`;
  ``schema``: the Alembic migrations runner; ``drivers``: URLs and driver errors.
- ``registration``, ``jobs``, ``deliveries``, ``upkeep``: the queries, one mixin each,
  joined in ``facade``.
- ``reads``: the listing queries in Core, shared with ``readonly``: the database opened
  for reading only, without Alembic (the command line's queries).
- ``models``: the ORM tables (public: people query them); ``rows``: ORM rows into values.
- ``values``: what goes in and comes out, frozen values only (never ORM objects).

``Store`` and ``retention_cutoff`` are imported on first use: they bring in SQLAlchemy's
asyncio extension and the drivers, which the values here and ``readonly`` do without.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from comfywatch.states import DeliveryState
from comfywatch.store.values import (
    ActiveJob,
    Change,
    DeliveryRecord,
    DeliveryRow,
    DueBatch,
    DueDelivery,
    Fence,
    FinishedAttempt,
    JobFilter,
    JobRecord,
    JobRow,
    NewJob,
    ProgressUpdate,
    StoreStats,
    output_columns,
)

if TYPE_CHECKING:
    from comfywatch.store.facade import Store
    from comfywatch.store.upkeep import retention_cutoff

__all__ = [
    "ActiveJob",
    "Change",
    "DeliveryRecord",
    "DeliveryRow",
    "DeliveryState",
    "DueBatch",
    "DueDelivery",
    "Fence",
    "FinishedAttempt",
    "JobFilter",
    "JobRecord",
    "JobRow",
    "NewJob",
    "ProgressUpdate",
    "Store",
    "StoreStats",
    "output_columns",
    "retention_cutoff",
]


def __getattr__(name: str) -> Any:
    if name == "Store":
        from comfywatch.store.facade import Store

        return Store
    if name == "retention_cutoff":
        from comfywatch.store.upkeep import retention_cutoff

        return retention_cutoff
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
