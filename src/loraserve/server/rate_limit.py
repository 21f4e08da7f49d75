"""Per-caller rate limits (`--rate-limit-per-minute`, `--rate-limit-burst`): a token bucket per tenant when the
server has API keys (every key of a tenant shares its bucket), else per client address (the TCP peer: a proxy in
front makes every client one caller, so limit at the proxy there). Over the limit: 429 with `Retry-After`.

Every route that needs a key counts (`/health`, `/metrics` and the API docs do not). Plain ASGI after the key gate,
which has put the caller's `Principal` in the scope.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.server.auth import OPEN_PATHS
from loraserve.server.errors import error_response


class TokenBuckets:
    """One bucket per caller, refilled continuously at `per_minute / 60` tokens a second up to `burst`.

    A bucket that has refilled to `burst` is the same as none, so those are forgotten: memory follows the callers
    active within the last `burst / rate` seconds, not every address ever seen. Only the event loop touches it.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, when); LRU first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Spend one of the caller's tokens and return 0, or return the seconds until it has one."""
        now = self.clock()
        tokens, when = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[caller] = (tokens, now)
        self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        while self._buckets:
            caller, (tokens, when) = next(iter(self._buckets.items()))
            if tokens + (now - when) * self.rate < self.burst:
                return
            del self._buckets[caller]


class RateLimit:
    def __init__(self, app: ASGIApp, buckets: TokenBuckets, keyed: bool) -> None:
        self.app = app
        self.buckets = buckets
        self.keyed = keyed
        self.per_minute = buckets.rate * 60

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        if self.keyed:
            caller = "tenant:" + scope["state"]["principal"].tenant
        else:
            caller = "address:" + (scope["client"][0] if scope.get("client") else "unknown")
        wait = self.buckets.take(caller)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            message = (f"rate limit exceeded: {self.per_minute:g} requests per minute, {self.buckets.burst} at once "
                       f"(--rate-limit-per-minute, --rate-limit-burst); retry in {retry_after} s")
            response = error_response(scope["path"], message, "rate_limit_exceeded", 429,
                                      headers={"Retry-After": str(retry_after)})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
