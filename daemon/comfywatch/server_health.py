"""What the poller remembers about each server between polls: up or down, backoff, restarts.

A failing server is backed off (exponential, jittered, capped; at once to the cap when it
refuses our credentials) on the monotonic clock, so a step of the wall clock never delays
the next poll; an outage is logged once per episode and its end once. Every poll's result
goes to the ``comfywatch_polls_total``, ``comfywatch_server_up`` and
``comfywatch_server_last_poll_timestamp_seconds`` metrics, and to the restart evidence
(:mod:`comfywatch.restarts`), with the WebSocket's connections and drops.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from comfywatch.errors import ServerAuthError, ServerError
from comfywatch.metrics import Metrics
from comfywatch.restarts import (
    Look,
    RestartEvidence,
    infer_restart,
    poll_failed,
    reconfigured,
    socket_changed,
)

log = structlog.get_logger("comfywatch.poller")

#: Backoff for an unreachable server: poll_interval_s * 2**failures, capped, jittered.
MAX_BACKOFF_S = 60.0


@dataclass
class ServerHealth:
    """One server's state between polls."""

    #: Whether the last poll succeeded (``None``: not polled yet).
    up: bool | None = None
    failures: int = 0
    #: No poll before this (monotonic seconds: scheduling).
    next_poll_mono_s: float = 0.0
    error_kind: str | None = None
    #: What the last failed poll met (``None`` while the server answers).
    error: str | None = None
    #: When the first failed poll of this outage started (epoch seconds: shown and stored).
    down_since_s: float | None = None
    #: The same moment on the monotonic clock (the outage's length is measured on it).
    down_since_mono_s: float | None = None
    restart: RestartEvidence = field(default_factory=RestartEvidence)


def backoff_s(failures: int, poll_interval_s: float, max_backoff_s: float, *, auth: bool) -> float:
    """The wait before polling a failing server again, before jitter."""
    if auth:
        return max_backoff_s  # a configuration problem: retrying sooner cannot help
    return min(max_backoff_s, poll_interval_s * 2.0 ** min(failures, 16))


class ServerHealthBook:
    """The health of every server polled so far, updated after each poll."""

    def __init__(self, *, metrics: Metrics | None, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._health: defaultdict[str, ServerHealth] = defaultdict(ServerHealth)

    def of(self, server: str) -> ServerHealth:
        return self._health[server]

    def of_all(self, servers: Iterable[str]) -> dict[str, ServerHealth]:
        return {name: self._health[name] for name in servers}

    def due(self, server: str, now_mono_s: float) -> bool:
        """Whether the server may be polled now (it is not being backed off)."""
        return self._health[server].next_poll_mono_s <= now_mono_s

    def reconfigured(self, server: str) -> None:
        """A reload changed the server's settings (its URL, its credentials, ...): poll it
        at the next tick rather than after the backoff its old settings earned. What was
        watched before does not vouch for what comes after: a gap in the restart evidence."""
        health = self._health[server]
        health.next_poll_mono_s = 0.0
        health.restart = reconfigured(health.restart)

    def forget(self, server: str) -> None:
        """A reload removed the server: no health of its own any more."""
        self._health.pop(server, None)
        if self._metrics is not None:
            self._metrics.server_removed(server)

    def socket_changed(self, server: str, *, up: bool) -> None:
        """The server's WebSocket connected (``up``) or dropped."""
        health = self._health[server]
        health.restart = socket_changed(health.restart, up=up)

    def succeeded(self, server: str, look: Look, now_s: float, now_mono_s: float) -> None:
        """A poll succeeded; ``look``: what it showed."""
        health = self._health[server]
        if health.up is False:
            since = health.down_since_mono_s
            log.info(
                "server_recovered",
                server=server,
                down_for_s=round(now_mono_s - (now_mono_s if since is None else since), 3),
                failures=health.failures,
            )
        inference = infer_restart(health.restart, look)
        if inference.why:
            evidence = ",".join(sign.value for sign in inference.why)
            if inference.restarted:
                log.info("server_restart_detected", server=server, evidence=evidence)
            else:
                # Cleared by hand, or a restart between two polls: jobs that vanished
                # meanwhile are lost (left_unobserved), not cancelled.
                log.info("server_restart_possible", server=server, evidence=evidence)
        health.restart = inference.evidence
        health.up = True
        health.failures = 0
        health.error_kind = None
        health.error = None
        health.down_since_s = None
        health.down_since_mono_s = None
        health.next_poll_mono_s = 0.0
        if self._metrics is not None:
            self._metrics.poll(server, "ok")
            self._metrics.server_polled(server, True, now_s)

    def failed(
        self,
        server: str,
        exc: ServerError,
        now_s: float,
        now_mono_s: float,
        *,
        poll_interval_s: float,
    ) -> None:
        """A poll that started at ``now_s`` (``now_mono_s`` on the monotonic clock) failed."""
        health = self._health[server]
        health.failures += 1
        delay = backoff_s(
            health.failures,
            poll_interval_s,
            self._max_backoff_s,
            auth=isinstance(exc, ServerAuthError),
        )
        delay *= random.uniform(0.75, 1.0)  # noqa: S311 - jitter, not cryptography
        health.next_poll_mono_s = now_mono_s + delay
        if health.error_kind != exc.kind:
            # Once per episode (or when the kind of failure changes), not once per tick.
            log.warning(
                "server_unavailable" if health.up is not False else "server_still_unavailable",
                server=server,
                error=exc.kind,
                detail=exc.message,
                retry_in_s=round(delay, 3),
            )
        if health.up is not False:
            health.down_since_s = now_s
            health.down_since_mono_s = now_mono_s
        health.up = False
        health.error_kind = exc.kind
        health.error = exc.message
        health.restart = poll_failed(health.restart)
        if self._metrics is not None:
            self._metrics.poll(server, exc.kind)
            self._metrics.server_polled(server, False, now_s)
