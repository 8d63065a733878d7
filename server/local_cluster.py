"""Local clusters for development and tests: node processes on loopback ports, in one directory.

A cluster directory holds::

    cluster.toml   the map: nodes n1..nN on 127.0.0.1, ports picked when it was made
    <id>/          node <id>'s store
    <id>.log       its stdout and stderr (appended on every start)
    <id>.metrics   its metrics port
    <id>.pid       its process id, while it runs
    node-args      options every node starts with, one per line (TLS, tokens), if any
    peer-token     the admin token nodes call each other with, if they require tokens

``cluster_up`` makes such a cluster, or starts those of its nodes that do not run, and waits
until each answers SERVING on the standard gRPC health check; ``cluster_down`` stops it;
``cluster_status`` asks any cluster's nodes how they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chunkstore.client.rpc import Credentials
from chunkstore.cluster_map import (
    ClusterMap,
    NodeSpec,
    load_cluster_file,
    map_from_proto,
    newer,
)
from chunkstore.errors import InvalidInput, StoreUnavailable
from chunkstore.progress import human_bytes
from chunkstore.tomlfile import load_toml
from chunkstore.v1 import store_pb2 as pb
from chunkstore.v1 import store_pb2_grpc as pb_grpc

from .auth import load_node_security
from .membership import load_persisted
from .node import PROG as NODE_PROG

HOST = "127.0.0.1"
MAP_FILE = "cluster.toml"
NODE_ARGS_FILE = "node-args"
PEER_TOKEN_FILE = "peer-token"
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


class LocalClusterError(StoreUnavailable):
    """A local cluster whose nodes do not start, or that no node of answers; str() says why."""


class NodeDidNotStart(LocalClusterError):
    """A node that exited, or did not answer SERVING in time, when it was started.

    str() is one line, ``node ID did not start: REASON``, then each of :attr:`notes` (what was
    undone since), then the tail of its log where REASON is not the error line it wrote.
    """

    def __init__(self, node_id: str, reason: str, log: str = "") -> None:
        self.node_id = node_id
        self.reason = reason
        self.log = log
        self.notes: list[str] = []
        super().__init__(node_id, reason)

    def __str__(self) -> str:
        notes = "".join(f"; {note}" for note in self.notes)
        return f"node {self.node_id} did not start: {self.reason}{notes}{self.log}"


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
    NodeDidNotStart, with the error line it wrote or the tail of its log, if its process exits
    first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last = ""
    with _fast_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            code = process.poll()
            if code is not None:
                raise _exited(directory, node_id, code)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = f" (last answer: {e.code().name}: {e.details()})"
            if time.monotonic() > deadline:
                raise NodeDidNotStart(
                    node_id,
                    f"it did not answer SERVING on {address} within {timeout:g} s{last}",
                    log_tail(directory, node_id),
                )
            time.sleep(0.05)


def _exited(directory: str | Path, node_id: str, code: int) -> NodeDidNotStart:
    """Why node ``node_id`` exited at start: the error line it wrote last (a port in use, a
    store it cannot open...), else its exit code and the tail of its log."""
    try:
        log = (Path(directory) / f"{node_id}.log").read_text(errors="replace")
    except OSError:
        log = ""
    last = log.rstrip().rpartition("\n")[2]
    prefix = f"{NODE_PROG}: error: "
    if last.startswith(prefix):
        return NodeDidNotStart(node_id, f"{last.removeprefix(prefix)} (it exited with code {code})")
    return NodeDidNotStart(node_id, f"it exited with code {code}", log_tail(directory, node_id))


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


@dataclass
class Up:
    """What :func:`cluster_up` did: the store URL, the nodes it started, those that already
    ran, and those of the directory it left stopped because the map no longer has them."""

    url: str
    started: list[str]
    running: list[str]
    removed: list[str]


def cluster_up(
    directory: str | Path,
    nodes: int | None = None,
    replicas: int | None = None,
    write_quorum: int | None = None,
    timeout: float = 30.0,
    extra_args: Sequence[str] | None = None,
) -> Up:
    """Start the cluster in ``directory``; return once every node it started serves.

    Without a ``cluster.toml`` there, a new cluster of ``nodes`` (default 3) is made; if it
    fails to start, everything made for it is removed again. With one, the nodes of the newest
    map (the cluster file's, or a newer one a node of the directory stored after membership
    changes) whose data is in ``directory`` and that do not run are started with their data;
    nodes that run are left alone, and nodes the map no longer has are not started. Any of
    ``nodes``, ``replicas``, ``write_quorum`` given must match that map. Nodes run detached.
    If one fails to start, those just started are stopped and NodeDidNotStart says why: the
    error line the node wrote, else the tail of its log. A new cluster is not made in a
    directory that holds a file it would write (InvalidInput).

    ``extra_args`` (TLS and tokens options of ``chunkstore node``), if given, replace those
    the nodes start with, now and on later restarts (InvalidInput if they differ from those
    of nodes that run). With ``--tokens`` and no ``--peer-token-file``, the nodes call each
    other with the file's first admin token, copied to ``peer-token``. Nodes serving TLS are
    probed with :meth:`Credentials.from_env`.
    """
    d = Path(directory)
    if nodes is not None and nodes < 1:
        raise InvalidInput(f"a cluster needs at least 1 node (asked for {nodes})")
    if d.exists() and not d.is_dir():
        raise InvalidInput(f"{d} is not a directory")
    if extra_args is not None:
        check_node_args(extra_args)
    if not (d / MAP_FILE).exists():
        return _create_and_start(d, nodes, replicas, write_quorum, timeout, extra_args)
    cluster = current_map(d)
    _check_matches(d, cluster, nodes, replicas, write_quorum)
    running = running_nodes(d)
    if extra_args is not None and running and list(extra_args) != _given_args(d):
        raise InvalidInput(
            f"{d}: nodes {', '.join(running)} run with other options; stop them with "
            "cluster down first"
        )
    if extra_args is not None:
        _set_security_args(d, extra_args)
    local = [n for n in cluster.nodes if (d / f"{n.id}.metrics").exists()]
    in_map = {n.id for n in cluster.nodes}
    removed = sorted(p.stem for p in d.glob("*.metrics") if p.stem not in in_map)
    to_start = [n for n in local if n.id not in running]
    _start_all(d, to_start, timeout)
    return Up(
        store_url(cluster, uses_tls(d)),
        [n.id for n in to_start],
        [n.id for n in local if n.id in running],
        [node_id for node_id in removed if node_id not in running],
    )


def current_map(directory: str | Path) -> ClusterMap:
    """The newest map of the cluster in ``directory``: its cluster file's, or a newer one
    that a node stored in its data directory after a membership change."""
    d = Path(directory)
    best = load_cluster_file(d / MAP_FILE)
    for metrics in sorted(d.glob("*.metrics")):
        stored = load_persisted(d / metrics.stem)
        if stored is not None and newer(stored, best):
            best = stored
    return best


def check_node_args(args: Sequence[str]) -> None:
    """Raise InvalidInput, in one line, if the TLS and tokens options ``args`` (``--tls-cert
    FILE`` ...) name files a node would refuse at start."""
    given = dict(zip(args[::2], args[1::2], strict=True))
    load_node_security(
        tls_cert=given.get("--tls-cert"),
        tls_key=given.get("--tls-key"),
        tls_client_ca=given.get("--tls-client-ca"),
        tokens_file=given.get("--tokens"),
        peer_token_file=given.get("--peer-token-file"),
    )
    if "--tokens" in given and "--peer-token-file" not in given:
        admin_token(given["--tokens"])


def admin_token(tokens_file: str | Path) -> str:
    """The first admin token of a (valid) tokens file; InvalidInput if it has none."""
    rows = load_toml(tokens_file, "tokens file").get("tokens", [])
    for row in rows:
        if row.get("scope") == "admin":
            return row["token"]
    raise InvalidInput(
        f"{tokens_file}: no admin token, which the nodes need to call each other (repair, "
        "rebalancing); add one or give --peer-token-file"
    )


def _given_args(d: Path) -> list[str]:
    """The node options as given to cluster up: without the peer token it derived."""
    args = node_args(d)
    derived = ["--peer-token-file", str(d / PEER_TOKEN_FILE)]
    for i in range(len(args) - 1):
        if args[i : i + 2] == derived:
            return args[:i] + args[i + 2 :]
    return args


def _set_security_args(d: Path, args: Sequence[str]) -> None:
    """Make the nodes of ``d`` start with ``args`` from now on, plus, with ``--tokens`` and
    no ``--peer-token-file``, the tokens file's admin token for their calls to each other."""
    args = list(args)
    peer_token = d / PEER_TOKEN_FILE
    if "--tokens" in args and "--peer-token-file" not in args:
        token = admin_token(args[args.index("--tokens") + 1])
        peer_token.touch(mode=0o600)
        peer_token.write_text(token + "\n")
        args += ["--peer-token-file", str(peer_token)]
    else:
        peer_token.unlink(missing_ok=True)
    set_node_args(d, args)


