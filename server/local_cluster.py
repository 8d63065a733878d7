"""Local clusters for development and tests: node processes on loopback ports, in one directory.

A cluster directory holds::

    cluster.toml   the map: nodes n1..nN on 127.0.0.1, ports picked when it was made
    <id>/          node <id>'s store
    <id>.log       its stdout and stderr (appended on every start)
    <id>.metrics   its metrics port
    <id>.pid       its process id, while it runs
    node-args      options every node starts with, one per line (TLS, tokens), if any

``cluster_up`` makes (or restarts) such a cluster and waits until every node answers SERVING on
the standard gRPC health check; ``cluster_down`` stops it; ``cluster_status`` asks any cluster's
nodes how they are.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chunkstore.client.rpc import Credentials
from chunkstore.cluster_map import ClusterMap, load_cluster_file, map_from_proto
from chunkstore.errors import ChunkstoreError, InvalidInput
from chunkstore.progress import human_bytes
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
MAP_FILE = "cluster.toml"
NODE_ARGS_FILE = "node-args"
DEFAULT_NODES = 3
NODE_MODULE = "chunkstore.server.node"
LOG_TAIL_LINES = 20
# Retry a refused connection within 0.1 s, not gRPC's default of 1 s and growing.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]


_SERVING_STATUS = health_pb2.HealthCheckResponse.ServingStatus


class LocalClusterError(ChunkstoreError):
    """A local cluster that cannot be started, stopped or reached; str() says why."""


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def store_url(cluster: ClusterMap, tls: bool = False) -> str:
    """The ``grpc://`` (``grpcs://`` with ``tls``) URL that names every node of ``cluster``."""
    return ("grpcs://" if tls else "grpc://") + ",".join(n.address for n in cluster.nodes)


def set_node_args(directory: str | Path, args: Sequence[str]) -> None:
    """Make every node of the cluster in ``directory`` start with ``args`` from now on."""
    path = Path(directory) / NODE_ARGS_FILE
    if args:
        path.write_text("".join(f"{a}\n" for a in args))
    else:
        path.unlink(missing_ok=True)


def node_args(directory: str | Path) -> list[str]:
    """The options every node of the cluster in ``directory`` starts with."""
    try:
        return (Path(directory) / NODE_ARGS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []


def uses_tls(directory: str | Path) -> bool:
    """Whether the nodes of the cluster in ``directory`` serve TLS."""
    return "--tls-cert" in node_args(directory)


def create(
    directory: str | Path,
    nodes: int = DEFAULT_NODES,
    replicas: int | None = None,
    write_quorum: int | None = None,
) -> ClusterMap:
    """Write a new cluster into ``directory``: the map (nodes n1..n<nodes> on free loopback
    ports) and each node's metrics port. ``replicas`` and ``write_quorum`` default as in a
    cluster file. Raises ClusterMapError for an invalid combination."""
    ports = free_ports(2 * nodes)
    spec: dict[str, Any] = {
        "nodes": [{"id": f"n{i + 1}", "address": f"{HOST}:{ports[i]}"} for i in range(nodes)]
    }
    if replicas is not None:
        spec["replicas"] = replicas
    if write_quorum is not None:
        spec["write_quorum"] = write_quorum
    cluster = ClusterMap.from_dict(spec)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / MAP_FILE).write_text(cluster.to_toml())
    for node, port in zip(cluster.nodes, ports[nodes:], strict=True):
        (d / f"{node.id}.metrics").write_text(f"{port}\n")
    return cluster


def start_node(
    directory: str | Path,
    node_id: str,
    *,
    detached: bool = False,
    placement: Sequence[str] | None = None,
) -> subprocess.Popen:
    """Start node ``node_id`` of the cluster in ``directory`` and record its pid.

    A ``detached`` node runs in a session of its own, so it outlives the caller and its
    terminal; otherwise it shares the caller's process group (Ctrl-C reaches it too).
    ``placement`` replaces the node's ``--cluster MAP_FILE`` arguments (``--listen``,
    ``--join``: how tests start a node elsewhere than its map says, or joining).
    """
    d = Path(directory)
    if placement is None:
        placement = ["--cluster", str(d / MAP_FILE)]
    command = [
        sys.executable, "-m", NODE_MODULE,
        "--id", node_id,
        *placement,
        "--data", str(d / node_id),
        "--metrics-port", (d / f"{node_id}.metrics").read_text().strip(),
        *node_args(d),
    ]  # fmt: skip
    with open(d / f"{node_id}.log", "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=detached,
        )  # fmt: skip
    (d / f"{node_id}.pid").write_text(f"{process.pid}\n")
    return process


