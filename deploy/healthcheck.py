#!/usr/bin/env python3
"""Health check of a chunkstore node for Docker: ask its standard gRPC health service.

    python healthcheck.py [--host 127.0.0.1] [--port 7400] [--timeout 3]

Exits 0 if the node answers SERVING; otherwise 1 (not serving, shutting down, unreachable, or
too slow), with one line on stderr saying why, which Docker keeps in ``docker inspect``'s
health log. The port defaults to ``$CHUNKSTORE_GRPC_PORT``, else 7400, the gRPC port the image
exposes. (Kubernetes needs no script: its probes speak the gRPC health protocol themselves.)

The image carries this file as /usr/local/lib/chunkstore/healthcheck.py. It imports nothing of
chunkstore, only ``grpcio`` and ``grpcio-health-checking``, which chunkstore depends on.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7400
DEFAULT_TIMEOUT = 3.0
PORT_ENV = "CHUNKSTORE_GRPC_PORT"
PROG = "healthcheck"


def check(host: str, port: int, timeout: float = DEFAULT_TIMEOUT, service: str = "") -> str | None:
    """None if the node at ``host:port`` reports ``service`` SERVING, else why not."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # A proxy from the environment must not stand between the probe and the node.
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return f"{target}: {e.code().name}: {e.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def _default_port() -> int:
    value = os.environ.get(PORT_ENV)
    if value is None:
        return DEFAULT_PORT
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"${PORT_ENV} is {value!r}: want a port number 1-65535")
    return port


def main(argv: list[str] | None = None) -> int:
    try:
        default_port = _default_port()
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(
        prog=PROG, description="Exit 0 if the chunkstore node answers SERVING, else 1."
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument(
        "--port", type=int, default=default_port, help=f"default ${PORT_ENV}, else {DEFAULT_PORT}"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"default {DEFAULT_TIMEOUT:g}",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # Docker reserves exit code 2: a usage error is "unhealthy" too
        return 0 if e.code == 0 else 1
    reason = check(args.host, args.port, args.timeout)
    if reason is not None:
        print(f"{PROG}: not serving: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
