"""``Telemetry``: the providers, exporters and interceptors of one process."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import ParamSpec, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.util.types import AttributeValue

from clearinghouse.telemetry.config import TelemetryConfig
from clearinghouse.telemetry.instruments import METER_NAME, DomainMetrics, RpcInstruments, metrics
from clearinghouse.telemetry.interceptors import (
    DEFAULT_UNTRACED_PREFIXES,
    ClientInterceptor,
    ServerInterceptor,
)
from clearinghouse.telemetry.prometheus import PrometheusReader, PrometheusServer
from clearinghouse.telemetry.tracefile import JsonLinesSpanExporter

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class _Process:
    """What this process has set up (one instance, ``_process``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: Telemetry | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.globals_installed = False


_process = _Process()


def current() -> Telemetry | None:
    """The telemetry set up in this process, if any."""
    return _process.active


def span(name: str, **attrs: AttributeValue) -> AbstractContextManager[trace.Span]:
    """A span for an internal step, child of the current one::

        with span("ledger.commit", shard=7, entries=len(batch)):
            ...

    An exception leaving the block is recorded on the span and re-raised. Before
    ``Telemetry.setup`` (or after ``shutdown``) the span records nothing.
    """
    return _process.tracer.start_as_current_span(name, attributes=attrs or None)


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` to run later (another thread, an executor) under the current trace context.

    Executors do not carry context: ``pool.submit(bind_context(work), arg)`` keeps the
    spans ``work`` starts (and the gRPC calls it makes) in the caller's trace.
    """
    ctx = otel_context.get_current()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        token = otel_context.attach(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run


def resource_for(cfg: TelemetryConfig) -> Resource:
    attrs: dict[str, AttributeValue] = {"service.name": cfg.service_name}
    if cfg.node_id:
        attrs["service.instance.id"] = cfg.node_id
        attrs["clearing.node_id"] = cfg.node_id
    if cfg.zone:
        attrs["clearing.zone"] = cfg.zone
    if cfg.city:
        attrs["clearing.city"] = cfg.city
    return Resource.create(attrs)


class Telemetry:
    """Tracer and meter providers, exporters, interceptors; one per process.

    Build it with ``Telemetry.setup``; end it with ``shutdown`` (flushes exporters,
    stops the metrics endpoint, returns ``metrics`` and ``span`` to no-ops).
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        prometheus: PrometheusServer | None,
    ) -> None:
        self.config = cfg
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._prometheus = prometheus
        self.tracer = tracer_provider.get_tracer(METER_NAME)
        self.meter = meter_provider.get_meter(METER_NAME)
        self.metrics: DomainMetrics = metrics
        self._server_rpc = RpcInstruments(self.meter, "server")
        self._client_rpc = RpcInstruments(self.meter, "client")
        self._client_interceptor = ClientInterceptor(self.tracer, self._client_rpc)
        self._server_interceptors: dict[tuple[str, ...], ServerInterceptor] = {}
        self._closed = False

    @classmethod
    def setup(
        cls,
        cfg: TelemetryConfig,
        *,
        span_exporters: Sequence[SpanExporter] = (),
        metric_readers: Sequence[MetricReader] = (),
        install_global: bool = True,
    ) -> Telemetry:
        """Set telemetry up for this process (once; ``shutdown`` allows another).

        ``span_exporters`` and ``metric_readers`` are added to those ``cfg`` names;
        extra span exporters are called synchronously as each span ends (meant for
        tests: ``InMemorySpanExporter``, ``InMemoryMetricReader``). With
        ``install_global`` the providers also become OpenTelemetry's global ones (for
        libraries that use the global API); that is possible once per process, so
        tests pass ``install_global=False``.
        """
        with _process.lock:
            if _process.active is not None:
                raise RuntimeError("telemetry is already set up; call shutdown() first")
            resource = resource_for(cfg)
            processors = _span_processors(cfg, span_exporters)
            readers = list(metric_readers)
            prom_reader: PrometheusReader | None = None
            if cfg.prometheus_port is not None:
                prom_reader = PrometheusReader(resource)
                readers.append(prom_reader)
            if cfg.otlp_endpoint:
                readers.append(_otlp_metric_reader(cfg))
            ratio = cfg.trace_sample_ratio
            sampler = ParentBased(ALWAYS_ON if ratio >= 1.0 else TraceIdRatioBased(ratio))
            tracer_provider = TracerProvider(resource=resource, sampler=sampler)
            for p in processors:
                tracer_provider.add_span_processor(p)
            meter_provider = MeterProvider(metric_readers=readers, resource=resource)
            prometheus: PrometheusServer | None = None
            try:
                if prom_reader is not None and cfg.prometheus_port is not None:
                    prometheus = PrometheusServer(
                        prom_reader, cfg.prometheus_host, cfg.prometheus_port
                    )
            except OSError:
                tracer_provider.shutdown()
                meter_provider.shutdown()
                raise
            tel = cls(cfg, tracer_provider, meter_provider, prometheus)
            metrics.bind(tel.meter)
            _process.tracer = tel.tracer
            _process.active = tel
            if install_global:
                if _process.globals_installed:
                    log.warning("OpenTelemetry's global providers were set before; kept")
                else:
                    trace.set_tracer_provider(tracer_provider)
                    otel_metrics.set_meter_provider(meter_provider)
                    _process.globals_installed = True
        if prometheus is not None:
            host, port = prometheus.address
            log.info("metrics served at http://%s:%d/metrics", host, port)
        return tel

    # -- what the server and channels use ----------------------------------------------

    def server_interceptor(
        self, untraced_prefixes: Sequence[str] = DEFAULT_UNTRACED_PREFIXES
    ) -> ServerInterceptor:
        """For ``grpc.server(..., interceptors=[tel.server_interceptor()])``.

        Methods starting with one of ``untraced_prefixes`` (health checks, reflection
        by default) are measured but get no span.
        """
        key = tuple(untraced_prefixes)
        with _process.lock:
            icpt = self._server_interceptors.get(key)
            if icpt is None:
                icpt = ServerInterceptor(self.tracer, self._server_rpc, key)
                self._server_interceptors[key] = icpt
        return icpt

    def client_interceptor(self) -> ClientInterceptor:
        """For ``grpc.intercept_channel(channel, tel.client_interceptor())``.

        One object that is a unary-unary, unary-stream, stream-unary and
        stream-stream client interceptor.
        """
        return self._client_interceptor

    def intercept_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` with the client interceptor (closing it closes ``channel``)."""
        return grpc.intercept_channel(channel, self._client_interceptor)

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served (the bound port when the config said 0)."""
        return None if self._prometheus is None else self._prometheus.address

    def force_flush(self, timeout_s: float = 5.0) -> None:
        self.tracer_provider.force_flush(int(timeout_s * 1000))
        self.meter_provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop exporters; ``metrics`` and ``span`` become no-ops again."""
        with _process.lock:
            if self._closed:
                return
            self._closed = True
            if _process.active is self:
                _process.active = None
                _process.tracer = trace.NoOpTracer()
                metrics.bind(otel_metrics.NoOpMeter(METER_NAME))
                metrics.reset()
        if self._prometheus is not None:
            self._prometheus.close()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _span_processors(cfg: TelemetryConfig, extra: Sequence[SpanExporter]) -> list[SpanProcessor]:
    processors: list[SpanProcessor] = [SimpleSpanProcessor(e) for e in extra]
    if cfg.trace_file is not None:
        exporter = JsonLinesSpanExporter(cfg.trace_file, max_bytes=cfg.trace_file_max_bytes)
        processors.append(BatchSpanProcessor(exporter))
    if cfg.console:
        processors.append(BatchSpanProcessor(JsonLinesSpanExporter(stream=sys.stderr)))
    if cfg.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        otlp = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_insecure)
        processors.append(BatchSpanProcessor(otlp))
    return processors


def _otlp_metric_reader(cfg: TelemetryConfig) -> MetricReader:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
        OTLPMetricExporter,
    )

    exporter = OTLPMetricExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_insecure)
    return PeriodicExportingMetricReader(
        exporter, export_interval_millis=cfg.otlp_metric_interval_s * 1000
    )
