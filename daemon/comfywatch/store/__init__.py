"""The store: every SQL statement comfywatch runs, behind one :class:`Store`.

- ``engine``: engine set-up (SQLite WAL, busy timeout, ``BEGIN IMMEDIATE``), transactions,
  the one-daemon lock, errors translated into :class:`~comfywatch.errors.StoreError`;
  ``schema``: the Alembic migrations runner.
- ``registration``, ``jobs``, ``deliveries``, ``upkeep``: the queries, one mixin each.
- ``models``: the ORM tables (public: people query them); ``rows``: ORM rows into values.
- ``values``: what goes in and comes out, frozen values only (never ORM objects).
"""

from __future__ import annotations

from comfywatch.states import DeliveryState
from comfywatch.store.deliveries import DeliveryQueries
from comfywatch.store.jobs import JobQueries
from comfywatch.store.registration import RegistrationQueries
from comfywatch.store.upkeep import UpkeepQueries, retention_cutoff
from comfywatch.store.values import (
    ActiveJob,
    Change,
    DeliveryRecord,
    DeliveryRow,
    JobFilter,
    JobRecord,
    JobRow,
    NewJob,
    StoreStats,
    output_columns,
)

__all__ = [
    "ActiveJob",
    "Change",
    "DeliveryRecord",
    "DeliveryRow",
    "DeliveryState",
    "JobFilter",
    "JobRecord",
    "JobRow",
    "NewJob",
    "Store",
    "StoreStats",
    "output_columns",
    "retention_cutoff",
]


class Store(RegistrationQueries, JobQueries, DeliveryQueries, UpkeepQueries):
    """The database behind comfywatch: jobs, their outputs, and the hook outbox."""
