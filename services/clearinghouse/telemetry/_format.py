"""Small formatting helpers shared by the log formatter and the span file."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339_utc(epoch_s: float, timespec: str = "milliseconds") -> str:
    """``2026-11-24T10:00:00.123Z`` for seconds since the epoch."""
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec=timespec)[:-6] + "Z"


def rfc3339_utc_ns(epoch_ns: int) -> str:
    """``2026-11-24T10:00:00.123456Z`` for nanoseconds since the epoch."""
    return rfc3339_utc(epoch_ns / 1e9, "microseconds")


def trace_id_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


def span_id_hex(span_id: int) -> str:
    return format(span_id, "016x")