def _fast_channel(address: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A channel to ``address`` that retries refused connections quickly."""
    return (credentials or Credentials()).channel(address, options=_CHANNEL_OPTIONS)


def wait_serving(
    directory: str | Path,
    node_id: str,
    address: str,
    process: subprocess.Popen,
    timeout: float,
    credentials: Credentials | None = None,
) -> None:
    """Return once the node at ``address`` answers SERVING (asked with ``credentials``); raise
    LocalClusterError with the tail of its log if its process exits first or ``timeout``
    seconds pass."""
    deadline = time.monotonic() + timeout
    last = ""
    with _fast_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            code = process.poll()
            if code is not None:
                raise LocalClusterError(
                    f"node {node_id} exited with code {code}{log_tail(directory, node_id)}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = f" (last answer: {e.code().name}: {e.details()})"
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"node {node_id} did not answer SERVING on {address} within {timeout:.0f} s"
                    f"{last}{log_tail(directory, node_id)}"
                )
            time.sleep(0.05)


def log_tail(directory: str | Path, node_id: str) -> str:
    """The last lines of a node's log, as text to append to an error message."""
    path = Path(directory) / f"{node_id}.log"
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return f" (no log at {path})"
    return f"; last lines of {path}:\n" + "\n".join(f"  {line}" for line in lines)


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM every process, wait up to ``timeout`` seconds in all, SIGKILL the rest."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cluster_up(
    directory: str | Path,
    nodes: int | None = None,
    replicas: int | None = None,
    write_quorum: int | None = None,
    timeout: float = 30.0,
    extra_args: Sequence[str] | None = None,
) -> str:
    """Start the cluster in ``directory`` and return its store URL once every node serves.

    Without a ``cluster.toml`` there, a new cluster of ``nodes`` (default 3) is made; with one,
    its nodes are restarted with their data (any of ``nodes``, ``replicas``, ``write_quorum``
    given must match it). Nodes run detached. If one fails to start, all are stopped and
    LocalClusterError says why, with the tail of its log. ``extra_args`` (TLS and tokens
    options of ``chunkstore node``), if given, replace those the nodes start with, now and on
    later restarts; nodes serving TLS are probed with :meth:`Credentials.from_env`.
    """
    d = Path(directory)
    if (d / MAP_FILE).exists():
        cluster = load_cluster_file(d / MAP_FILE)
        _check_matches(d, cluster, nodes, replicas, write_quorum)
        running = list(running_nodes(d))
        if running:
            raise LocalClusterError(
                f"{d}: nodes {', '.join(running)} already run; stop them with cluster down first"
            )
    else:
        cluster = create(d, nodes or DEFAULT_NODES, replicas, write_quorum)
    if extra_args is not None:
        set_node_args(d, extra_args)
    tls = uses_tls(d)
    credentials = Credentials.from_env(tls=tls)
    processes = {n.id: start_node(d, n.id, detached=True) for n in cluster.nodes}
    deadline = time.monotonic() + timeout
    try:
        for n in cluster.nodes:
            wait_serving(
                d, n.id, n.address, processes[n.id], deadline - time.monotonic(), credentials
            )
    except BaseException:
        stop_processes(list(processes.values()))
        for node_id in processes:
            (d / f"{node_id}.pid").unlink(missing_ok=True)
        raise
    return store_url(cluster, tls)


def _check_matches(
    d: Path, cluster: ClusterMap, nodes: int | None, replicas: int | None, wq: int | None
) -> None:
    asked = {"nodes": nodes, "replicas": replicas, "write_quorum": wq}
    has = {
        "nodes": len(cluster.nodes),
        "replicas": cluster.replicas,
        "write_quorum": cluster.write_quorum,
    }
    differ = [
        f"{k} {has[k]} (asked {v})" for k, v in asked.items() if v is not None and v != has[k]
    ]
    if differ:
        raise InvalidInput(
            f"{d} already holds a cluster with {', '.join(differ)}; use another directory"
        )


