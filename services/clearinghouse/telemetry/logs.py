"""Structured logs: one JSON object per line, with the trace of the current span.

Fields: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``zone``,
``message``; ``trace_id`` and ``span_id`` when a span is active (the ids the trace file
and the tracing backend show); ``exception`` (the formatted traceback, one string) when
the record carries one; ``stack`` for ``stack_info``; and any ``extra={...}`` fields.

Levels, so that a log stays worth reading at INFO when payments flow:

- ERROR: a component failed and someone must act (a node cannot start, storage refuses
  writes past every retry, an invariant broke, an internal error reached a caller).
- WARNING: degraded but handled (retries exhausted and the call answered UNAVAILABLE, a
  shard given up on lease loss, a bank past its deadline, a slow commit).
- INFO: lifecycle and ownership changes (start, ready, draining, stopped; shards gained
  and lost; membership and registry changes); never one line per payment.
- DEBUG: per request and per step (routing decisions, forwarded batches, bank calls).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from opentelemetry import trace

from clearinghouse.telemetry._format import rfc3339_utc, span_id_hex, trace_id_hex

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """A ``logging.Formatter`` writing the JSON line described in this module."""

    def __init__(self, zone: str = "") -> None:
        super().__init__()
        self.zone = zone

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": rfc3339_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "zone": self.zone,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = trace_id_hex(ctx.trace_id)
            out["span_id"] = span_id_hex(ctx.span_id)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(
    level: int | str = logging.INFO, zone: str = "", stream: TextIO | None = None
) -> logging.Handler:
    """Replace the root logger's handlers with one writing JSON lines to ``stream``.

    ``stream`` defaults to standard error. Returns the handler installed.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(zone))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
