"""Telemetry: traces, metrics and structured logs, set up once at process start.

A process calls, before it builds its servers and channels::

    from clearinghouse import telemetry

    telemetry.configure_logging("INFO", zone=cfg.zone)
    tel = telemetry.Telemetry.setup(telemetry.TelemetryConfig(node_id=..., zone=..., ...))
    server = grpc.server(pool, interceptors=[tel.server_interceptor()])
    channel = tel.intercept_channel(grpc.secure_channel(address, credentials))
    ...
    tel.shutdown()

Handlers are not written for telemetry: the interceptors trace and measure every call.
Domain code records through ``telemetry.metrics`` (a no-op until set up) and wraps
internal steps in ``telemetry.span("ledger.commit", shard=...)``.
"""

from clearinghouse.telemetry.config import TelemetryConfig
from clearinghouse.telemetry.core import Telemetry, bind_context, current, span
from clearinghouse.telemetry.instruments import DomainMetrics, metrics
from clearinghouse.telemetry.logs import JsonFormatter, configure_logging

__all__ = [
    "DomainMetrics",
    "JsonFormatter",
    "Telemetry",
    "TelemetryConfig",
    "bind_context",
    "configure_logging",
    "current",
    "metrics",
    "span",
]
