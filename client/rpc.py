"""One storage node as the client sees it: a lazily opened channel, deadlines and retries.

Every call made through :meth:`NodeClient.run` carries a deadline (see :class:`RpcPolicy`), is
retried with exponential backoff and jitter on UNAVAILABLE and DEADLINE_EXCEEDED a bounded
number of times, and fails with :class:`NodeCallError`, which names the node and the status.
Code above this module turns those into chunkstore errors with :func:`to_error`; no
``grpc.RpcError`` reaches a caller of the store.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import grpc

from chunkstore import errors
from chunkstore.cluster_map import NodeSpec
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

T = TypeVar("T")
MiB = 1 << 20

#: Statuses worth another attempt: the node may come back or answer in time.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RpcPolicy:
    """Deadlines, retries and limits of every call to a node. Times are in seconds.

    - ``timeout``: deadline of a unary call; ``stream_timeout``: base deadline of a streaming
      call. A call that moves n bytes gets n / ``min_rate`` seconds more (:meth:`deadline`).
    - ``attempts``: tries of a call to a healthy node, ``backoff`` before the first retry,
      doubling up to ``max_backoff``, half of it jitter (:meth:`delay`).
    - ``straggler_grace``: once enough nodes answered for an operation to succeed, how long the
      others still get (or as long as the answers took, if longer) before they count as failed.
    - ``stall_timeout``: a read stream that delivers nothing this long is abandoned.
    - ``max_message_bytes``: gRPC send and receive limit (a chunk is at most 16 MiB).
    - ``reconnect_backoff_ms``: the longest a channel waits before reconnecting to a node.
    """

    timeout: float = 10.0
    stream_timeout: float = 30.0
    min_rate: float = 4 * MiB
    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    straggler_grace: float = 1.0
    stall_timeout: float = 5.0
    max_message_bytes: int = 64 * MiB
    reconnect_backoff_ms: int = 1000

    def deadline(self, nbytes: int = 0, *, stream: bool = False) -> float:
        """Seconds a call that moves ``nbytes`` may take."""
        return (self.stream_timeout if stream else self.timeout) + nbytes / self.min_rate

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): half fixed, half jitter."""
        cap = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return cap / 2 + random.uniform(0, cap / 2)


DEFAULT_POLICY = RpcPolicy()


class NodeCallError(errors.ChunkstoreError):
    """A call to one node that failed for good (after its retries).

    Callers of the store see the error :func:`to_error` makes of it; it is a ChunkstoreError
    only so that, should one escape, it still reads as one line naming the node.
    """

    def __init__(self, node: NodeSpec, code: grpc.StatusCode, detail: str) -> None:
        self.node = node
        self.code = code
        self.detail = detail
        super().__init__(f"node {node.id} ({node.address}): {code.name.lower()}: {detail}")

    @classmethod
    def from_rpc(cls, node: NodeSpec, exc: grpc.RpcError) -> NodeCallError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return cls(node, code or grpc.StatusCode.UNKNOWN, detail or "no details")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


def to_error(what: str, failures: Sequence[NodeCallError]) -> errors.ChunkstoreError:
    """The chunkstore error that reports ``failures`` of the operation ``what`` in one line.

    A node's verdict on the request itself wins over unreachable nodes: INVALID_ARGUMENT becomes
    InvalidInput, RESOURCE_EXHAUSTED StoreFull, NOT_FOUND from every node NotFound (with the
    node's own message); anything else StoreUnavailable. The line names every failed node.
    """
    codes = {f.code for f in failures}
    line = f"{what}: " + "; ".join(map(str, failures))
    if grpc.StatusCode.INVALID_ARGUMENT in codes:
        return errors.InvalidInput(line)
    if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
        return errors.StoreFull(line)
    if codes == {grpc.StatusCode.NOT_FOUND}:
        return errors.NotFound(failures[0].detail)
    return errors.StoreUnavailable(line)


class _Stubs(NamedTuple):
    chunks: pb_grpc.ChunkServiceStub
    meta: pb_grpc.MetaServiceStub
    cluster: pb_grpc.ClusterServiceStub
    put_encoded: grpc.StreamStreamMultiCallable


