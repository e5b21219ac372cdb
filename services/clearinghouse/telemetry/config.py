"""What a process exports, and where: one frozen value built at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRACE_FILE_MAX_BYTES = 64 * 1024 * 1024

# Environment variables read by ``TelemetryConfig.from_env`` (all optional).
ENV_OTLP_ENDPOINT = "CLEARING_OTLP_ENDPOINT"  # host:port of an OTLP/gRPC collector
ENV_TRACE_FILE = "CLEARING_TRACE_FILE"  # spans as JSON lines, appended to this file
ENV_PROMETHEUS_PORT = "CLEARING_PROMETHEUS_PORT"  # serve /metrics on this port
ENV_PROMETHEUS_HOST = "CLEARING_PROMETHEUS_HOST"  # ... on this address (default 127.0.0.1)
ENV_CONSOLE = "CLEARING_TELEMETRY_CONSOLE"  # "1": spans as JSON lines on stderr
ENV_SAMPLE_RATIO = "CLEARING_TRACE_SAMPLE_RATIO"  # 0..1, for traces started here


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Telemetry of one process.

    Every exporter is off unless named: with the defaults, spans and metrics are
    recorded (trace ids reach the logs and cross gRPC hops) but nothing leaves the
    process.

    - ``otlp_endpoint``: spans and metrics pushed over OTLP/gRPC (``host:port`` or
      ``http://host:port``); metrics every ``otlp_metric_interval_s``.
    - ``trace_file``: finished spans appended as one JSON object per line; when the
      file would pass ``trace_file_max_bytes`` it is renamed to ``<name>.1``
      (replacing the previous one) and a new file is started, so at most twice the
      cap is on disk.
    - ``prometheus_port``: ``GET /metrics`` in Prometheus text format 0.0.4 on
      ``prometheus_host``; port 0 picks a free port (``Telemetry.prometheus_address``).
    - ``console``: finished spans as JSON lines on standard error.
    - ``trace_sample_ratio``: share of traces started in this process that are
      recorded; a trace started elsewhere follows the caller's decision.
    """

    service_name: str = "clearing-switch"
    node_id: str = ""
    zone: str = ""
    city: str = ""
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True
    otlp_metric_interval_s: float = 15.0
    trace_file: Path | None = None
    trace_file_max_bytes: int = DEFAULT_TRACE_FILE_MAX_BYTES
    trace_sample_ratio: float = 1.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = None
    console: bool = False

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio {self.trace_sample_ratio} is not in [0, 1]")
        if self.trace_file_max_bytes < 4096:
            raise ValueError(f"trace_file_max_bytes {self.trace_file_max_bytes} is below 4096")
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port {self.prometheus_port} is not a port")
        if self.otlp_metric_interval_s <= 0:
            raise ValueError("otlp_metric_interval_s must be positive")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.strip():
            raise ValueError("otlp_endpoint is empty; use None to disable OTLP")

    @classmethod
    def from_env(
        cls,
        *,
        service_name: str = "clearing-switch",
        node_id: str = "",
        zone: str = "",
        city: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> TelemetryConfig:
        """A config from the ``CLEARING_*`` variables above (unset: exporter off)."""
        env = os.environ if environ is None else environ
        port = env.get(ENV_PROMETHEUS_PORT, "").strip()
        trace_file = env.get(ENV_TRACE_FILE, "").strip()
        ratio = env.get(ENV_SAMPLE_RATIO, "").strip()
        return cls(
            service_name=service_name,
            node_id=node_id,
            zone=zone,
            city=city,
            otlp_endpoint=env.get(ENV_OTLP_ENDPOINT, "").strip() or None,
            trace_file=Path(trace_file) if trace_file else None,
            trace_sample_ratio=float(ratio) if ratio else 1.0,
            prometheus_host=env.get(ENV_PROMETHEUS_HOST, "").strip() or "127.0.0.1",
            prometheus_port=int(port) if port else None,
            console=env.get(ENV_CONSOLE, "").strip().lower() in ("1", "true", "yes"),
        )
