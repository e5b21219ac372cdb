"""Bounded retries for idempotent Cassandra statements, and the one place driver errors
become domain errors.

Only statements whose repetition cannot cause a second effect are retried: plain
inserts of write-once rows (same key, same values) and reads. A conditional insert is
retried too, because its outcome is read back and compared (see ``payments.begin``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from clearinghouse import telemetry
from clearinghouse.domain import Unavailable as DomainUnavailable

STORAGE_ATTEMPTS_MAX = 3
STORAGE_RETRY_BUDGET_S = 6.0
STORAGE_BACKOFF_MIN_S = 0.05
STORAGE_BACKOFF_MAX_S = 1.0
RETRY_AFTER_MS = 500

TRANSIENT = (OperationTimedOut, ReadTimeout, WriteTimeout, Unavailable, NoHostAvailable)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryBounds:
    attempts_max: int
    budget_s: float
    backoff_min_s: float
    backoff_max_s: float


# The payment path's: a client waits on it.
STORAGE_RETRIES = RetryBounds(
    STORAGE_ATTEMPTS_MAX, STORAGE_RETRY_BUDGET_S, STORAGE_BACKOFF_MIN_S, STORAGE_BACKOFF_MAX_S
)


def _count_retry(state: RetryCallState) -> None:
    err = state.outcome.exception() if state.outcome is not None else None
    telemetry.metrics.retry(f"cassandra.{type(err).__name__}")


def with_retries(what: str, fn: Callable[[], T], bounds: RetryBounds = STORAGE_RETRIES) -> T:
    """Run ``fn`` with bounded retries; exhausted transient errors become Unavailable."""
    try:
        for attempt in Retrying(
            stop=stop_after_attempt(bounds.attempts_max) | stop_after_delay(bounds.budget_s),
            wait=wait_exponential(min=bounds.backoff_min_s, max=bounds.backoff_max_s),
            retry=retry_if_exception_type(TRANSIENT),
            before_sleep=_count_retry,
            reraise=True,
        ):
            with attempt:
                return fn()
    except TRANSIENT as e:
        raise DomainUnavailable(
            f"ledger storage unavailable while {what}: {type(e).__name__}",
            retry_after_ms=RETRY_AFTER_MS,
            reason="STORAGE_UNAVAILABLE",
        ) from e
    raise AssertionError("unreachable: Retrying either returns or raises")
