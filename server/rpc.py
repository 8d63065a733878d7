"""How every chunkstore RPC runs: errors become gRPC statuses, each call is measured.

Handlers raise chunkstore errors and never call ``context.abort`` themselves; the interceptor
turns each error into a status with the error's one-line message, so a bad request can never
crash the node or leave a client with a bare UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from chunkstore import errors

from .metrics import NodeMetrics

log = logging.getLogger(__name__)

_PREFIX = "/chunkstore.v1."  # health and reflection calls pass through untouched

# Most specific first: CorruptChunk here is a stored chunk found bad (client input that fails
# verification is reported as InvalidInput by the handler).
_CODES: tuple[tuple[type[errors.ChunkstoreError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.CorruptChunk, grpc.StatusCode.DATA_LOSS),
)


def status_of(exc: Exception, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """The status code and message that report ``exc`` to the client.

    A chunkstore error keeps its message; an error after the client went away is CANCELLED;
    anything else is INTERNAL, and logged with its traceback.
    """
    if isinstance(exc, errors.ChunkstoreError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                return code, str(exc)
        return grpc.StatusCode.INTERNAL, str(exc)
    if not context.is_active():
        return grpc.StatusCode.CANCELLED, "the call was cancelled"
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


Behavior = Callable[[Any, grpc.ServicerContext], Any]


class RpcInterceptor(grpc.ServerInterceptor):
    """Wraps every ``chunkstore.v1`` handler: maps its errors (see :func:`status_of`) and
    records its duration and status code in ``metrics``."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        name = handler_call_details.method
        if handler is None or not name.startswith(_PREFIX):
            return handler
        service, method = name[len(_PREFIX) :].split("/", 1)
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._single(handler.unary_unary, service, method), **codec
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, service, method), **codec
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, service, method), **codec
            )
        return grpc.stream_unary_rpc_method_handler(
            self._single(handler.stream_unary, service, method), **codec
        )

    def _single(self, behavior: Behavior, service: str, method: str) -> Behavior:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except Exception as exc:
                code, message = status_of(exc, context)
                context.abort(code, message)
            finally:
                self._metrics.observe_rpc(service, method, code.name, time.perf_counter() - start)

        return run

    def _stream(self, behavior: Behavior, service: str, method: str) -> Behavior:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client cancelled or the deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message = status_of(exc, context)
                context.abort(code, message)
            finally:
                self._metrics.observe_rpc(service, method, code.name, time.perf_counter() - start)

        return run
