"""The one way this project's server interceptors wrap handlers: once per method.

grpc calls ``intercept_service`` on every request; building wrapper handlers each time
would put allocations on the per-payment path. Handlers are stable objects, so each
interceptor keeps method -> (the handler it wrapped, its wrapper) and rebuilds only if
the inner handler changed. Subclasses say how to wrap (``_wrap``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

# grpc's stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    _ServerInterceptorBase = grpc.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _ServerInterceptorBase = grpc.ServerInterceptor
    Handler = grpc.RpcMethodHandler


class WrappingServerInterceptor(_ServerInterceptorBase):
    def __init__(self) -> None:
        self._cache: dict[str, tuple[Handler, Handler]] = {}
        self._cache_lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        with self._cache_lock:
            cached = self._cache.get(method)
            if cached is not None and cached[0] is handler:
                return cached[1]
            wrapped = self._wrap(method, handler)
            self._cache[method] = (handler, wrapped)
            return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        raise NotImplementedError
