"""The storage node: the chunkstore services over one LmdbStore, plus health, reflection, metrics.

    python -m chunkstore.server.node --id n1 --cluster cluster.toml --data /srv/chunkstore/n1
    python -m chunkstore.server.node --id n4 --listen 10.0.0.4:7400 --data /srv/n4 \
        --join grpc://10.0.0.1:7400

The node uses the newest cluster map it knows of (its cluster file, the map it persisted in its
data directory, its seeds' with ``--join``, and then any newer one a peer or an operator
publishes); in the background it repairs and rebalances (:mod:`.reconciler`) and scrubs
(:mod:`.scrubber`); see :mod:`.maintenance`.

A node serves until SIGTERM or SIGINT; then its health turns NOT_SERVING, calls in flight get a
grace period to finish, the store is closed and the process exits 0. A startup failure (a bad
cluster file, an id not in the map, a store that cannot be opened, a port in use, a bad tokens
file or TLS file) prints one line to stderr and exits non-zero.

``--tls-cert``/``--tls-key`` serve TLS (``--tls-client-ca`` also requires client
certificates) and ``--tokens`` requires a token on every chunkstore call; see :mod:`.auth`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chunkstore.allocator import keep_freed_memory
from chunkstore.client.rpc import RpcPolicy
from chunkstore.cluster_map import ClusterMap
from chunkstore.errors import ChunkstoreError, InvalidInput
from chunkstore.stores.lmdb_store import LmdbStore
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .auth import AuthInterceptor, NodeSecurity, load_node_security
from .chunk_service import ChunkServicer, add_chunk_service
from .cluster_service import ClusterServicer
from .limits import LimitsInterceptor
from .maintenance import (
    Maintenance,
    MaintenanceOptions,
    add_maintenance_arguments,
    options_from_args,
    startup,
)
from .membership import MapHolder
from .meta_service import MetaServicer
from .metrics import NodeMetrics
from .rpc import RpcInterceptor

PROG = "chunkstore node"
#: Largest gRPC message either way: a batch of ~4 MiB, or one chunk of up to 16 MiB raw.
MAX_MESSAGE_BYTES = 32 << 20
DEFAULT_WORKERS = 16
DEFAULT_GRACE = 10.0
SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())

log = logging.getLogger("chunkstore.node")


class NodeServer:
    """The gRPC server of node ``node_id`` of ``cluster``, serving ``store``.

    Call :meth:`listen`, then :meth:`start`; :meth:`stop` may be called more than once. The
    store stays open: whoever opened it closes it after :meth:`stop`. ``security`` sets TLS
    and tokens; its ``peer`` credentials (``self.peer_policy``) are for calls to other nodes.
    """

    def __init__(
        self,
        node_id: str,
        cluster: ClusterMap | MapHolder,
        store: LmdbStore,
        metrics: NodeMetrics,
        *,
        workers: int = DEFAULT_WORKERS,
        security: NodeSecurity | None = None,
        maintenance: MaintenanceOptions | None = None,
    ) -> None:
        self.security = security = security or NodeSecurity()
        self.peer_policy = RpcPolicy(credentials=security.peer)
        self.holder = cluster if isinstance(cluster, MapHolder) else MapHolder(node_id, cluster)
        self.maintenance = (
            Maintenance(node_id, store, self.holder, metrics, self.peer_policy, maintenance)
            if maintenance is not None
            else None
        )
        interceptors: list[grpc.ServerInterceptor] = [
            LimitsInterceptor(metrics),
            RpcInterceptor(metrics),
        ]
        if security.tokens is not None:  # first: a refused caller learns nothing else
            interceptors.insert(0, AuthInterceptor(security.tokens, metrics))
        verify_workers = max(2, os.cpu_count() or 1)
        self._verify_pool = ThreadPoolExecutor(verify_workers, thread_name_prefix="verify")
        self._health = health.HealthServicer()
        self._server = grpc.server(
            ThreadPoolExecutor(workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ],
        )
        self._chunks = ChunkServicer(
            store, metrics, self._verify_pool, self.holder, verify_workers=verify_workers
        )
        add_chunk_service(self._chunks, self._server)
        pb_grpc.add_MetaServiceServicer_to_server(MetaServicer(store), self._server)
        reconciler = self.maintenance.reconciler if self.maintenance is not None else None
        pb_grpc.add_ClusterServiceServicer_to_server(
            ClusterServicer(node_id, self.holder, store, reconciler), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    def listen(self, address: str) -> int:
        """Bind ``address`` (HOST:PORT; port 0 picks one); return the port bound."""
        _check_bindable(address)  # first: gRPC would log its own error lines before ours
        try:
            if self.security.tls is not None:
                return self._server.add_secure_port(address, self.security.tls)
            return self._server.add_insecure_port(address)
        except RuntimeError:
            raise ChunkstoreError(f"cannot listen on {address}") from None

    def start(self) -> None:
        """Start serving; health answers SERVING for the node and each of its services."""
        self._server.start()
        for name in ("", *SERVICE_NAMES):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.maintenance is not None:
            self.maintenance.start()

    def stop(self, grace: float) -> None:
        """Answer NOT_SERVING, refuse new calls, give calls in flight ``grace`` seconds."""
        self._health.enter_graceful_shutdown()
        if self.maintenance is not None:
            self.maintenance.stop()
        self._server.stop(grace).wait()
        self._chunks.close()
        self._verify_pool.shutdown()


def serve(
    node_id: str,
    cluster_file: str | Path | None,
    data_dir: str | Path,
    *,
    listen: str | None = None,
    metrics_port: int | None = None,
    grace: float = DEFAULT_GRACE,
    security: NodeSecurity | None = None,
    options: MaintenanceOptions | None = None,
) -> None:
    """Run node ``node_id`` until SIGTERM or SIGINT (call from the main thread).

    Prints one line to stdout once serving. Raises ChunkstoreError, before serving, if there
    is no map (see :func:`.maintenance.startup`), the cluster file is invalid or lacks
    ``node_id``, the store cannot be opened, or a port cannot be bound.
    """
    options = options or MaintenanceOptions()
    keep_freed_memory()  # every PutChunks and GetChunks message is a few MiB
    peer_policy = RpcPolicy(credentials=(security or NodeSecurity()).peer)
    cluster, address = startup(node_id, cluster_file, data_dir, listen, options, peer_policy)
    host = address.rsplit(":", 1)[0]
    with ExitStack() as stack:
        # Restored last: a signal during grace is moot.
        stop_requested = stack.enter_context(_signals_caught())
        store = stack.enter_context(LmdbStore(data_dir))
        metrics = NodeMetrics(store)
        metrics_note = ""
        if metrics_port is not None:
            try:
                metrics_server = metrics.serve(metrics_port, host.strip("[]"))
            except OSError as e:
                raise ChunkstoreError(
                    f"cannot serve metrics on port {metrics_port}: {e.strerror or e}"
                ) from None
            stack.callback(metrics_server.close)
            metrics_note = f", metrics :{metrics_server.port}"
        holder = MapHolder(node_id, cluster, data_dir)
        node = NodeServer(node_id, holder, store, metrics, security=security, maintenance=options)
        stack.callback(node.stop, grace)
        port = node.listen(address)
        node.start()
        print(
            f"node {node_id} serving on {host}:{port} "
            f"(data {data_dir}{metrics_note}, {node.security.describe()})",
            flush=True,
        )
        while not stop_requested():
            time.sleep(0.2)  # the handler runs as a signal comes; this sees it within 0.2 s
        log.info("node %s stopping: calls in flight get %.0f s", node_id, grace)
    log.info("node %s stopped", node_id)


def _check_bindable(address: str) -> None:
    """Raise ChunkstoreError saying why ``address`` cannot be bound (in use, not local...)."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind(sockaddr)
    except ValueError:
        raise InvalidInput(f"cannot listen on {address!r}: want HOST:PORT") from None
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ChunkstoreError(f"cannot listen on {address}: {reason}") from None