def cluster_down(directory: str | Path, timeout: float = 15.0) -> list[str]:
    """Stop the nodes of the cluster in ``directory``; return the ids of those that ran.

    Each gets SIGTERM, and SIGKILL if it has not exited ``timeout`` seconds later. Pid files
    are removed; a pid that no longer runs a node is left alone.
    """
    d = Path(directory)
    if not (d / MAP_FILE).exists():
        raise LocalClusterError(f"{d}: no cluster here (no {MAP_FILE})")
    pids: dict[str, int] = {}
    for pid_file in sorted(d.glob("*.pid")):
        pid = _node_pid(pid_file)
        if pid:
            os.kill(pid, signal.SIGTERM)
            pids[pid_file.stem] = pid
        else:
            pid_file.unlink()
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids.values())) and time.monotonic() < deadline:
        time.sleep(0.05)
    for node_id, pid in pids.items():
        if _alive(pid) and _runs_node(pid):
            os.kill(pid, signal.SIGKILL)
        (d / f"{node_id}.pid").unlink()
    return list(pids)


def running_nodes(directory: str | Path) -> dict[str, int]:
    """The pid of each node of the cluster in ``directory`` that runs, by node id."""
    pid_files = sorted(Path(directory).glob("*.pid"))
    pids = {pid_file.stem: _node_pid(pid_file) for pid_file in pid_files}
    return {node_id: pid for node_id, pid in pids.items() if pid}


def _node_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process still runs a node."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _runs_node(pid) else None


def _runs_node(pid: int) -> bool:
    """Whether process ``pid`` runs a chunkstore node, judged by its command line where /proc
    exists, so a recycled pid is never signalled."""
    try:
        return NODE_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited; reaps it if it is our exited child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(); its parent will reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return not Path("/proc/self").exists()


def fetch_map(
    addresses: Sequence[str], timeout: float = 2.0, credentials: Credentials | None = None
) -> ClusterMap:
    """The cluster map served by the first of ``addresses`` that answers."""
    reasons = []
    for address in addresses:
        with (credentials or Credentials()).channel(address) as channel:
            try:
                reply = pb_grpc.ClusterServiceStub(channel).GetClusterMap(
                    pb.Empty(), timeout=timeout
                )
                return map_from_proto(reply)
            except grpc.RpcError as e:
                reasons.append(f"{address}: {e.code().name}")
    raise LocalClusterError(f"no node answered with a cluster map ({'; '.join(reasons)})")


def cluster_status(
    target: ClusterMap | Sequence[str],
    timeout: float = 2.0,
    credentials: Credentials | None = None,
) -> dict[str, Any]:
    """Ask every node of a cluster how it is (with ``credentials``: TLS, token).

    ``target`` is a map, or seed addresses from which the map is fetched; a newer map that a
    node reports replaces it. Returns ``{"epoch", "rebalancing", "replicas", "write_quorum",
    "nodes": [...]}``, one node per map entry: ``{"id", "address", "healthy", "chunks",
    "bytes", "share", "error"}`` and the node's reconciler state: ``"epoch"`` (of its map),
    ``"rebalancing"``, ``"pass_running"``, ``"pass_progress"``, ``"misplaced"``,
    ``"under_replicated"``, ``"chunks_copied"``, ``"chunks_dropped"``. An unreachable or
    unhealthy node has ``healthy`` false, those values None and ``error`` saying why;
    ``share`` is its fraction of the ring (shares sum to 1). ``"departed"`` lists, in the
    same form (``share`` 0), the nodes that recent map changes removed and that still
    answer (they hand their data over before they may be stopped). The cluster is
    ``rebalancing`` while a reachable node has not learned the map yet, has not finished a
    pass under it, or its last pass left keys below their replica count or on a node that does
    not own them, or while a removed node that answers still holds chunks.
    """
    if not isinstance(target, ClusterMap):
        target = fetch_map(target, timeout, credentials)
    cluster = target
    for attempt in range(3):  # a node may know a newer map than the one given
        with ThreadPoolExecutor(min(32, len(cluster.nodes))) as pool:
            probes = list(
                pool.map(lambda n: _probe(n.address, timeout, credentials), cluster.nodes)
            )
        ahead = [
            (p["epoch"], n.address)
            for n, p in zip(cluster.nodes, probes, strict=True)
            if p["epoch"] is not None and p["epoch"] > cluster.epoch
        ]
        if not ahead or attempt == 2:
            break
        try:
            cluster = fetch_map([max(ahead)[1]], timeout, credentials)
        except LocalClusterError:
            break
    ring = cluster.ring()
    in_map = {n.id for n in cluster.nodes}
    gone = {}
    for p in probes:
        for node_id, address in p.pop("departed"):
            if node_id not in in_map:
                gone.setdefault(node_id, address)
    departed = []
    if gone:
        with ThreadPoolExecutor(min(32, len(gone))) as pool:
            answers = pool.map(lambda a: _probe(a, timeout, credentials), gone.values())
            for (node_id, address), probe in zip(gone.items(), answers, strict=True):
                probe.pop("departed")
                if probe["healthy"]:  # out of the map: no share of the ring
                    departed.append({"id": node_id, "address": address, **probe, "share": 0.0})
    rebalancing = any(
        p["rebalancing"] or p["epoch"] != cluster.epoch for p in probes if p["healthy"]
    ) or any(d["rebalancing"] or d["chunks"] for d in departed)
    return {
        "epoch": cluster.epoch,
        "rebalancing": rebalancing,
        "replicas": cluster.replicas,
        "write_quorum": cluster.write_quorum,
        "nodes": [
            {"id": n.id, "address": n.address, **probe, "share": ring.share(n.id)}
            for n, probe in zip(cluster.nodes, probes, strict=True)
        ],
        "departed": departed,
    }


