"""The ``chunkstore node`` and ``chunkstore cluster`` commands, for the main CLI to mount.

    sub = parser.add_subparsers(...)
    add_node_parser(sub)
    add_cluster_parser(sub)
    args = parser.parse_args()
    if getattr(args, "run", None):      # node and cluster need no store
        return args.run(args)

Each ``run_*`` prints its own errors (one line, ``chunkstore <command>: error: ...``) and
returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from chunkstore.client.help_format import HelpFormatter
from chunkstore.client.rpc import RETRYABLE, Credentials, RpcPolicy
from chunkstore.cluster_map import load_cluster_file
from chunkstore.errors import ChunkstoreError, PermissionDenied, StoreUnavailable
from chunkstore.jsonout import emit_json

from . import admin, local_cluster, node


def add_node_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``node`` to ``subparsers``; its namespace gets ``run=run_node``."""
    p = subparsers.add_parser(
        "node",
        help="run a storage node",
        description=(
            "Serve one node's shard over gRPC until SIGTERM or SIGINT. Start every node of a "
            "new cluster with the same cluster file; a node added later starts with --join "
            "instead, then 'chunkstore cluster add-node' puts it in the map."
        ),
        epilog=textwrap.dedent("""\
            examples:
              chunkstore node --id n1 --cluster cluster.toml --data /srv/n1 --metrics-port 9101
              chunkstore node --id n4 --listen 10.0.0.4:7400 --data /srv/n4 \\
                  --join grpc://10.0.0.1:7400

            cluster.toml, one [[nodes]] entry per node:
              replicas = 3       # copies of everything stored (default min(3, nodes))
              write_quorum = 2   # copies durable before a write succeeds (default R // 2 + 1)
              [[nodes]]
              id = "n1"
              address = "10.0.0.1:7400"
              [[nodes]]
              id = "n2"
              address = "10.0.0.2:7400"
              [[nodes]]
              id = "n3"
              address = "10.0.0.3:7400"
              weight = 2         # twice the share of the data (default 1)
            """),
        formatter_class=HelpFormatter,
    )
    node.add_arguments(p)
    p.set_defaults(run=run_node)
    return p


def run_node(args: argparse.Namespace) -> int:
    """Run ``chunkstore node``; returns 0 after a clean shutdown."""
    return node.run(args)


