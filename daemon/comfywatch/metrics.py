"""Prometheus metrics (no prompt ids as label values: cardinality stays bounded)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from comfywatch.states import DeliveryState, JobState

_LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric comfywatch exports, in one registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge(
            "comfywatch_jobs", "Tracked jobs by server and state.", ["server", "state"], registry=r
        )
        self.jobs_finished = Counter(
            "comfywatch_jobs_finished_total",
            "Jobs that reached a terminal state in this process, by server and state.",
            ["server", "state"],
            registry=r,
        )
        self.polls = Counter(
            "comfywatch_polls_total",
            "Server polls by server and result (ok, unavailable, auth, bad_response).",
            ["server", "result"],
            registry=r,
        )
        self.poll_seconds = Histogram(
            "comfywatch_poll_duration_seconds",
            "Time to poll one server (queue plus history fetches).",
            ["server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.detection_lag = Histogram(
            "comfywatch_detection_lag_seconds",
            "From ComfyUI's finish timestamp to comfywatch's commit of the terminal state.",
            ["server"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.server_reachable = Gauge(
            "comfywatch_server_up",
            "1 if the last poll of the server succeeded, else 0.",
            ["server"],
            registry=r,
        )
        self.deliveries = Counter(
            "comfywatch_hook_attempts_total",
            "Hook delivery attempts by hook and result (delivered, retry, dead).",
            ["hook", "result"],
            registry=r,
        )
        self.deliveries_by_state = Gauge(
            "comfywatch_hook_deliveries",
            "Hook deliveries in the database by hook and state (pending, delivered, dead).",
            ["hook", "state"],
            registry=r,
        )
        self.oldest_active = Gauge(
            "comfywatch_oldest_active_job_age_seconds",
            "Age (since registration) of the oldest job still registered, queued or running.",
            ["server", "state"],
            registry=r,
        )
        self.spool_files = Counter(
            "comfywatch_spool_files_total",
            "Files read from jobs_dir, by result (registered, rejected).",
            ["result"],
            registry=r,
        )
        for result in ("registered", "rejected"):
            self.spool_files.labels(result)
        self.spool_waiting = Gauge(
            "comfywatch_spool_files_waiting",
            "Files listed in jobs_dir and not yet read, as of the last pass.",
            registry=r,
        )
        self.ticks = Counter("comfywatch_ticks_total", "Completed polling passes.", registry=r)
        self.last_tick = Gauge(
            "comfywatch_last_tick_timestamp_seconds",
            "Unix time of the last completed polling pass.",
            registry=r,
        )

    def poll(self, server: str, result: str) -> None:
        self.polls.labels(server, result).inc()

    def poll_latency(self, server: str, seconds: float) -> None:
        self.poll_seconds.labels(server).observe(seconds)

    def server_up(self, server: str, up: bool) -> None:
        self.server_reachable.labels(server).set(1 if up else 0)

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
