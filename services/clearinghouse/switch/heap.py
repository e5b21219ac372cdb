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

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GC_YOUNG_ALLOCATIONS = 50_000
GC_MIDDLE_PER_YOUNG_COLLECTIONS = 20
GC_OLD_PER_MIDDLE_COLLECTIONS = 10

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def resident_mib() -> float:
    """This process's resident memory, from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


# Trim only when the process grew at least this much since the last trim: an inclusion
# proof of a small window, refused early or not, costs no malloc_trim, no log line.
RELEASE_MIN_GROWTH_MIB = 64.0


class _LastTrim:
    resident_mib = 0.0  # the process's size right after the last trim


def release_free_memory() -> None:
    """Give the memory freed by a large one-off piece of work (an export, a window's
    clearing, a wave of takeovers) back to the system.

    glibc keeps freed memory for reuse inside its heap; after reading a window of
    hundreds of thousands of entries a node kept about 1.3 GiB it no longer used (an
    export of a 405 MiB entries file, measured on the local cluster). ``malloc_trim``
    returns the free pages (measured in-process: 7 ms for a heap of about 0.9 GiB; ctypes
    releases the GIL for it). Nothing where libc is not glibc."""
    if _TRIM is None:
        return
    before = resident_mib()
    if before - _LastTrim.resident_mib < RELEASE_MIN_GROWTH_MIB:
        return
    started = time.monotonic()
    _TRIM(0)
    _LastTrim.resident_mib = resident_mib()
    log.info(
        "returned free memory to the system: resident %.0f -> %.0f MiB in %.3f s",
        before, _LastTrim.resident_mib, time.monotonic() - started,
    )  # fmt: skip


@contextmanager
def freed_afterwards() -> Iterator[None]:
    """:func:`release_free_memory` when the block ends, however it ends."""
    try:
        yield
    finally:
        release_free_memory()


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
        release_free_memory()  # what the chains read and decoded left free
        log.info(
            "takeovers done: %d objects frozen after a collection (%d freed) in %.2f s",
            gc.get_freeze_count(), collected, time.monotonic() - started,
        )  # fmt: skip
        return True
