"""Finished spans as JSON lines: a file a user can read with ``jq`` and no servers.

One object per span::

    {"ts": "...Z", "trace_id": "4bf9...", "span_id": "00f0...", "parent_span_id": null,
     "name": "clearing.v1.PaymentService/SubmitPayment", "kind": "SERVER",
     "duration_ms": 3.214, "status": "UNSET", "service": "clearing-switch",
     "node_id": "n1", "zone": "beijing-a", "attributes": {...}, "events": [...]}

``ts`` is the span's start. The file is capped: when a write would pass the cap, the
file is renamed to ``<name>.1`` (replacing an older one) and a new one is started.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from clearinghouse.telemetry._format import rfc3339_utc_ns, span_id_hex, trace_id_hex
from clearinghouse.telemetry.config import DEFAULT_TRACE_FILE_MAX_BYTES

log = logging.getLogger(__name__)


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.context
    start = span.start_time or 0
    end = span.end_time or start
    res = span.resource.attributes
    out: dict[str, Any] = {
        "ts": rfc3339_utc_ns(start),
        "trace_id": trace_id_hex(ctx.trace_id) if ctx else None,
        "span_id": span_id_hex(ctx.span_id) if ctx else None,
        "parent_span_id": span_id_hex(span.parent.span_id) if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "duration_ms": round((end - start) / 1e6, 3),
        "status": span.status.status_code.name,
        "service": res.get("service.name"),
        "node_id": res.get("clearing.node_id"),
        "zone": res.get("clearing.zone"),
        "attributes": dict(span.attributes or {}),
    }
    if span.status.description:
        out["status_message"] = span.status.description
    if span.events:
        out["events"] = [
            {
                "ts": rfc3339_utc_ns(e.timestamp),
                "name": e.name,
                "attributes": dict(e.attributes or {}),
            }
            for e in span.events
        ]
    return out


def _encode(spans: Sequence[ReadableSpan]) -> bytes:
    return "".join(
        json.dumps(span_to_dict(s), separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
        for s in spans
    ).encode("utf-8")


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to ``path`` (capped at ``max_bytes``, one rotation) or a text stream."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        stream: TextIO | None = None,
        max_bytes: int = DEFAULT_TRACE_FILE_MAX_BYTES,
    ) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give exactly one of path and stream")
        self._path = path
        self._stream = stream
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fh: IO[bytes] | None = None
        self._size = 0
        self._closed = False

    @property
    def rotated_path(self) -> Path | None:
        return None if self._path is None else self._path.with_name(self._path.name + ".1")

    def _open(self) -> IO[bytes]:
        assert self._path is not None
        if self._fh is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._path, "ab")  # noqa: SIM115 - kept open between batches
            self._size = self._fh.tell()
        return self._fh

    def _rotate(self) -> None:
        assert self._path is not None and self.rotated_path is not None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        os.replace(self._path, self.rotated_path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        data = _encode(spans)
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            try:
                if self._stream is not None:
                    self._stream.write(data.decode("utf-8"))
                    self._stream.flush()
                    return SpanExportResult.SUCCESS
                fh = self._open()
                if self._size > 0 and self._size + len(data) > self._max_bytes:
                    self._rotate()
                    fh = self._open()
                fh.write(data)
                fh.flush()
                self._size += len(data)
            except (OSError, ValueError):
                log.warning(
                    "could not write spans to %s", self._path or "the stream", exc_info=True
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
