"""Prometheus text exposition (format 0.0.4) from an OpenTelemetry ``MetricReader``.

``PrometheusReader`` is a pull reader: each scrape collects the SDK's cumulative
state and renders it. Names follow the OpenTelemetry-to-Prometheus rules: dots and
other characters become ``_``; the unit is appended (``ms`` -> ``_milliseconds``,
``s`` -> ``_seconds``, ``By`` -> ``_bytes``; annotations like ``{payment}`` are
dropped); monotonic sums are counters named ``..._total``; non-monotonic sums and
gauges are gauges; histograms give ``_bucket{le=...}``, ``_sum`` and ``_count``. The
resource's attributes are one ``target_info`` sample.

``PrometheusServer`` serves ``GET /metrics`` from a small threaded ``http.server``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    MetricReader,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_UNIT_SUFFIX = {
    "ms": "milliseconds",
    "s": "seconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "min": "minutes",
    "h": "hours",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
}


def metric_name(name: str, unit: str = "") -> str:
    """The Prometheus name of an OpenTelemetry instrument (without ``_total``)."""
    out = _INVALID_NAME.sub("_", name).strip("_") or "_"
    if out[0].isdigit():
        out = "_" + out
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not out.endswith("_" + suffix):
        out = f"{out}_{suffix}"
    return out


def label_name(key: str) -> str:
    out = _INVALID_LABEL.sub("_", key) or "_"
    return "_" + out if out[0].isdigit() else out


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(_label_text(v) for v in value)
    return str(value)


def format_value(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(attributes: Mapping[str, Any] | None, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = [(label_name(k), _label_text(v)) for k, v in (attributes or {}).items()]
    pairs.extend(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs) + "}"


@dataclass
class _Family:
    kind: str
    help: str
    samples: list[str] = field(default_factory=list)


def _add_metric(families: dict[str, _Family], name: str, unit: str, help_: str, data: Any) -> None:
    base = metric_name(name, unit)
    if isinstance(data, Sum):
        cumulative = data.aggregation_temporality == AggregationTemporality.CUMULATIVE
        if data.is_monotonic and cumulative:
            fam_name = base if base.endswith("_total") else base + "_total"
            kind = "counter"
        else:
            fam_name, kind = base, "gauge"
        fam = families.setdefault(fam_name, _Family(kind, help_))
        for p in data.data_points:
            fam.samples.append(f"{fam_name}{_labels(p.attributes)} {format_value(p.value)}")
    elif isinstance(data, Gauge):
        fam = families.setdefault(base, _Family("gauge", help_))
        for p in data.data_points:
            fam.samples.append(f"{base}{_labels(p.attributes)} {format_value(p.value)}")
    elif isinstance(data, Histogram):
        if data.aggregation_temporality != AggregationTemporality.CUMULATIVE:
            return  # Prometheus needs cumulative buckets; the reader asks for them.
        fam = families.setdefault(base, _Family("histogram", help_))
        for hp in data.data_points:
            running = 0
            for bound, count in zip(hp.explicit_bounds, hp.bucket_counts, strict=False):
                running += count
                le = (("le", format_value(float(bound))),)
                fam.samples.append(f"{base}_bucket{_labels(hp.attributes, le)} {running}")
            inf = (("le", "+Inf"),)
            fam.samples.append(f"{base}_bucket{_labels(hp.attributes, inf)} {hp.count}")
            fam.samples.append(f"{base}_sum{_labels(hp.attributes)} {format_value(hp.sum)}")
            fam.samples.append(f"{base}_count{_labels(hp.attributes)} {hp.count}")
    # Exponential histograms are not used here and have no 0.0.4 form: skipped.


def render(data: MetricsData | None, resource: Resource | None = None) -> str:
    """The exposition text of ``data``; ``resource`` (or the data's) as ``target_info``."""
    families: dict[str, _Family] = {}
    resources: list[Resource] = [resource] if resource is not None else []
    for rm in data.resource_metrics if data is not None else ():
        if resource is None and rm.resource not in resources:
            resources.append(rm.resource)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                _add_metric(families, m.name, m.unit or "", m.description or m.name, m.data)
    lines: list[str] = []
    if resources:
        lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge"]
        lines += [f"target_info{_labels(r.attributes)} 1" for r in resources]
    for name, fam in families.items():
        lines.append(f"# HELP {name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {name} {fam.kind}")
        lines.extend(fam.samples)
    return "\n".join(lines) + "\n" if lines else ""


class PrometheusReader(MetricReader):
    """A pull ``MetricReader``: ``scrape()`` collects and renders (cumulative)."""

    def __init__(self, resource: Resource | None = None) -> None:
        super().__init__()  # cumulative temporality for every instrument kind
        self._resource = resource
        self._lock = threading.RLock()
        self._data: MetricsData | None = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        with self._lock:
            self._data = metrics_data

    def scrape(self) -> str:
        with self._lock:
            self.collect()
            data, self._data = self._data, None
        return render(data, self._resource)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with self._lock:
            self._data = None


class PrometheusServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free port) from daemon threads."""

    def __init__(self, reader: PrometheusReader, host: str, port: int) -> None:
        self._reader = reader

        class Handler(BaseHTTPRequestHandler):
            server_version = "clearing-metrics/1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in ("/metrics", "/metrics/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = reader.scrape().encode("utf-8")
                except Exception:
                    log.exception("rendering /metrics failed")
                    self.send_error(500, "rendering metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics scrape from %s: " + format, self.client_address[0], *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="prometheus-metrics",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
