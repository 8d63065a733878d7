"""One storage node as the client sees it: a lazily opened channel, deadlines and retries.

Every call made through :meth:`NodeClient.run` carries a deadline (see :class:`RpcPolicy`), is
retried with exponential backoff and jitter on UNAVAILABLE and DEADLINE_EXCEEDED a bounded
number of times, and fails with :class:`NodeCallError`, which names the node and the status.
Code above this module turns those into chunkstore errors with :func:`to_error`; no
``grpc.RpcError`` reaches a caller of the store.

Channels speak TLS and carry a token as the policy's :class:`Credentials` say. Server code that
calls other nodes builds its clients the same way: ``NodeClient(spec, RpcPolicy(credentials=
node_security.peer))`` (see :func:`chunkstore.server.auth.load_node_security`).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.experimental

from chunkstore import errors
from chunkstore.cluster_map import NodeSpec
from chunkstore.forks import OpenedIn
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

T = TypeVar("T")
MiB = 1 << 20

#: Statuses worth another attempt: the node may come back or answer in time.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Statuses that refuse the caller, not the request: no other node will think differently.
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

ENV_TOKEN = "CHUNKSTORE_TOKEN"
ENV_TLS_CA = "CHUNKSTORE_TLS_CA"
ENV_TLS_CERT = "CHUNKSTORE_TLS_CERT"
ENV_TLS_KEY = "CHUNKSTORE_TLS_KEY"
ENV_TLS_SERVER_NAME = "CHUNKSTORE_TLS_SERVER_NAME"


def valid_token(token: str) -> bool:
    """Whether ``token`` can travel as ``authorization: Bearer TOKEN`` metadata."""
    return bool(token) and all("!" <= c <= "~" for c in token)


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise errors.InvalidInput(f"{what} {path}: cannot read: {e.strerror or e}") from None


@dataclass(frozen=True)
class Credentials:
    """What a client presents to the nodes and how it checks them.

    - ``tls``: speak TLS (a ``grpcs://`` URL); ``ca``: PEM of the CAs whose node certificates
      to trust (None: the system's roots); ``cert`` and ``key``: a client certificate, for
      nodes that require one (mutual TLS); ``server_name``: the name node certificates must
      carry, instead of the host of the address dialled.
    - ``token``: sent as ``authorization: Bearer TOKEN`` metadata on every call.

    Key and token stay out of ``repr``.
    """

    tls: bool = False
    token: str | None = field(default=None, repr=False)
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not valid_token(self.token):
            raise errors.InvalidInput(
                "the token has characters a token cannot have (want printable ASCII, no spaces)"
            )
        if (self.cert is None) != (self.key is None):
            raise errors.InvalidInput(
                f"a client certificate needs its key: set both ${ENV_TLS_CERT} and ${ENV_TLS_KEY}"
            )

    @classmethod
    def from_env(
        cls, *, tls: bool = False, token: str | None = None, env: Mapping[str, str] | None = None
    ) -> Credentials:
        """Credentials from ``$CHUNKSTORE_TOKEN`` (unless ``token`` is given),
        ``$CHUNKSTORE_TLS_CA``, ``$CHUNKSTORE_TLS_CERT`` and ``$CHUNKSTORE_TLS_KEY`` (PEM files)
        and ``$CHUNKSTORE_TLS_SERVER_NAME``. The files are read now: InvalidInput if one
        cannot be. The TLS variables count only when ``tls`` is true."""
        env = os.environ if env is None else env
        token = token or env.get(ENV_TOKEN) or None
        if not tls:
            return cls(token=token)
        ca, cert, key = (env.get(v) or None for v in (ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY))
        return cls(
            tls=True,
            token=token,
            ca=_read_pem(ca, f"${ENV_TLS_CA}") if ca else None,
            cert=_read_pem(cert, f"${ENV_TLS_CERT}") if cert else None,
            key=_read_pem(key, f"${ENV_TLS_KEY}") if key else None,
            server_name=env.get(ENV_TLS_SERVER_NAME) or None,
        )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``address`` with these credentials and the given options."""
        options = list(options)
        if self.tls:
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer TOKEN`` to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "_BearerToken(...)"

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


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
    - ``receive_window``: bytes a node may send on one call ahead of what the client has read
      (HTTP/2 flow control): it bounds the memory of a read; one stream carries at most
      ``receive_window`` per round trip.
    - ``reconnect_backoff_ms``: the longest a channel waits before reconnecting to a node.
    - ``credentials``: TLS and token of every channel (:class:`Credentials`); None is
      plaintext without a token, except in ``ClusterStore.connect``, which then reads them
      from the environment (:meth:`Credentials.from_env`).
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
    receive_window: int = 4 * MiB
    reconnect_backoff_ms: int = 1000
    credentials: Credentials | None = None

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

    A refusal of the caller wins: UNAUTHENTICATED or PERMISSION_DENIED becomes PermissionDenied,
    naming the first node that refused. Then a node's verdict on the request itself wins over
    unreachable nodes: INVALID_ARGUMENT becomes InvalidInput, RESOURCE_EXHAUSTED StoreFull
    (InvalidInput if the request was too large), NOT_FOUND from every node NotFound (with the
    node's own message); anything else StoreUnavailable. The line names every failed node.
    """
    codes = {f.code for f in failures}
    refused = [f for f in failures if f.code in REFUSED]
    if refused:
        first, more = refused[0], len({f.node.id for f in refused} - {refused[0].node.id})
        return errors.PermissionDenied(
            f"{what}: node {first.node.id} {first.node.address}: "
            f"{first.code.name.lower().replace('_', ' ')}: {first.detail}"
            + (f" (and {more} more node{'s' if more > 1 else ''})" if more else "")
        )
    line = f"{what}: " + "; ".join(map(str, failures))
    if grpc.StatusCode.INVALID_ARGUMENT in codes:
        return errors.InvalidInput(line)
    exhausted = [f for f in failures if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    if exhausted:
        if all(_too_large(f.detail) for f in exhausted):
            return errors.InvalidInput(line)
        return errors.StoreFull(line)
    if codes == {grpc.StatusCode.NOT_FOUND}:
        return errors.NotFound(failures[0].detail)
    return errors.StoreUnavailable(line)


def at_address(failure: NodeCallError) -> str:
    """A failed call to a seed address, whose node id is not known: ``HOST:PORT: code:
    detail``."""
    return f"{failure.node.address}: {failure.code.name.lower()}: {failure.detail}"


def connect_hint(credentials: Credentials | None, failures: Sequence[NodeCallError]) -> str:
    """A hint to append to a failure to reach any node, when a TLS mismatch explains it."""
    tls = credentials is not None and credentials.tls
    details = " ".join(f.detail for f in failures)
    if "WRONG_VERSION_NUMBER" in details:
        return " (the nodes do not seem to serve TLS: use grpc://)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return f" (set ${ENV_TLS_CA} to the CA bundle that signed the nodes' certificates)"
    if "Socket closed" not in details:
        return ""
    if not tls:
        return " (if the nodes serve TLS, use grpcs://)"
    if credentials is not None and credentials.cert is None:
        return (
            " (nodes that require client certificates close the connection without one: "
            f"set ${ENV_TLS_CERT} and ${ENV_TLS_KEY})"
        )
    return ""


def _too_large(detail: str) -> bool:
    """Whether a RESOURCE_EXHAUSTED detail says the request was too large (gRPC's message
    limit, or a node's limit on a record), rather than that the store is full."""
    return "larger than max" in detail or " too large: " in detail


class _Stubs(NamedTuple):
    chunks: pb_grpc.ChunkServiceStub
    meta: pb_grpc.MetaServiceStub
    cluster: pb_grpc.ClusterServiceStub
    put_encoded: grpc.StreamStreamMultiCallable
    get_encoded: grpc.UnaryStreamMultiCallable


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
        self._opened_in = OpenedIn(f"the client of node {spec.id}", reopens=True)

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

    @property
    def get_encoded(self) -> grpc.UnaryStreamMultiCallable:
        """ChunkService.GetChunks yielding its messages serialized (see :mod:`.wire`)."""
        return self._open().get_encoded

    def _open(self) -> _Stubs:
        self._opened_in.check()
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
                        channel.unary_stream(
                            "/chunkstore.v1.ChunkService/GetChunks",
                            request_serializer=pb.ChunkIds.SerializeToString,
                            response_deserializer=None,
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
    """A channel to ``address`` with the policy's credentials (plaintext without a token if it
    has none), message limits and quick reconnects."""
    return (policy.credentials or Credentials()).channel(
        address,
        options=[
            ("grpc.max_send_message_length", policy.max_message_bytes),
            ("grpc.max_receive_message_length", policy.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(100, policy.reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, policy.reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", policy.reconnect_backoff_ms),
            # Connections of this channel only: channels to one address otherwise share them,
            # and a new client would inherit an old one's connection still waiting out its
            # reconnect backoff (refused at once by a node that has since restarted).
            ("grpc.use_local_subchannel_pool", 1),
            # A fixed window instead of one grown by bandwidth probes, which let the nodes of
            # a pull send hundreds of MiB ahead of a client busy decoding.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", policy.receive_window),
            # A server stream (GetChunks, the scans) is read on the thread that iterates it,
            # not handed message by message from the channel's polling thread: a pull's
            # client spends ~6% less CPU and reads ~10% faster.
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ],
    )
