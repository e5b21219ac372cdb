"""gRPC interceptors: a span and measurements per call, with W3C trace context.

Server side: one SERVER span per call, named by the full method
(``clearing.v1.PaymentService/SubmitPayment``), child of the ``traceparent`` found in
the call's metadata. The handler's behaviour is wrapped so the final status is seen:
after it returns, ``context.code()`` (``OK`` when unset); after it raises, the code
given to ``context.abort`` (``UNKNOWN`` for any other exception, as grpc answers). The
exception is re-raised untouched.

Client side: one CLIENT span per call; ``traceparent`` (and ``tracestate``) appended
to the outgoing metadata; ended with the call's status when the call completes
(blocking calls, futures and streams alike, through ``add_done_callback``).

Per call, only the span and the attribute lookups are new: instruments are created
once, wrapped handlers and attribute sets are cached per method and code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from clearinghouse._interceptor import WrappingServerInterceptor
from clearinghouse.telemetry.instruments import RpcInstruments

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_KEYS = ("traceparent", "tracestate")

# Not traced by default (still measured): probes and tooling that would drown the traces.
DEFAULT_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Server spans are errors only for codes that mean the server failed (OpenTelemetry's
# semantic conventions); a refused payment (INVALID_ARGUMENT, ...) is not a server error.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

T = TypeVar("T")

# grpc's stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor
    Handler = grpc.RpcMethodHandler


def _split_method(full_method: str) -> tuple[str, str, str]:
    """``/pkg.Service/Method`` -> (span name ``pkg.Service/Method``, service, method)."""
    name = full_method.lstrip("/")
    service, _, method = name.rpartition("/")
    return name, service, method


def _carrier(metadata: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for item in metadata or ():
        key = item[0]
        if key in _TRACE_KEYS:
            value = item[1]
            carrier[key] = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return carrier


def _server_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    getter = getattr(context, "code", None)
    code = getter() if callable(getter) else None
    if isinstance(code, int) and not isinstance(code, grpc.StatusCode):
        code = _CODE_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if not isinstance(code, grpc.StatusCode):
        code = None
    if failed and (code is None or code is grpc.StatusCode.OK):
        return grpc.StatusCode.UNKNOWN
    return code or grpc.StatusCode.OK


def _details(source: Any) -> str:
    getter = getattr(source, "details", None)
    d = getter() if callable(getter) else None
    if isinstance(d, bytes):
        return d.decode("utf-8", "replace")
    return d or ""


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


class _Method:
    """What is fixed for one method: its names, attribute sets, and instruments."""

    __slots__ = ("_by_code", "base", "instruments", "span_name", "traced")

    def __init__(self, full_method: str, instruments: RpcInstruments, traced: bool) -> None:
        self.span_name, service, method = _split_method(full_method)
        self.base = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        self.instruments = instruments
        self.traced = traced
        self._by_code: dict[grpc.StatusCode, dict[str, Any]] = {}

    def attrs(self, code: grpc.StatusCode) -> dict[str, Any]:
        a = self._by_code.get(code)
        if a is None:
            a = {**self.base, "rpc.grpc.status_code": code.value[0]}
            self._by_code[code] = a
        return a

    def finish(
        self,
        span: trace.Span | None,
        started_ns: int,
        code: grpc.StatusCode,
        details: str,
        error_codes: frozenset[grpc.StatusCode] | None,
    ) -> None:
        elapsed_ms = (time.perf_counter_ns() - started_ns) / 1e6
        attrs = self.attrs(code)
        self.instruments.duration_ms.record(elapsed_ms, attrs)
        self.instruments.requests.add(1, attrs)
        self.instruments.active.add(-1, self.base)
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            is_error = (
                code is not grpc.StatusCode.OK if error_codes is None else code in error_codes
            )
            if is_error:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
            span.end()


class ServerInterceptor(WrappingServerInterceptor):
    """Pass to ``grpc.server(..., interceptors=[...])``."""

    def __init__(
        self,
        tracer: Tracer,
        instruments: RpcInstruments,
        untraced_prefixes: Sequence[str] = DEFAULT_UNTRACED_PREFIXES,
    ) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._untraced = tuple(untraced_prefixes)
        super().__init__()

    # -- wrapping ----------------------------------------------------------------------

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        m = _Method(full_method, self._instruments, not full_method.startswith(self._untraced))
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(m, handler.unary_unary), des, ser
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(m, handler.stream_unary), des, ser
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(m, handler.unary_stream), des, ser
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(m, handler.stream_stream), des, ser
            )
        return handler

    def _start(self, m: _Method, context: grpc.ServicerContext) -> trace.Span | None:
        m.instruments.active.add(1, m.base)
        if not m.traced:
            return None
        carrier = _carrier(context.invocation_metadata())
        parent = _PROPAGATOR.extract(carrier) if carrier else otel_context.Context()
        return self._tracer.start_span(
            m.span_name, context=parent, kind=SpanKind.SERVER, attributes=m.base
        )

    def _unary(
        self, m: _Method, behaviour: Callable[[Any, grpc.ServicerContext], T]
    ) -> Callable[[Any, grpc.ServicerContext], T]:
        def call(request: Any, context: grpc.ServicerContext) -> T:
            span = self._start(m, context)
            token = (
                otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
            )
            started = time.perf_counter_ns()
            try:
                response = behaviour(request, context)
            except BaseException:
                code = _server_code(context, failed=True)
                m.finish(span, started, code, _details(context), _SERVER_ERROR_CODES)
                raise
            finally:
                if token is not None:
                    otel_context.detach(token)
            code = _server_code(context, failed=False)
            m.finish(span, started, code, _details(context), _SERVER_ERROR_CODES)
            return response

        return call

    def _streaming(
        self, m: _Method, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[T]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[T]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[T]:
            # The span is made current only around each step, never across a yield.
            span = self._start(m, context)
            span_ctx = trace.set_span_in_context(span) if span is not None else None
            started = time.perf_counter_ns()
            failed, cancelled = True, False
            try:
                token = otel_context.attach(span_ctx) if span_ctx is not None else None
                try:
                    responses = iter(behaviour(request, context))
                finally:
                    if token is not None:
                        otel_context.detach(token)
                while True:
                    token = otel_context.attach(span_ctx) if span_ctx is not None else None
                    try:
                        item = next(responses)
                    except StopIteration:
                        break
                    finally:
                        if token is not None:
                            otel_context.detach(token)
                    yield item
                failed = False
            except GeneratorExit:  # grpc stopped reading: the client went away
                cancelled = True
                raise
            finally:
                code = (
                    grpc.StatusCode.CANCELLED if cancelled else _server_code(context, failed=failed)
                )
                m.finish(span, started, code, _details(context), _SERVER_ERROR_CODES)

        return call


@dataclass(frozen=True, slots=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class ClientInterceptor(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Pass to ``grpc.intercept_channel(channel, interceptor)``; all four call kinds."""

    def __init__(self, tracer: Tracer, instruments: RpcInstruments) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._methods: dict[str, _Method] = {}

    def _method(self, full_method: str) -> _Method:
        m = self._methods.get(full_method)
        if m is None:
            m = _Method(full_method, self._instruments, traced=True)
            self._methods[full_method] = m
        return m

    def _intercept(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        raw = details.method
        full_method = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        m = self._method(full_method)
        span = self._tracer.start_span(m.span_name, kind=SpanKind.CLIENT, attributes=m.base)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        new_details = _CallDetails(
            method=raw,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )
        m.instruments.active.add(1, m.base)
        started = time.perf_counter_ns()
        try:
            call = continuation(new_details, request)
        except BaseException:
            m.finish(span, started, grpc.StatusCode.UNKNOWN, "the call could not start", None)
            raise

        def done(result: Any) -> None:
            code = result.code()
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.UNKNOWN
            m.finish(span, started, code, _details(result), None)

        # Every result of a continuation is a future (done already for blocking calls
        # and failures): the callback runs now, or when the call ends.
        call.add_done_callback(done)
        return call

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._intercept(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._intercept(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._intercept(continuation, client_call_details, request_iterator)
