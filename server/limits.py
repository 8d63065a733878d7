"""Size limits of requests, beyond gRPC's own limit on a message.

gRPC answers RESOURCE_EXHAUSTED to any message over the server's receive limit
(``MAX_MESSAGE_BYTES`` in :mod:`.node`) before a handler sees it. Within that limit, a manifest
or version record over :data:`MAX_MANIFEST_BYTES` or :data:`MAX_VERSION_BYTES` (stage records
too) is refused here with RESOURCE_EXHAUSTED and a message naming the sizes; nothing of it is
stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from .metrics import NodeMetrics

MiB = 1 << 20
#: Largest manifest record in one message: ~40 bytes per chunk, so about 600 000 chunks (a
#: ~40 GB file at 64 KiB per chunk). Below the 32 MiB message limit, so the refusal says what
#: was too large. Larger manifests come in pieces (MAX_PARTED_MANIFEST_BYTES).
MAX_MANIFEST_BYTES = 24 * MiB
#: Largest manifest sent in pieces (PutManifestParts): a file of ~1.6 TB in 64 KiB chunks.
MAX_PARTED_MANIFEST_BYTES = 1024 * MiB
#: Manifest bytes a GetManifests reply carries at most (the rest are read one by one).
MANIFESTS_REPLY_BYTES = 16 * MiB
#: Largest version record (its file list, params, metrics, message).
MAX_VERSION_BYTES = 16 * MiB

#: method -> (request field whose size is limited, limit, what it is)
LIMITS: dict[str, tuple[str, int, str]] = {
    "/chunkstore.v1.MetaService/PutManifest": ("data", MAX_MANIFEST_BYTES, "manifest"),
    "/chunkstore.v1.MetaService/PutVersion": ("data", MAX_VERSION_BYTES, "version record"),
    "/chunkstore.v1.MetaService/PutStage": ("data", MAX_VERSION_BYTES, "stage record"),
    "/chunkstore.v1.MetaService/PutStageFile": ("data", MAX_VERSION_BYTES, "staged file record"),
}


class LimitsInterceptor(grpc.ServerInterceptor):
    """Refuses the unary requests of :data:`LIMITS` whose limited field is too large; counts
    each refusal in ``metrics``."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        limit = LIMITS.get(handler_call_details.method)
        if handler is None or limit is None or handler.unary_unary is None:
            return handler
        field, most, what = limit
        inner = handler.unary_unary
        service, _, method = handler_call_details.method.rpartition("/")
        service = service.rpartition(".")[2]
        metrics = self._metrics

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            size = len(getattr(request, field))
            if size > most:
                if metrics is not None:
                    metrics.observe_rpc(service, method, "RESOURCE_EXHAUSTED", 0.0)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{what} too large: {size} bytes, at most {most}",
                )
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