class NodeClient:
    """Calls to one node over one channel, opened on first use; thread-safe.

    A node is *healthy* until a call fails with a retryable status after all its attempts (or
    it is found too slow, :meth:`mark_slow`), and again after any call it answers. An unhealthy
    node gets one call at a time, of one attempt (a probe); other calls to it fail at once with
    its last failure. So a dead or hung node costs the backoff or a deadline once, and calls to
    it never pile up.
    """

    def __init__(self, spec: NodeSpec, policy: RpcPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stubs: _Stubs | None = None
        self._closed = False
        self._failed: NodeCallError | None = None
        self._probing = False

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def healthy(self) -> bool:
        return self._failed is None

    @property
    def chunks(self) -> pb_grpc.ChunkServiceStub:
        return self._open().chunks

    @property
    def meta(self) -> pb_grpc.MetaServiceStub:
        return self._open().meta

    @property
    def cluster(self) -> pb_grpc.ClusterServiceStub:
        return self._open().cluster

    @property
    def put_encoded(self) -> grpc.StreamStreamMultiCallable:
        """ChunkService.PutChunks taking requests already serialized (see :mod:`.push`)."""
        return self._open().put_encoded

    def _open(self) -> _Stubs:
        stubs = self._stubs
        if stubs is None:
            with self._lock:
                if self._closed:
                    raise errors.StoreUnavailable(f"the client of node {self.id} is closed")
                if self._stubs is None:
                    channel = open_channel(self.spec.address, self.policy)
                    self._channel = channel
                    self._stubs = _Stubs(
                        pb_grpc.ChunkServiceStub(channel),
                        pb_grpc.MetaServiceStub(channel),
                        pb_grpc.ClusterServiceStub(channel),
                        channel.stream_stream(
                            "/chunkstore.v1.ChunkService/PutChunks",
                            request_serializer=None,
                            response_deserializer=pb.PutChunksAck.FromString,
                        ),
                    )
                stubs = self._stubs
        return stubs

    def attempts(self) -> int:
        """How many times a call to this node may be tried now."""
        return self.policy.attempts if self.healthy else 1

    def run(self, call: Callable[[], T]) -> T:
        """Return ``call()``, which makes one gRPC call to this node (or resumes one: it may keep
        its progress between attempts); retried with backoff on retryable statuses.

        Raises NodeCallError once the attempts are spent or for any other status, and at once
        while another call probes this unhealthy node.
        """
        with self._lock:
            failed = self._failed
            if failed is not None:
                if self._probing:
                    raise NodeCallError(self.spec, failed.code, f"still failing: {failed.detail}")
                self._probing = True
        try:
            return self._attempt(call, 1 if failed else self.policy.attempts)
        finally:
            if failed is not None:
                self._probing = False

    def _attempt(self, call: Callable[[], T], attempts: int) -> T:
        attempt = 1
        while True:
            try:
                result = call()
            except grpc.RpcError as exc:
                failure = NodeCallError.from_rpc(self.spec, exc)
                if not failure.retryable or attempt >= attempts:
                    self.record(failure)
                    raise failure from None
                time.sleep(self.policy.delay(attempt))
                attempt += 1
            else:
                self.record(None)
                return result

    def record(self, failure: NodeCallError | None) -> None:
        """Note how the last call ended: None for an answer, else its final failure."""
        self._failed = failure if failure is not None and failure.retryable else None

    def mark_slow(self, waited: float) -> NodeCallError:
        """Note that this node did not answer ``waited`` seconds after the others had; return
        that as a failure."""
        failure = NodeCallError(
            self.spec,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no answer {waited:.1f} s after enough other nodes had answered",
        )
        self.record(failure)
        return failure

    def close(self) -> None:
        """Close the channel (cancelling calls in flight); later calls raise StoreUnavailable."""
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stubs = None


def open_channel(address: str, policy: RpcPolicy) -> grpc.Channel:
    """An insecure channel to ``address`` with the policy's message limits and quick reconnects."""
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", policy.max_message_bytes),
            ("grpc.max_receive_message_length", policy.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(100, policy.reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, policy.reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", policy.reconnect_backoff_ms),
        ],
    )
