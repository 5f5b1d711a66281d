"""What each client costs the fake server: requests, body bytes and CPU time per route.

For benchmarks and tests of pollers. A client is named by its ``User-Agent`` header, or,
on ``/ws`` without one, by its ``clientId`` query (``client_name``). Per client and route
kind (``GET /queue``, ...) :class:`ServerStats` counts requests, response body bytes
(WebSocket frames sent count under ``GET /ws``) and the CPU time of the handler
(``time.thread_time()`` from the request's arrival to the handler's return; the loop runs
in one thread, so this includes whatever else ran while a handler awaited, which only
POST bodies and injected faults do). It also keeps a bounded log per client of when each
HTTP request arrived and was answered, on ``time.monotonic()`` (one clock for every
process on the machine), so a test can check that two clients never polled at once.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["Poll", "RouteStats", "ServerStats", "client_name", "stats_routes"]

JSON = Any

#: Where the clients beyond ``max_clients`` are counted.
OTHER_CLIENTS: Final = "(other)"
#: The name of a client that sent no ``User-Agent``.
UNKNOWN_CLIENT: Final = "(unknown)"
_MAX_NAME_CHARS: Final = 200


def client_name(request: web.Request) -> str:
    """The accounting name of a request's client."""
    name = request.headers.get("User-Agent", "")
    if not name and request.path.endswith("/ws"):
        name = request.query.get("clientId", "")
    return name[:_MAX_NAME_CHARS] if name else UNKNOWN_CLIENT


@dataclass(slots=True)
class RouteStats:
    """What one client's requests to one route cost (or a sum of them)."""

    requests: int = 0
    response_bytes: int = 0
    cpu_s: float = 0.0

    def add(self, other: RouteStats) -> None:
        self.requests += other.requests
        self.response_bytes += other.response_bytes
        self.cpu_s += other.cpu_s


@dataclass(frozen=True, slots=True)
class Poll:
    """One HTTP request: who, which route, when it arrived and was answered (monotonic s)."""

    client: str
    route: str
    started_s: float
    finished_s: float


class ServerStats:
    """Costs per client and route, and each client's recent requests.

    ``max_clients`` bounds the number of names kept (more go to ``"(other)"``);
    ``max_polls_per_client`` bounds each client's log (the oldest entries go).
    """

    def __init__(self, *, max_clients: int = 1_000, max_polls_per_client: int = 10_000) -> None:
        self.max_clients = max_clients
        self.max_polls_per_client = max_polls_per_client
        self._costs: dict[str, dict[str, RouteStats]] = {}
        self._polls: dict[str, collections.deque[Poll]] = {}

    def record(
        self,
        client: str,
        route: str,
        *,
        response_bytes: int,
        cpu_s: float,
        started_s: float,
        finished_s: float,
    ) -> None:
        """One answered HTTP request."""
        client = self._slot(client)
        cost = self._costs[client].setdefault(route, RouteStats())
        cost.requests += 1
        cost.response_bytes += response_bytes
        cost.cpu_s += cpu_s
        log = self._polls.setdefault(client, collections.deque(maxlen=self.max_polls_per_client))
        log.append(Poll(client, route, started_s, finished_s))

    def record_connection(self, client: str, route: str) -> None:
        """A request that is not a poll (a WebSocket opening): counted, not logged."""
        client = self._slot(client)
        self._costs[client].setdefault(route, RouteStats()).requests += 1

    def record_sent(self, client: str, route: str, sent_bytes: int) -> None:
        """Bytes sent later on a connection (WebSocket frames)."""
        client = self._slot(client)
        self._costs[client].setdefault(route, RouteStats()).response_bytes += sent_bytes

    def reset(self) -> None:
        self._costs.clear()
        self._polls.clear()

    def clients(self) -> list[str]:
        return sorted(self._costs)

    def routes(self, client: str) -> dict[str, RouteStats]:
        """A client's costs by route (copies; empty for an unknown client)."""
        return {
            route: RouteStats(**asdict(cost)) for route, cost in self._costs.get(client, {}).items()
        }

    def total(self, client: str | None = None, route: str | None = None) -> RouteStats:
        """The sum over one client (or all) and one route (or all)."""
        total = RouteStats()
        for name, costs in self._costs.items():
            if client is None or name == client:
                for kind, cost in costs.items():
                    if route is None or kind == route:
                        total.add(cost)
        return total

    def polls(self, client: str | None = None) -> list[Poll]:
        """The logged requests of one client (or all), by arrival."""
        logs: Iterable[collections.deque[Poll]] = (
            self._polls.values()
            if client is None
            else [self._polls.get(client, collections.deque())]
        )
        return sorted((poll for log in logs for poll in log), key=lambda poll: poll.started_s)

    def snapshot(self) -> dict[str, JSON]:
        """``GET /_fake/stats``: ``{"clients": {name: {route: costs}}, "total": costs}``."""
        return {
            "clients": {
                name: {route: asdict(cost) for route, cost in sorted(costs.items())}
                for name, costs in sorted(self._costs.items())
            },
            "total": asdict(self.total()),
        }

    def polls_snapshot(self, client: str | None = None) -> dict[str, JSON]:
        """``GET /_fake/polls``: ``{"clock": "monotonic", "polls": [...]}``, by arrival."""
        return {"clock": "monotonic", "polls": [asdict(poll) for poll in self.polls(client)]}

    def _slot(self, client: str) -> str:
        if client not in self._costs:
            if len(self._costs) >= self.max_clients:
                client = OTHER_CLIENTS
            self._costs.setdefault(client, {})
        return client


def stats_routes(stats: ServerStats) -> list[tuple[str, str, Handler]]:
    """The fake's own routes: ``GET /_fake/stats`` (:meth:`ServerStats.snapshot`),
    ``DELETE /_fake/stats`` (reset), ``GET /_fake/polls[?client=NAME]``."""

    async def get_stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(stats.snapshot())

    async def delete_stats(request: web.Request) -> web.StreamResponse:
        stats.reset()
        return web.Response(status=204)

    async def get_polls(request: web.Request) -> web.StreamResponse:
        return web.json_response(stats.polls_snapshot(request.query.get("client")))

    return [
        ("GET", "/_fake/stats", get_stats),
        ("DELETE", "/_fake/stats", delete_stats),
        ("GET", "/_fake/polls", get_polls),
    ]
