"""Prometheus metrics (no prompt ids as label values: cardinality stays bounded)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from comfywatch.states import DeliveryState, JobState

_LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


#: Every metric's name and help text (the same order as in ``Metrics.__init__``).
_HELP: Mapping[str, str] = {
    "comfywatch_jobs": "Tracked jobs by server and state.",
    "comfywatch_jobs_finished_total": (
        "Jobs that reached a terminal state in this process, by server and state."
    ),
    "comfywatch_polls_total": (
        "Server polls by server and result (ok, unavailable, auth, bad_response)."
    ),
    "comfywatch_poll_duration_seconds": "Time to poll one server (queue plus history fetches).",
    "comfywatch_detection_lag_seconds": (
        "From when a finish became observable (the socket frame or poll answer that showed "
        "it) to comfywatch's commit of the terminal state, on this host's monotonic clock."
    ),
    "comfywatch_server_up": "1 if the last poll of the server succeeded, else 0.",
    "comfywatch_server_last_poll_timestamp_seconds": (
        "Unix time of the last poll of the server, whatever its result."
    ),
    "comfywatch_server_queue_remaining": (
        "Prompts running or waiting on the server (ComfyUI's queue_remaining), as last seen; "
        "absent while unknown (the server not polled yet, or its last poll failed)."
    ),
    "comfywatch_hook_attempts_total": (
        "Hook delivery attempts by hook and result (delivered, retry, dead)."
    ),
    "comfywatch_hook_deliveries": (
        "Hook deliveries in the database by hook and state (pending, delivered, dead)."
    ),
    "comfywatch_oldest_active_job_age_seconds": (
        "Age (since registration) of the oldest job still registered, queued or running."
    ),
    "comfywatch_ticks_total": "Completed polling passes.",
    "comfywatch_spool_files_total": "Files read from jobs_dir, by result (registered, rejected).",
    "comfywatch_spool_files_waiting": (
        "Files listed in jobs_dir and not yet read, as of the last pass."
    ),
    "comfywatch_last_tick_timestamp_seconds": "Unix time of the last completed polling pass.",
    "comfywatch_config_last_reload_successful": (
        "1 if the last configuration load (start-up or reload) succeeded, 0 if it failed."
    ),
    "comfywatch_config_last_reload_success_timestamp_seconds": (
        "Unix time of the last successful configuration load (start-up or reload)."
    ),
    "comfywatch_lease_owned": (
        "With replicas: 1 if this replica holds the server's lease (polls it), else 0."
    ),
    "comfywatch_lease_takeovers_total": (
        "With replicas: server leases this replica took (free, expired or given back)."
    ),
}


class Metrics:
    """Every metric comfywatch exports, in one registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = self._gauge("comfywatch_jobs", "server", "state")
        self.jobs_finished = self._counter("comfywatch_jobs_finished_total", "server", "state")
        self.polls = self._counter("comfywatch_polls_total", "server", "result")
        self.poll_seconds = self._histogram(
            "comfywatch_poll_duration_seconds", _LATENCY_BUCKETS, "server"
        )
        self.detection_lag = self._histogram(
            "comfywatch_detection_lag_seconds", _LAG_BUCKETS, "server"
        )
        self.server_reachable = self._gauge("comfywatch_server_up", "server")
        self.server_last_poll = self._gauge(
            "comfywatch_server_last_poll_timestamp_seconds", "server"
        )
        self.server_queue_remaining = self._gauge("comfywatch_server_queue_remaining", "server")
        self.deliveries = self._counter("comfywatch_hook_attempts_total", "hook", "result")
        self.deliveries_by_state = self._gauge("comfywatch_hook_deliveries", "hook", "state")
        self.oldest_active = self._gauge(
            "comfywatch_oldest_active_job_age_seconds", "server", "state"
        )
        self.ticks = self._counter("comfywatch_ticks_total")
        self.spool_files = self._counter("comfywatch_spool_files_total", "result")
        for result in ("registered", "rejected"):
            self.spool_files.labels(result)
        self.spool_waiting = self._gauge("comfywatch_spool_files_waiting")
        self.last_tick = self._gauge("comfywatch_last_tick_timestamp_seconds")
        self.reload_ok = self._gauge("comfywatch_config_last_reload_successful")
        self.reload_ok_at = self._gauge("comfywatch_config_last_reload_success_timestamp_seconds")
        self.lease_owned = self._gauge("comfywatch_lease_owned", "server")
        self.lease_takeovers = self._counter("comfywatch_lease_takeovers_total")

    def _counter(self, name: str, *labels: str) -> Counter:
        return Counter(name, _HELP[name], labels, registry=self.registry)

    def _gauge(self, name: str, *labels: str) -> Gauge:
        return Gauge(name, _HELP[name], labels, registry=self.registry)

    def _histogram(self, name: str, buckets: Sequence[float], *labels: str) -> Histogram:
        return Histogram(name, _HELP[name], labels, buckets=buckets, registry=self.registry)

    def poll(self, server: str, result: str) -> None:
        self.polls.labels(server, result).inc()

    def poll_latency(self, server: str, seconds: float) -> None:
        self.poll_seconds.labels(server).observe(seconds)

    def server_up(self, server: str, up: bool) -> None:
        self.server_reachable.labels(server).set(1 if up else 0)

    def server_removed(self, server: str) -> None:
        """A reload removed the server: it is no longer up or down."""
        with contextlib.suppress(KeyError):
            self.server_reachable.remove(server)

    def config_loaded(self, ok: bool, now_s: float) -> None:
        """A configuration load (start-up or reload) succeeded or failed at ``now_s``."""
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_ok_at.set(now_s)

    def server_polled(self, server: str, up: bool, now_s: float) -> None:
        """A poll of ``server`` ended at ``now_s`` (epoch seconds), successful or not."""
        self.server_up(server, up)
        self.server_last_poll.labels(server).set(now_s)
        if not up:
            self.server_queue(server, None)

    def server_queue(self, server: str, remaining: int | None) -> None:
        """The server's queue length as last seen (``None``: unknown)."""
        if remaining is not None:
            self.server_queue_remaining.labels(server).set(remaining)
            return
        with contextlib.suppress(KeyError):  # never set
            self.server_queue_remaining.remove(server)

    def job_finished(self, server: str, state: JobState, lag_s: float | None) -> None:
        self.jobs_finished.labels(server, state.value).inc()
        if lag_s is not None:
            self.detection_lag.labels(server).observe(lag_s)

    def delivery(self, hook: str, result: str) -> None:
        self.deliveries.labels(hook, result).inc()

    def set_job_counts(self, counts: Mapping[tuple[str, JobState], int]) -> None:
        self.jobs.clear()
        for (server, state), count in counts.items():
            self.jobs.labels(server, state.value).set(count)

    def set_delivery_counts(self, counts: Mapping[tuple[str, DeliveryState], int]) -> None:
        self.deliveries_by_state.clear()
        for (hook, state), count in counts.items():
            self.deliveries_by_state.labels(hook, state.value).set(count)

    def set_oldest_active(self, ages_s: Mapping[tuple[str, JobState], float]) -> None:
        self.oldest_active.clear()
        for (server, state), age in ages_s.items():
            self.oldest_active.labels(server, state.value).set(age)