@contextmanager
def _signals_caught() -> Iterator[Callable[[], bool]]:
    """Within the block, SIGTERM and SIGINT do not end the process; the block gets a
    function that says whether one came.

    The handler only appends to a list. It runs on the main thread between two bytecodes,
    wherever that thread is: had it set a threading.Event (as it once did), it would take the
    Event's lock, which the main thread may hold itself while it waits on that Event. (A CI
    run saw a node leave a SIGTERM unanswered for 15 s while its main thread waited on such
    an Event; its cause was not pinned down, and this wait takes no lock at all.)
    """
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield lambda: bool(caught)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _port(text: str) -> int:
    """A TCP port, for argparse (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: want 0-65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chunkstore node``."""
    parser.add_argument(
        "--id", required=True, dest="node_id", metavar="ID", help="this node's id in the map"
    )
    parser.add_argument(
        "--cluster",
        metavar="FILE",
        help="cluster file (TOML), the same on every node; a newer map the node stored in "
        "--data wins (needed unless --join)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="directory of this node's store (made if needed)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to bind (default: this node's address in the map)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve Prometheus metrics over HTTP on this port",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"on SIGTERM, time calls in flight get to finish (default {DEFAULT_GRACE:.0f})",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by these CAs (mutual TLS)",
    )
    parser.add_argument(
        "--tokens",
        metavar="FILE",
        help="require a token on every call: TOML [[tokens]] with token and scope "
        "(read, write, admin); without it, anyone who reaches the port may do anything",
    )
    parser.add_argument(
        "--peer-token-file",
        metavar="FILE",
        help="token of this node's own calls to other nodes (default $CHUNKSTORE_TOKEN)",
    )
    add_maintenance_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run a node from parsed :func:`add_arguments` options; return the exit code."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        security = load_node_security(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tokens_file=args.tokens,
            peer_token_file=args.peer_token_file,
        )
        serve(
            args.node_id,
            args.cluster,
            args.data,
            listen=args.listen,
            metrics_port=args.metrics_port,
            grace=args.grace,
            security=security,
            options=options_from_args(args),
        )
    except ChunkstoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a chunkstore storage node.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
