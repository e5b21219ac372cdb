"""Per-participant quotas: token buckets, one per caller, on each node.

A participant's quota is in payments per second *per node* (a payment in a batch counts
as one; any other call counts as one). The bucket holds ``BURST_S`` seconds of quota, so
a participant below its quota is never refused for bursting within a second. A batch
larger than the bucket is let through when the bucket is full and leaves it in debt, so
over any longer period nobody gets more than its quota. Beyond it the call is refused
before any work with RESOURCE_EXHAUSTED and ``retry_after_ms``: when enough tokens will
be back.

The buckets are bounded (``MAX_BUCKETS``): identities are certificates the CA issued, so
their number is small, but a bound is cheap.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from clearinghouse.domain.errors import RETRY_AFTER_MS_MAX, ResourceExhausted

BURST_S: Final = 1.0
MAX_BUCKETS: Final = 10_000
RETRY_AFTER_MS_MIN: Final = 10
RATE_LIMITED: Final = "RATE_LIMITED"


@dataclass(slots=True)
class _Bucket:
    rate_per_s: float
    capacity: float
    tokens: float
    at_s: float


class RateLimiter:
    """``take(key, n)`` or raise ResourceExhausted; ``quota_per_s(key)`` gives the rate.

    A quota of 0 or less means "no limit" for that key.
    """

    def __init__(
        self,
        quota_per_s: Callable[[str], int],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._quota = quota_per_s
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, n: int = 1) -> None:
        rate = self._quota(key)
        if rate <= 0:
            return
        capacity = max(rate * BURST_S, 1.0)
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = _Bucket(rate, capacity, capacity, now)
                self._buckets[key] = b
                if len(self._buckets) > MAX_BUCKETS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                if b.rate_per_s != rate or b.capacity != capacity:
                    b.rate_per_s, b.capacity = rate, capacity
                b.tokens = min(b.capacity, b.tokens + (now - b.at_s) * b.rate_per_s)
                b.at_s = now
            # A call larger than the bucket needs a full bucket, and leaves it in debt.
            if b.tokens >= min(n, b.capacity):
                b.tokens -= n
                return
            missing = min(n, b.capacity) - b.tokens
        wait_ms = min(RETRY_AFTER_MS_MAX, max(RETRY_AFTER_MS_MIN, math.ceil(missing / rate * 1000)))
        raise ResourceExhausted(
            f"{key} is over its quota of {rate} payments/s on this node; retry after {wait_ms} ms",
            retry_after_ms=wait_ms,
            reason=RATE_LIMITED,
        )
