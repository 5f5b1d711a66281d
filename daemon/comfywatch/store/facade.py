"""The :class:`Store`: the query mixins on one database engine."""

from __future__ import annotations

from comfywatch.store.deliveries import DeliveryQueries
from comfywatch.store.jobs import JobQueries
from comfywatch.store.registration import RegistrationQueries
from comfywatch.store.replicas import ReplicaQueries
from comfywatch.store.upkeep import UpkeepQueries


class Store(RegistrationQueries, JobQueries, DeliveryQueries, UpkeepQueries, ReplicaQueries):
    """The database behind comfywatch: jobs, their outputs, and the hook outbox."""