def _create_and_start(
    d: Path,
    nodes: int | None,
    replicas: int | None,
    write_quorum: int | None,
    timeout: float,
    extra_args: Sequence[str] | None,
) -> Up:
    """Make a new cluster in ``d`` and start it; on any failure, remove what was made.
    InvalidInput, before anything is written, if ``d`` holds a file the cluster would write
    (and so remove again if it failed)."""
    made_dir = not d.exists()
    count = DEFAULT_NODES if nodes is None else nodes
    if not made_dir:
        taken = [
            name
            for name in _cluster_files([f"n{i + 1}" for i in range(count)])
            if (d / name).exists()
        ]
        if taken:
            raise InvalidInput(
                f"{d} holds {', '.join(taken)}, which a new cluster would use: "
                "move it away or use another directory"
            )
    cluster = create(d, count, replicas, write_quorum)
    try:
        if extra_args is not None:
            _set_security_args(d, extra_args)
        _start_all(d, list(cluster.nodes), timeout)
    except BaseException as e:
        _remove_cluster_files(d, cluster, made_dir)
        if isinstance(e, NodeDidNotStart):
            e.notes.append(f"nothing of the new cluster was left in {d}")
        raise
    return Up(store_url(cluster, uses_tls(d)), [n.id for n in cluster.nodes], [], [])


