"""A token bucket per client.

Hand-written on purpose: the libraries on PyPI (pyrate-limiter, limits) add storage
backends and locks for a job that is ten lines of arithmetic on one event loop, and
the ingress needs the exact wait time for Retry-After, which this returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBuckets:
    """`rate` tokens a second per client, up to `burst` saved. rate 0: no limit."""

    max_clients = 100_000

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str, cost: int = 1) -> float:
        """Take `cost` tokens; return 0 if granted, else the seconds until they would
        be (nothing is taken then). A cost above the burst can never be granted whole,
        so it is charged as the full bucket."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        cost = min(cost, self.burst)
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= cost:
            if len(self._buckets) >= self.max_clients and client not in self._buckets:
                # Bounded memory under many distinct clients (unsigned mode keys by
                # address): buckets full by now carry no information, drop them. (Full
                # as refilled up to now, not as stored at their last request.)
                self._buckets = {
                    k: (tokens_at, at)
                    for k, (tokens_at, at) in self._buckets.items()
                    if tokens_at + (now - at) * self.rate < self.burst
                }
                if len(self._buckets) >= self.max_clients:
                    self._buckets.clear()
            self._buckets[client] = (tokens - cost, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (cost - tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """Retry-After is whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_s)))
