"""Requests whose bytes do not parse are the client's error, not the server's.

grpc python deserializes a request before any handler or interceptor behaviour runs;
when the bytes are not a valid message (wrong wire types, truncated fields, invalid
UTF-8 in a string, nesting past protobuf's recursion limit) it logs the exception and
answers INTERNAL ("Exception deserializing request!"), as if the server were broken.

:class:`RequestGuardInterceptor` wraps every handler's ``request_deserializer`` so that
a parse failure yields a marker instead of raising, and wraps its behaviour so that a
marked request ends the call with INVALID_ARGUMENT, reason
:data:`~clearinghouse.domain.errors.InvalidArgument.MALFORMED_REQUEST`, and the usual
``clearing.v1.Error`` in the ``clearing-error-bin`` trailer. The servicer's behaviour
never runs for such a request, so nothing can be written for it. All four handler
shapes are covered: the unary request of unary-unary and unary-stream methods, and each
message of a client stream (stream-unary, stream-stream, e.g. server reflection).

Every gRPC server the project runs lists it among its interceptors (switch nodes and the
bank simulator); put it after the telemetry interceptor, so that the call is still
measured and traced with its INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

import grpc

from clearing.v1 import common_pb2
from clearinghouse._interceptor import Handler, WrappingServerInterceptor
from clearinghouse.domain.errors import (
    ERROR_METADATA_KEY,
    FieldViolation,
    InvalidArgument,
    status_for,
)

log = logging.getLogger(__name__)


# The field path of a violation that concerns the request as a whole.
REQUEST_ROOT: Final = ""
# How much of the parser's message goes into the answer (it names the message type).
PARSER_DETAIL_CHARS_MAX: Final = 200


class _Malformed:
    """Stands in for a request whose bytes did not parse; never reaches a servicer."""

    __slots__ = ("detail", "size_bytes")

    def __init__(self, size_bytes: int, detail: str) -> None:
        self.size_bytes = size_bytes
        self.detail = detail


def malformed_error(method: str, size_bytes: int, detail: str = "") -> InvalidArgument:
    """The domain error for ``size_bytes`` of ``method``'s request that did not parse."""
    why = f" ({detail[:PARSER_DETAIL_CHARS_MAX]})" if detail else ""
    description = f"{size_bytes} bytes are not a valid protobuf request for {method}{why}"
    return InvalidArgument(
        [FieldViolation(REQUEST_ROOT, description)],
        description,
        reason=InvalidArgument.MALFORMED_REQUEST,
    )


def _error_pb(err: InvalidArgument) -> common_pb2.Error:
    return common_pb2.Error(
        code=status_for(err).value[0],
        reason=err.reason,
        message=err.message,
        field_violations=[
            common_pb2.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ],
    )


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 (protobuf's DecodeError, or any parser error)
            return _Malformed(len(data), str(e))

    return deserialize


class RequestGuardInterceptor(WrappingServerInterceptor):
    """Undecodable request bytes become INVALID_ARGUMENT (MALFORMED_REQUEST)."""

    def _wrap(self, method: str, handler: Handler) -> Handler:
        return _wrap(method, handler)


def _refuse(method: str, bad: _Malformed, context: grpc.ServicerContext) -> NoReturn:
    err = malformed_error(method, bad.size_bytes, bad.detail)
    log.debug("refused a malformed request to %s: %s", method, err.message)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, _error_pb(err).SerializeToString()),))
    context.abort(status_for(err), f"{err.reason}: {err.message}")


def _wrap(method: str, handler: Handler) -> Handler:
    if handler.request_deserializer is None:
        return handler  # raw bytes in: nothing to parse, nothing to refuse
    des = _safe(handler.request_deserializer)
    ser = handler.response_serializer

    def unary(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                _refuse(method, request, context)
            return behaviour(request, context)

        return call

    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Malformed):
                _refuse(method, request, context)
            yield request

    def streaming(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(checked(requests, context), context)

        return call

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary(handler.unary_stream), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(streaming(handler.stream_unary), des, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), des, ser)
    return handler


__all__ = ["RequestGuardInterceptor", "malformed_error"]
