"""The switch's heap and CPython's cyclic garbage collector.

A shard owner keeps every payment of its shards in memory: on a long ledger about a
million tracked objects per node, nearly all alive for as long as the node owns their
shard. The collector walks every tracked object at each full collection, and starts one
whenever the objects that survived since the last one grew by a quarter: during a
takeover again and again, and under load every so often, each time holding the GIL for
the whole walk. Measured on the local cluster holding about 150,000 payments (a switch
process right after a restart, then under batched load): the collector used 13 of its
first 60 CPU seconds, 10 of them in 21 full collections.

So, as servers with a large long-lived heap do: when a wave of takeovers is over, collect
once and move what survived into the permanent generation (``gc.freeze``); later
collections skip it. What reference counting frees (the payments of a shard given up) is
freed as before. Cyclic garbage among frozen objects (a request's exception and its
frames, frozen in flight) would stay until the next wave: that one first unfreezes
everything, so its one full collection frees it. The young generation
is collected every 50,000 allocations instead of 700, so the objects of a request mostly
die before the collector ever walks them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

GC_YOUNG_ALLOCATIONS = 50_000
GC_MIDDLE_PER_YOUNG_COLLECTIONS = 20
GC_OLD_PER_MIDDLE_COLLECTIONS = 10

log = logging.getLogger(__name__)


def configure_collector() -> None:
    gc.set_threshold(
        GC_YOUNG_ALLOCATIONS, GC_MIDDLE_PER_YOUNG_COLLECTIONS, GC_OLD_PER_MIDDLE_COLLECTIONS
    )


class TakeoverHeap:
    """Counts takeovers in flight; when the last of a wave ends, freezes the survivors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def ended(self) -> bool:
        """One takeover ended; whether it was the last in flight (the heap was frozen)."""
        with self._lock:
            self._in_flight -= 1
            if self._in_flight > 0:
                return False
        started = time.monotonic()
        gc.unfreeze()  # what an earlier wave froze and has since become garbage goes too
        collected = gc.collect()
        gc.freeze()
        log.info(
            "takeovers done: %d objects frozen after a collection (%d freed) in %.2f s",
            gc.get_freeze_count(), collected, time.monotonic() - started,
        )  # fmt: skip
        return True
