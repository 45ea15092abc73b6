"""Per-client rate limits of the HTTP API: a token bucket per client address, for creating
conversations and for posting messages, in bounded memory."""

from __future__ import annotations

import math
from collections import OrderedDict

from starlette.requests import Request

from costream.config import Settings
from costream.server.pacing import RateLimit

MAX_CLIENTS = 10_000  # buckets kept per limit; past it the least recently seen is dropped


def client_address(request: Request) -> str:
    """Who sends the request: the peer's address. Behind a reverse proxy whose address is
    in uvicorn's ``FORWARDED_ALLOW_IPS`` (default: loopback), uvicorn has already put the
    client's own address there, the last ``X-Forwarded-For`` entry the proxies did not add;
    from any other peer, ``X-Forwarded-For`` is ignored, so a client cannot pick its own."""
    return request.client.host if request.client else ""


class ClientLimits:
    """``per_minute`` requests per client, in bursts of up to a minute's worth."""

    def __init__(self, per_minute: float, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, RateLimit] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, client: str) -> int | None:
        """None when ``client`` may go on (a token is spent), else the whole seconds until
        it may. A rate of 0 never limits."""
        if self.rate <= 0:
            return None
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = RateLimit(self.rate, self.burst)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        if bucket.allow():
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))


class HTTPLimits:
    """The HTTP API's per-client limits of one process."""

    def __init__(self, settings: Settings) -> None:
        self.create = ClientLimits(settings.create_rate)
        self.message = ClientLimits(settings.message_rate)

    def check(self, limits: ClientLimits, request: Request) -> int | None:
        """Seconds the request's client must wait, or None when it may go on."""
        return limits.retry_after(client_address(request))