def add_cluster_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cluster up|down|status|add-node|remove-node|repair`` to ``subparsers``; its
    namespace gets ``run=run_cluster``."""
    p = subparsers.add_parser(
        "cluster",
        help="start, stop, inspect and change a cluster",
        description=(
            "Run a local cluster of node processes on this machine (up, down), or inspect and "
            "change any cluster (status, add-node, remove-node, repair)."
        ),
        epilog=textwrap.dedent("""\
            examples:
              export CHUNKSTORE_STORE=$(chunkstore cluster up --nodes 3 --dir ./cluster)
              chunkstore cluster status --dir ./cluster
              chunkstore cluster down --dir ./cluster
              chunkstore cluster add-node n4 10.0.0.4:7400 --store grpc://10.0.0.1:7400
              chunkstore cluster repair --store grpc://10.0.0.1:7400
            """),
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    up = sub.add_parser(
        "up",
        help="start a local cluster on loopback ports and print its store URL",
        description=(
            "Start N node processes (detached) with their data, logs and pids in DIR; "
            "print the store URL once all serve. If DIR holds a cluster already, start those of "
            "its nodes (in the current map) that do not run. Exit code 6 if a node does not "
            "start (the error says why; the nodes this start began are stopped again, and of "
            "a new cluster nothing is left in DIR), 2 for bad options or a DIR holding files "
            "a new cluster would write."
        ),
        epilog="examples:\n"
        "  export CHUNKSTORE_STORE=$(chunkstore cluster up "
        "--nodes 3 --replicas 2 --dir ./cluster)\n"
        "  chunkstore cluster up --dir ./cluster    # start again the nodes that stopped",
        formatter_class=HelpFormatter,
    )
    up.add_argument(
        "--dir",
        required=True,
        help="directory of the nodes' data, logs and pids (made if needed)",
    )
    up.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help=f"number of nodes (default {local_cluster.DEFAULT_NODES})",
    )
    up.add_argument(
        "--replicas", type=int, metavar="R", help="copies of each chunk (default min(3, nodes))"
    )
    up.add_argument(
        "--write-quorum",
        type=int,
        metavar="W",
        help="copies durable before a write is acknowledged (default replicas // 2 + 1)",
    )
    up.add_argument(
        "--timeout",
        type=admin.seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the nodes to serve (default 30)",
    )
    security = up.add_argument_group(
        "security",
        (
            "passed to every node (see chunkstore node --help) and kept for restarts; "
            "TLS nodes are probed with $CHUNKSTORE_TLS_CA (and _CERT, _KEY); with --tokens, "
            "nodes call each other with the file's first admin token unless --peer-token-file"
        ),
    )
    for flag, help in _NODE_FILE_FLAGS.items():
        security.add_argument(flag, metavar="FILE", help=help)
    up.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of the URL"
    )

    down = sub.add_parser(
        "down",
        help="stop a local cluster's nodes (data is kept)",
        description=(
            "Stop the nodes 'chunkstore cluster up' started in DIR: SIGTERM, then SIGKILL after "
            "--timeout. Their data stays in DIR; 'chunkstore cluster up --dir DIR' starts them "
            "again. Exit code 2, with nothing done, if DIR holds no cluster."
        ),
        epilog="example:\n  chunkstore cluster down --dir ./cluster",
        formatter_class=HelpFormatter,
    )
    down.add_argument("--dir", required=True, help="the directory given to cluster up")
    down.add_argument(
        "--timeout",
        type=admin.seconds_or_0,
        default=15.0,
        metavar="SECONDS",
        help="wait this long after SIGTERM before SIGKILL (default 15)",
    )
    down.add_argument("--json", action="store_true", help="print machine-readable JSON")

    status = sub.add_parser(
        "status",
        help="show every node of a cluster: health, chunks, bytes, ring share",
        description=(
            "Show every node in the cluster map. Exit code 1 if any node is unhealthy "
            "(degraded) or peers refuse a node's calls (peer authentication failed); else 7 "
            "if a node serves but refuses this caller's token (token refused: what it holds "
            "is unknown), or the seeds refuse to serve the map; 6 if no node answers at all "
            "(none of the --store seeds, or no node of the --dir cluster)."
        ),
        epilog="examples:\n  chunkstore cluster status --dir ./cluster\n"
        "  chunkstore cluster status --store grpc://10.0.0.1:7400 --json",
        formatter_class=HelpFormatter,
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--store", metavar="URL", help="grpc://HOST:PORT,... (default: $CHUNKSTORE_STORE)"
    )
    where.add_argument("--dir", help="a local cluster: the directory given to cluster up")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.add_argument("--token", help="token the nodes require (default $CHUNKSTORE_TOKEN)")
    status.add_argument(
        "--timeout",
        type=admin.seconds,
        default=2.0,
        metavar="SECONDS",
        help="per-node timeout (default 2)",
    )

    admin.add_admin_parsers(sub)
    p.set_defaults(run=run_cluster)
    return p


def run_cluster(args: argparse.Namespace) -> int:
    """Run ``chunkstore cluster ACTION``; return the exit code."""
    try:
        return _ACTIONS[args.cluster_command](args)
    except ChunkstoreError as exc:
        print(f"chunkstore cluster {args.cluster_command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


#: The file options ``cluster up`` passes to every node, with their help.
_NODE_FILE_FLAGS = {
    "--tls-cert": "serve TLS with this certificate (PEM)",
    "--tls-key": "the private key of --tls-cert (PEM)",
    "--tls-client-ca": "require client certificates signed by these CAs (mutual TLS)",
    "--tokens": "require a token on every call (TOML [[tokens]] with token and scope)",
    "--peer-token-file": "token of the nodes' calls to each other (default: the first admin "
    "token of --tokens)",
}


def _up(args: argparse.Namespace) -> int:
    extra: list[str] = []
    for flag in _NODE_FILE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            extra += [flag, str(Path(value).resolve())]
    up = local_cluster.cluster_up(
        args.dir,
        args.nodes,
        args.replicas,
        args.write_quorum,
        timeout=args.timeout,
        extra_args=extra or None,
    )
    if args.json:
        emit_json(
            {
                "url": up.url,
                "dir": str(Path(args.dir).resolve()),
                "started": up.started,
                "running": up.running,
                "not_started": up.removed,
            },
            sys.stdout,
        )
    else:
        print(up.url, flush=True)
    if up.running:
        running = ", ".join(up.running)
        if up.started:
            print(f"started {', '.join(up.started)} ({running} already run)", file=sys.stderr)
        else:
            print(f"nothing to start: {running} already run", file=sys.stderr)
    if up.removed:
        print(
            f"not started: {', '.join(up.removed)} (no longer in the cluster map)",
            file=sys.stderr,
        )
    print(
        f"nodes serve in the background (logs in {args.dir}); stop them with: "
        f"chunkstore cluster down --dir {args.dir}",
        file=sys.stderr,
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = local_cluster.cluster_down(args.dir, timeout=args.timeout)
    if args.json:
        emit_json({"dir": str(Path(args.dir).resolve()), "stopped": stopped}, sys.stdout)
    else:
        print(f"stopped {', '.join(stopped)}" if stopped else f"no node of {args.dir} was running")
    return 0


#: How a node that cannot be reached answers, as cluster_status reports it.
_UNREACHED = frozenset(code.name for code in RETRYABLE)


def _status(args: argparse.Namespace) -> int:
    if args.dir:
        local_cluster.check_holds_cluster(args.dir)
        cluster = load_cluster_file(f"{args.dir}/{local_cluster.MAP_FILE}")
        credentials = Credentials.from_env(tls=local_cluster.uses_tls(args.dir), token=args.token)
    else:  # the map of the seeds: StoreUnavailable (exit 6) if none answers, as for add-node
        url = admin.cluster_url(args.store, local=True)
        credentials = Credentials.from_env(tls=url.startswith("grpcs://"), token=args.token)
        policy = RpcPolicy(credentials=credentials, timeout=args.timeout, attempts=1)
        cluster = admin.newest_map(url, policy, follow=False)  # status asks every node anyway
    status = local_cluster.cluster_status(cluster, timeout=args.timeout, credentials=credentials)
    if args.json:
        emit_json(status, sys.stdout)
    else:
        print(local_cluster.format_status(status))
    refused = [n["id"] for n in status["nodes"] if n["token_refused"]]
    if refused:  # they serve: it is the caller they turn away
        print(
            f"chunkstore cluster status: nodes {', '.join(refused)} refuse this caller: give a "
            "token (any scope) with --token or $CHUNKSTORE_TOKEN",
            file=sys.stderr,
        )
    if args.dir and all(n["error"] in _UNREACHED for n in status["nodes"]):
        by_error: dict[str, list[str]] = {}
        for n in status["nodes"]:
            by_error.setdefault(n["error"].lower(), []).append(n["id"])
        reasons = "; ".join(f"{', '.join(ids)}: {why}" for why, ids in by_error.items())
        print(
            f"chunkstore cluster status: error: no node of {args.dir} answers ({reasons}); "
            f"start them with: chunkstore cluster up --dir {args.dir}",
            file=sys.stderr,
        )
        return StoreUnavailable.exit_code
    if status["state"] in ("degraded", "peer authentication failed"):
        return 1  # what is known to be wrong with the cluster comes before what is unknown
    return PermissionDenied.exit_code if refused else 0


_ACTIONS = {"up": _up, "down": _down, "status": _status, **admin.ACTIONS}