def _probe(address: str, timeout: float, credentials: Credentials | None) -> dict[str, Any]:
    with (credentials or Credentials()).channel(address) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            status = pb_grpc.ClusterServiceStub(channel).GetNodeStatus(pb.Empty(), timeout=timeout)
        except grpc.RpcError as e:
            return {
                "healthy": False,
                "chunks": None,
                "bytes": None,
                "error": e.code().name,
                **dict.fromkeys(_RECONCILER_FIELDS),
                "departed": [],
            }
    serving = check.status == health_pb2.HealthCheckResponse.SERVING
    return {
        "healthy": serving,
        "chunks": status.chunks,
        "bytes": status.stored_bytes,
        "error": None if serving else _SERVING_STATUS.Name(check.status),
        **{name: getattr(status, name) for name in _RECONCILER_FIELDS},
        "departed": [(n.id, n.address) for n in status.departed],
    }


#: NodeStatus fields that describe a node's reconciler, as cluster_status reports them.
_RECONCILER_FIELDS = (
    "epoch",
    "rebalancing",
    "pass_running",
    "pass_progress",
    "misplaced",
    "under_replicated",
    "chunks_copied",
    "chunks_dropped",
)


def _state(node: dict[str, Any], epoch: int) -> str:
    """What a node's reconciler is doing, in a few words."""
    if node["chunks"] is None:
        return "-"
    if node["epoch"] != epoch:
        return f"on map epoch {node['epoch']}"
    parts = []
    if node["pass_running"]:
        parts.append(f"pass {node['pass_progress']:.0%}")
    if node["misplaced"]:
        parts.append(f"{node['misplaced']} to move")
    if node["under_replicated"]:
        parts.append(f"{node['under_replicated']} under-replicated")
    if parts:
        return ", ".join(parts)
    return "rebalancing" if node["rebalancing"] else "in sync"


def format_status(status: dict[str, Any]) -> str:
    """A printable table of :func:`cluster_status` output."""
    nodes = status["nodes"]
    rows = [("ID", "ADDRESS", "HEALTH", "CHUNKS", "STORED", "SHARE", "COPIED", "STATE")]
    for n in nodes:
        reachable = n["chunks"] is not None
        rows.append((
            n["id"],
            n["address"],
            "serving" if n["healthy"] else n["error"].lower(),
            str(n["chunks"]) if reachable else "-",
            human_bytes(n["bytes"]) if reachable else "-",
            f"{n['share']:.1%}",
            str(n["chunks_copied"]) if reachable else "-",
            _state(n, status["epoch"]),
        ))  # fmt: skip
    for n in status.get("departed", ()):
        rows.append((
            n["id"],
            n["address"],
            "serving",
            str(n["chunks"]),
            human_bytes(n["bytes"]),
            "removed",
            str(n["chunks_copied"]),
            f"leaving, {n['chunks']} chunks left" if n["chunks"] else "drained: may stop",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    healthy = sum(n["healthy"] for n in nodes)
    lines = [
        f"cluster epoch {status['epoch']}: {healthy} of {len(nodes)} nodes healthy, "
        f"replicas {status['replicas']}, write quorum {status['write_quorum']}, "
        + ("rebalancing" if status["rebalancing"] else "in sync")
    ]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