def _remove_cluster_files(d: Path, cluster: ClusterMap, made_dir: bool) -> None:
    """Remove what :func:`create` and a first start wrote into ``d`` (and ``d`` if made)."""
    if made_dir:
        shutil.rmtree(d, ignore_errors=True)
        return
    for name in _cluster_files([n.id for n in cluster.nodes]):
        if (d / name).is_dir():
            shutil.rmtree(d / name, ignore_errors=True)
        else:
            (d / name).unlink(missing_ok=True)


def _cluster_files(node_ids: Sequence[str]) -> list[str]:
    """The names a cluster of nodes ``node_ids`` writes in its directory (see the module's
    docstring)."""
    names = [MAP_FILE, NODE_ARGS_FILE, PEER_TOKEN_FILE]
    for node_id in node_ids:
        names += [node_id, *(f"{node_id}{suffix}" for suffix in (".log", ".metrics", ".pid"))]
    return names


def _start_all(d: Path, nodes: Sequence[NodeSpec], timeout: float) -> None:
    """Start ``nodes`` of the cluster in ``d`` and wait until each serves; if one does not,
    stop them all and raise (NodeDidNotStart, noting the others it stopped)."""
    credentials = Credentials.from_env(tls=uses_tls(d))
    processes = {n.id: start_node(d, n.id, detached=True) for n in nodes}
    deadline = time.monotonic() + timeout
    try:
        for n in nodes:
            wait_serving(
                d, n.id, n.address, processes[n.id], deadline - time.monotonic(), credentials
            )
    except BaseException as e:
        stop_processes(list(processes.values()))
        for node_id in processes:
            (d / f"{node_id}.pid").unlink(missing_ok=True)
        if isinstance(e, NodeDidNotStart) and len(processes) > 1:
            others = [node_id for node_id in processes if node_id != e.node_id]
            e.notes.append(f"stopped again: {', '.join(others)}")
        raise


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
    are removed; a pid that no longer runs a node is left alone. InvalidInput, before anything
    is done, if ``directory`` holds no cluster.
    """
    d = Path(directory)
    check_holds_cluster(d)
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


def check_holds_cluster(directory: str | Path) -> None:
    """Raise InvalidInput unless ``directory`` holds a cluster (its cluster file)."""
    d = Path(directory)
    if not (d / MAP_FILE).is_file():
        raise InvalidInput(
            f"{d} holds no cluster (no {MAP_FILE}): give the directory given to cluster up"
        )


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
    unhealthy node has ``healthy`` false, those values None and ``error`` saying why; a node
    that serves but refuses the caller's token has ``healthy`` true, ``token_refused`` true,
    those values None and ``error`` ``UNAUTHENTICATED`` or ``PERMISSION_DENIED``;
    ``share`` is its fraction of the ring (shares sum to 1), ``peers_refused`` the peers that
    refused its calls in its last pass (a peer token problem), ``checked`` whether every other
    healthy node compared keys with it since it started (None if its status is unknown).
    ``"state"`` sums it up: ``degraded`` (a node does not serve), ``peer authentication
    failed``, ``token refused``, ``rebalancing``, ``not yet checked`` or ``in sync``.
    ``"departed"`` lists, in the same form (``share`` 0, ``checked`` None), the nodes that
    recent map changes removed and that still answer (they hand their data over before they
    may be stopped). The cluster is ``rebalancing`` while a reachable node has not learned the
    map yet, has not finished a pass under it, or its last pass left keys below their replica
    count or on a node that does not own them, or while a removed node that answers still
    holds chunks.
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
                if _known(probe):  # out of the map: no share of the ring
                    departed.append(
                        {"id": node_id, "address": address, **probe, "share": 0.0, "checked": None}
                    )
    rebalancing = any(
        p["rebalancing"] or p["epoch"] != cluster.epoch for p in probes if _known(p)
    ) or any(d["rebalancing"] or d["chunks"] for d in departed)
    nodes = [
        {"id": n.id, "address": n.address, **probe, "share": ring.share(n.id)}
        for n, probe in zip(cluster.nodes, probes, strict=True)
    ]
    for node in nodes:
        node["checked"] = _checked(node, nodes)
    for node in (*nodes, *departed):
        del node["incarnation"], node["checked_by_peer"]
    return {
        "epoch": cluster.epoch,
        "state": _cluster_state(nodes, rebalancing),
        "rebalancing": rebalancing,
        "replicas": cluster.replicas,
        "write_quorum": cluster.write_quorum,
        "nodes": nodes,
        "departed": departed,
    }


def _checked(node: dict[str, Any], nodes: Sequence[dict[str, Any]]) -> bool | None:
    """Whether every other healthy node's last complete pass compared keys with this run of
    ``node`` (None if it does not answer or refuses the caller's token). A node restarted
    (replaced by an empty one, say) after a peer's pass is not checked until that peer's next
    pass: until then the peer's report, "in sync" perhaps, is about the node that was there
    before. A peer whose pass did not reach the node counted its keys as under-replicated
    instead."""
    if not _known(node):
        return None
    mine = node["incarnation"]
    return all(
        other["checked_by_peer"].get(node["id"], mine) == mine
        for other in nodes
        if other is not node and _known(other)
    )


def _cluster_state(nodes: Sequence[dict[str, Any]], rebalancing: bool) -> str:
    """The cluster in a few words: ``degraded`` while a node of the map does not serve, then
    ``peer authentication failed``, ``token refused`` (a node serves but refuses the caller's
    token, so what it holds is unknown), ``rebalancing``, ``not yet checked`` (a node started
    since a peer's last pass), else ``in sync``."""
    if not all(n["healthy"] for n in nodes):
        return "degraded"
    if any(n["peers_refused"] for n in nodes):
        return "peer authentication failed"
    if any(n["token_refused"] for n in nodes):
        return "token refused"
    if rebalancing:
        return "rebalancing"
    if not all(n["checked"] for n in nodes):
        return "not yet checked"
    return "in sync"


def _probe(address: str, timeout: float, credentials: Credentials | None) -> dict[str, Any]:
    """One node's health check and status. A node that answers its health check (which needs
    no token) but refuses the caller's token on the status call is ``token_refused``: its
    ``healthy`` is what the health check said, and what it holds is unknown (None)."""
    with (credentials or Credentials()).channel(address) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as e:
            return _unknown(healthy=False, error=e.code().name)
        serving = check.status == health_pb2.HealthCheckResponse.SERVING
        try:
            status = pb_grpc.ClusterServiceStub(channel).GetNodeStatus(pb.Empty(), timeout=timeout)
        except grpc.RpcError as e:
            refused = e.code() in _TOKEN_REFUSED
            return _unknown(healthy=serving and refused, error=e.code().name, token_refused=refused)
    return {
        "healthy": serving,
        "chunks": status.chunks,
        "bytes": status.stored_bytes,
        "error": None if serving else _SERVING_STATUS.Name(check.status),
        "token_refused": False,
        **{name: getattr(status, name) for name in _RECONCILER_FIELDS},
        "peers_refused": list(status.peers_refused),
        # 0: a node of an earlier release, which does not say; taken as checked
        "incarnation": status.incarnation,
        "checked_by_peer": dict(status.checked),
        "departed": [(n.id, n.address) for n in status.departed],
    }


#: How a node refuses the caller's token (none, an unknown one, or one of too low a scope).
_TOKEN_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _unknown(healthy: bool, error: str, token_refused: bool = False) -> dict[str, Any]:
    """A probe of a node whose status could not be read: ``error`` says why."""
    return {
        "healthy": healthy,
        "chunks": None,
        "bytes": None,
        "error": error,
        "token_refused": token_refused,
        **dict.fromkeys(_RECONCILER_FIELDS),
        "peers_refused": [],
        "incarnation": None,
        "checked_by_peer": {},
        "departed": [],
    }


def _known(node: dict[str, Any]) -> bool:
    """Whether a probed node serves and told its status (it did not refuse the token)."""
    return node["healthy"] and not node["token_refused"]


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
    if node["token_refused"]:
        return f"token refused ({node['error'].lower().replace('_', ' ')})"
    if node["chunks"] is None:
        return "-"
    if node["epoch"] != epoch:
        return f"on map epoch {node['epoch']}"
    if node["peers_refused"]:
        return f"peer authentication failed ({', '.join(node['peers_refused'])} refuse it)"
    parts = []
    if node["pass_running"]:
        parts.append(f"pass {node['pass_progress']:.0%}")
    if node["misplaced"]:
        parts.append(f"{node['misplaced']} to move")
    if node["under_replicated"]:
        parts.append(f"{node['under_replicated']} under-replicated")
    if parts:
        return ", ".join(parts)
    if node["rebalancing"]:
        return "rebalancing"
    return "in sync" if node["checked"] is not False else "not yet checked"


def _health(node: dict[str, Any]) -> str:
    """The HEALTH column: what the node's health check said, else why it did not answer."""
    if node["healthy"]:
        return "serving"
    return "not serving" if node["token_refused"] else node["error"].lower()


def format_status(status: dict[str, Any]) -> str:
    """A printable table of :func:`cluster_status` output."""
    nodes = status["nodes"]
    rows = [("ID", "ADDRESS", "HEALTH", "CHUNKS", "STORED", "SHARE", "COPIED", "STATE")]
    for n in nodes:
        reachable = n["chunks"] is not None
        rows.append((
            n["id"],
            n["address"],
            _health(n),
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
        f"replicas {status['replicas']}, write quorum {status['write_quorum']}, " + status["state"]
    ]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
